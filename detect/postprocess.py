"""Turn decoded head outputs into final detections: confidence filter, class-aware NMS, back to original pixels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from detect.boxes import scale_boxes_to_original
from detect.nms import batched_nms

__all__ = ["postprocess", "undo_letterbox"]


def _candidates(preds: Tensor, conf_thres: float, multi_label: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(image, anchor, class, score) of each candidate above ``conf_thres`` (strictly), by image, anchor, class.

    Args:
        preds: ``[B, A, 4 + C]``.
        conf_thres: score threshold.
        multi_label: every class above the threshold is a candidate; otherwise only each anchor's best class.

    Returns:
        image, anchor, label (int64) and score, each ``[K]``.
    """
    class_scores = preds[..., 4:]  # [B, A, C]
    if multi_label:
        image, anchor, label = (class_scores > conf_thres).nonzero(as_tuple=True)
        return image, anchor, label, class_scores[image, anchor, label]
    best, best_label = class_scores.max(dim=-1)  # [B, A] each
    image, anchor = (best > conf_thres).nonzero(as_tuple=True)
    return image, anchor, best_label[image, anchor], best[image, anchor]


def _best_per_image(image: Tensor, score: Tensor, batch: int, limit: int) -> Tensor:
    """Indices of at most ``limit`` best-scoring candidates of each image.

    Args:
        image: ``[K]`` image index of each candidate, non-decreasing (as ``_candidates`` returns them).
        score: ``[K]`` scores.
        batch: number of images B.
        limit: most candidates kept per image.

    Returns:
        ``[K']`` indices into the candidates, still grouped by image.
    """
    keep, start = [], 0
    for count in torch.bincount(image, minlength=batch).tolist():
        if count > limit:
            keep.append(score[start : start + count].topk(limit).indices + start)
        else:
            keep.append(torch.arange(start, start + count, device=score.device))
        start += count
    return torch.cat(keep)


def postprocess(
    preds: Tensor,
    conf_thres: float = 0.25,
    iou_thres: float = 0.7,
    max_det: int = 300,
    multi_label: bool = False,
    metas: Sequence[Mapping[str, Any]] | None = None,
    max_nms: int = 30000,
) -> list[dict[str, Tensor]]:
    """Filter decoded predictions by confidence and class-aware NMS, one result per image.

    A candidate is an (anchor, class) pair with score strictly above ``conf_thres``: only each anchor's best class,
    or with ``multi_label`` every class above the threshold (the COCO-validation setting). If an image has more than
    ``max_nms`` candidates, only the best ``max_nms`` enter NMS. NMS is per image and per class
    (torchvision's ``batched_nms`` through ``detect.nms``, one call for the whole batch); the best ``max_det``
    survivors are kept.

    Args:
        preds: ``[B, A, 4 + C]`` xyxy boxes in network-input pixels then class probabilities (``head.decode``).
        conf_thres: score threshold in [0, 1].
        iou_thres: boxes of one class overlapping a better one by IoU > this are suppressed.
        max_det: most detections per image.
        multi_label: one candidate per class above the threshold instead of per anchor.
        metas: optional per-image dicts with ``"ratio" (rw, rh)``, ``"pad" (left, top)``, ``"orig_size" (h, w)``;
            when given, boxes are mapped back to original-image pixels and clipped to it.
        max_nms: most candidates per image entering NMS.

    Returns:
        One dict per image: ``boxes [K, 4]`` xyxy (input pixels, or original pixels with ``metas``),
        ``scores [K]``, ``labels [K]`` int64; sorted by decreasing score, K <= ``max_det``.
    """
    if not 0.0 <= conf_thres <= 1.0 or not 0.0 <= iou_thres <= 1.0:
        raise ValueError(f"postprocess: conf_thres {conf_thres} and iou_thres {iou_thres} must be in [0, 1]")
    batch, _, channels = preds.shape
    if metas is not None and len(metas) != batch:
        raise ValueError(f"postprocess: {len(metas)} metas for a batch of {batch} images")
    num_classes = channels - 4

    image, anchor, label, score = _candidates(preds, conf_thres, multi_label)
    if score.numel() > max_nms:  # some image may hold more than max_nms candidates
        keep = _best_per_image(image, score, batch, max_nms)  # [K']
        image, anchor, label, score = image[keep], anchor[keep], label[keep], score[keep]
    boxes = preds[image, anchor, :4]  # [K', 4]
    keep = batched_nms(boxes.float(), score.float(), image * num_classes + label, iou_thres)  # by decreasing score

    image = image[keep]
    if batch > 1:
        keep = keep[image.argsort(stable=True)]  # [K''] grouped by image, decreasing score inside
    counts = torch.bincount(image, minlength=batch).tolist()
    results = []
    for index, kept in enumerate(keep.split(counts)):
        kept = kept[:max_det]
        out_boxes = boxes[kept]
        if metas is not None:
            meta = metas[index]
            out_boxes = scale_boxes_to_original(out_boxes, meta["ratio"], meta["pad"], meta["orig_size"])
        results.append({"boxes": out_boxes, "scores": score[kept], "labels": label[kept]})
    return results


def undo_letterbox(
    results: Sequence[Mapping[str, Tensor]], metas: Sequence[Mapping[str, Any]]
) -> list[dict[str, Tensor]]:
    """Map every family's detections from network-input pixels back to original-image pixels (clipped to it).

    Args:
        results: per image dict(boxes [K, 4] xyxy input pixels, scores [K], labels [K]).
        metas: per image ``"ratio" (rw, rh)``, ``"pad" (left, top)``, ``"orig_size" (h, w)`` of its letterbox.

    Returns:
        The same detections with boxes in original pixels.
    """
    if len(results) != len(metas):
        raise ValueError(f"undo_letterbox: {len(metas)} metas for {len(results)} results")
    return [
        {**result, "boxes": scale_boxes_to_original(result["boxes"], meta["ratio"], meta["pad"], meta["orig_size"])}
        for result, meta in zip(results, metas, strict=True)
    ]
