"""The YOLO family's loss (YOLOv8, YOLO11): BCE classification + IoU-family box + Distribution Focal Loss, on
task-aligned targets. Registered as the `yolo` loss, the default criterion of the `yolov8` and `yolo11` heads.

References:
    - Zheng et al., "Distance-IoU Loss" (DIoU, CIoU), AAAI 2020, arXiv:1911.08287.
    - Rezatofighi et al., "Generalized Intersection over Union" (GIoU), CVPR 2019, arXiv:1902.09630.
    - Li et al., "Generalized Focal Loss" (DFL), NeurIPS 2020, arXiv:2006.04388.
    - Feng et al., "TOOD" (task-aligned assignment), ICCV 2021, arXiv:2108.07755.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.errors import UserError
from detect.boxes import IOU_KINDS, bbox2dist, box_overlap, dist2bbox
from detect.losses.assign import TaskAlignedAssigner
from detect.losses.registry import register_loss
from detect.models.heads.yolo import YoloDecoder

__all__ = ["YoloLoss", "build_yolo_loss", "distribution_focal_loss", "pad_targets"]

# The order of the parts in the loss sums of a last.pt written before the parts were named (a list, not a dict).
LEGACY_PART_ORDER = ("box", "cls", "dfl")


def pad_targets(targets: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Turn flat targets into per-image padded tensors.

    Args:
        targets: ``[N, 6]`` rows ``(image_index, class_id, x1, y1, x2, y2)``, in any order.
        batch_size: number of images B.

    Returns:
        labels: ``[B, M, 1]`` class ids (float), M the most boxes in one image (0 if N == 0); padding 0.
        boxes: ``[B, M, 4]`` xyxy; padding 0.
        mask: ``[B, M, 1]`` 1.0 for real rows, 0.0 for padding.
    """
    image_index = targets[:, 0].long()
    if targets.shape[0] and (image_index.min() < 0 or image_index.max() >= batch_size):
        raise UserError(f"targets: image index out of range [0, {batch_size}): {image_index.unique().tolist()}")
    counts = torch.bincount(image_index, minlength=batch_size)  # [B]
    max_boxes = int(counts.max()) if targets.shape[0] else 0
    order = torch.sort(image_index, stable=True).indices  # [N] grouped by image, original order kept inside
    image_index = image_index[order]
    first_row = torch.cumsum(counts, 0) - counts  # [B] row of each image's first box in `order`
    slot = torch.arange(targets.shape[0], device=targets.device) - first_row[image_index]  # [N]
    padded = targets.new_zeros(batch_size, max_boxes, 5)
    padded[image_index, slot] = targets[order, 1:]
    mask = targets.new_zeros(batch_size, max_boxes, 1)
    mask[image_index, slot] = 1.0
    return padded[..., :1], padded[..., 1:], mask


def distribution_focal_loss(pred_logits: Tensor, target: Tensor) -> Tensor:
    """Distribution Focal Loss (GFL, Li et al. 2020): cross-entropy towards the two bins around a real target.

    A target ``t`` between bins ``l = floor(t)`` and ``l + 1`` is learnt as the mixture ``(l + 1 - t)`` of bin ``l``
    and ``(t - l)`` of bin ``l + 1``, so the expectation of the predicted distribution can equal ``t`` exactly.

    Args:
        pred_logits: ``[P, 4, R]`` logits over R bins for each side of P boxes.
        target: ``[P, 4]`` distances in bins, already within ``[0, R - 1 - 0.01]``.

    Returns:
        ``[P]`` loss averaged over the four sides.
    """
    left = target.long()  # [P, 4]
    right = left + 1
    weight_left = right - target
    weight_right = 1 - weight_left
    log_prob = F.log_softmax(pred_logits, dim=-1)  # [P, 4, R]
    nll_left = log_prob.gather(-1, left.unsqueeze(-1)).squeeze(-1)  # [P, 4]
    nll_right = log_prob.gather(-1, right.unsqueeze(-1)).squeeze(-1)  # [P, 4]
    return -(nll_left * weight_left + nll_right * weight_right).mean(dim=-1)


class YoloLoss:
    """YOLOv8 / YOLO11 loss computed from raw head maps and flat pixel targets.

    Parts (each already multiplied by its gain; all are per-batch, normalised by ``S = max(sum of target scores, 1)``
    over the whole batch, not per image):

    - ``cls``: BCE-with-logits of every anchor and class against the task-aligned soft targets, summed, / S.
    - ``box``: ``1 - overlap`` (``iou``: CIoU by default) between decoded and assigned boxes (in grid units of each
      anchor's level) on positive anchors, weighted by the anchor's target score, summed, / S.
    - ``dfl``: DFL on the ltrb distances of positive anchors (targets clamped to ``reg_max - 1 - 0.01``), weighted
      and normalised as ``box``.

    ``total = (box + cls + dfl) * B``: the scaling of Ultralytics' trainer, so that its learning rates and gains carry
    over unchanged. The parts equal Ultralytics' ``v8DetectionLoss`` loss items for the same predictions and targets.

    The anchors, the DFL bins and the split of the raw maps come from ``decoder``: the head's own when the loss is
    built for a head (`yolo_loss`), so they are made once per map size, not on every call.

    Args:
        decoder: the YOLO decode (C classes, the strides, R DFL bins per side), a head's `YoloHead.decoder`.
        assigner: the label assigner (`TaskAlignedAssigner`), called on detached scores and pixel boxes.
        box_gain: gain of the box part.
        cls_gain: gain of the classification part.
        dfl_gain: gain of the DFL part.
        iou: the box part's overlap: "ciou", "diou", "giou" or "iou".
    """

    def __init__(
        self,
        decoder: YoloDecoder,
        assigner: TaskAlignedAssigner,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        iou: str = "ciou",
    ) -> None:
        if iou not in IOU_KINDS:
            raise ValueError(f"YoloLoss: unknown iou {iou!r}; choose one of {', '.join(IOU_KINDS)}")
        self.decoder = decoder
        self.num_classes, self.strides, self.reg_max = decoder.num_classes, decoder.strides, decoder.reg_max
        self.assigner = assigner
        self.box_gain, self.cls_gain, self.dfl_gain = box_gain, cls_gain, dfl_gain
        self.iou = iou

    def __call__(self, level_outputs: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss.

        Args:
            level_outputs: one ``[B, 4 * R + C, H_l, W_l]`` map per level (box logits first, then class logits).
            targets: ``[N, 6]`` rows ``(image_index, class_id, x1, y1, x2, y2)`` in network-input pixels.

        Returns:
            total: scalar ``(box + cls + dfl) * B``, differentiable, float32 (the loss runs in float32).
            parts: ``{"box", "cls", "dfl"}`` detached scalars (gains applied, not multiplied by B).
        """
        self._check_levels(level_outputs)
        # [B, A, 4R], [B, A, C] float32 views; [A, 2], [A, 1] the decoder's anchors for these sizes (cached)
        box_logits, cls_logits, anchors, stride = self.decoder.split(level_outputs)
        cls_logits = cls_logits.contiguous()  # [B, A, C]: the BCE sums, and their gradients, in this memory order
        batch = cls_logits.shape[0]
        if targets.shape[0] and not ((targets[:, 1] >= 0) & (targets[:, 1] < self.num_classes)).all():
            bad = targets[:, 1][(targets[:, 1] < 0) | (targets[:, 1] >= self.num_classes)].unique().tolist()
            raise UserError(f"targets: class ids {bad} out of range [0, {self.num_classes})")
        gt_labels, gt_boxes, mask_gt = pad_targets(targets.to(cls_logits.device, torch.float32), batch)

        pred_boxes = dist2bbox(self.decoder.box_distances(box_logits), anchors)  # [B, A, 4] xyxy grid units

        assigned = self.assigner(
            cls_logits.detach().sigmoid(),
            (pred_boxes.detach() * stride).to(gt_boxes.dtype),
            anchors * stride,
            gt_labels,
            gt_boxes,
            mask_gt,
        )
        target_scores, fg_mask = assigned.target_scores, assigned.fg_mask
        score_sum = target_scores.sum().clamp(min=1)
        cls_loss = F.binary_cross_entropy_with_logits(cls_logits, target_scores.to(cls_logits.dtype), reduction="none")
        cls_loss = cls_loss.sum() / score_sum

        target_boxes = assigned.target_bboxes / stride  # [B, A, 4] grid units
        weight = target_scores[fg_mask].sum(-1)  # [P]
        overlap = box_overlap(pred_boxes[fg_mask], target_boxes[fg_mask], self.iou)  # [P]
        box_loss = ((1.0 - overlap) * weight).sum() / score_sum
        target_ltrb = bbox2dist(anchors, target_boxes, self.reg_max - 1 - 0.01)  # [B, A, 4]
        fg_logits = box_logits[fg_mask].view(-1, 4, self.reg_max)  # [P, 4, R]
        dfl_loss = (distribution_focal_loss(fg_logits, target_ltrb[fg_mask]) * weight).sum() / score_sum

        box_loss, cls_loss, dfl_loss = box_loss * self.box_gain, cls_loss * self.cls_gain, dfl_loss * self.dfl_gain
        total = (box_loss + cls_loss + dfl_loss) * batch
        return total, {"box": box_loss.detach(), "cls": cls_loss.detach(), "dfl": dfl_loss.detach()}

    def _check_levels(self, level_outputs: Sequence[Tensor]) -> None:
        """One [B, 4 * R + C, H, W] map per stride, or a UserError naming the level and the expected shape."""
        if len(level_outputs) != len(self.strides):
            raise UserError(f"loss: {len(level_outputs)} head levels but {len(self.strides)} strides {self.strides}")
        channels = 4 * self.reg_max + self.num_classes
        for level, out in enumerate(level_outputs):
            if out.ndim != 4 or out.shape[1] != channels:
                raise UserError(
                    f"loss: head level {level} has shape {tuple(out.shape)}, expected [B, {channels}, H, W] "
                    f"(4 * reg_max {self.reg_max} + num_classes {self.num_classes})"
                )


def build_yolo_loss(
    num_classes: int,
    strides: Sequence[int],
    reg_max: int = 16,
    box: float = 7.5,
    cls: float = 0.5,
    dfl: float = 1.5,
    iou: str = "ciou",
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
    assign_iou: str = "ciou",
    min_gt_side: float | None = None,
    decoder: YoloDecoder | None = None,
) -> YoloLoss:
    """The YOLO loss with its TaskAlignedAssigner, from plain numbers (YOLOv8's defaults, DESIGN §5).

    `min_gt_side` None is YOLOv8's choice, the middle stride (see `TaskAlignedAssigner`). `decoder` is the head's to
    share (`yolo_loss`); None builds one from `num_classes`, `strides` and `reg_max`.
    """
    if decoder is None:
        decoder = YoloDecoder(num_classes, strides, reg_max)
    elif (decoder.num_classes, decoder.strides, decoder.reg_max) != (num_classes, tuple(strides), reg_max):
        raise ValueError(f"build_yolo_loss: the decoder's (num_classes, strides, reg_max) "
                         f"{(decoder.num_classes, decoder.strides, decoder.reg_max)} differ from "
                         f"{(num_classes, tuple(strides), reg_max)}")  # fmt: skip
    if min_gt_side is None:
        min_gt_side = float(strides[1] if len(strides) > 1 else strides[0])
    assigner = TaskAlignedAssigner(topk, num_classes, alpha, beta, eps, min_gt_side=min_gt_side, iou=assign_iou)
    return YoloLoss(decoder, assigner, box, cls, dfl, iou)


@register_loss("yolo", loss_keys=("box", "cls", "dfl", "iou"),
               assign_keys=("topk", "alpha", "beta", "eps", "iou", "min_gt_side"))  # fmt: skip
def yolo_loss(head: Any, loss: Mapping[str, Any], assign: Mapping[str, Any]) -> YoloLoss:
    """The registered `yolo` loss of a YOLO head, from the config's `loss.*` (box, cls, dfl, iou) and `assign.*`
    (topk, alpha, beta, eps, iou, min_gt_side) sections; missing keys take YOLOv8's values. The loss decodes with the
    head's `decoder` (its anchors and bins); a head of YOLO's raw layout without one gets its own."""
    known_loss, known_assign = {"box", "cls", "dfl", "iou"}, {"topk", "alpha", "beta", "eps", "iou", "min_gt_side"}
    kwargs = {k: v for k, v in loss.items() if k in known_loss}
    kwargs.update({("assign_iou" if k == "iou" else k): v for k, v in assign.items() if k in known_assign})
    decoder = getattr(head, "decoder", None)
    decoder = decoder if isinstance(decoder, YoloDecoder) else None
    return build_yolo_loss(head.num_classes, head.strides, head.reg_max, decoder=decoder, **kwargs)
