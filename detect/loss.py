"""YOLOv8 detection loss: BCE classification + CIoU box + Distribution Focal Loss, on task-aligned targets.

References:
    - Zheng et al., "Distance-IoU Loss" (CIoU), AAAI 2020, arXiv:1911.08287.
    - Li et al., "Generalized Focal Loss" (DFL), NeurIPS 2020, arXiv:2006.04388.
    - Feng et al., "TOOD" (task-aligned assignment), ICCV 2021, arXiv:2108.07755.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.errors import UserError
from detect.assign import TaskAlignedAssigner
from detect.boxes import bbox2dist, bbox_iou, dist2bbox, make_anchors

__all__ = ["DetectionLoss", "distribution_focal_loss", "pad_targets"]


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


class DetectionLoss:
    """YOLOv8 loss computed from raw head maps and flat pixel targets.

    Parts (each already multiplied by its gain; all are per-batch, normalised by ``S = max(sum of target scores, 1)``
    over the whole batch, not per image):

    - ``cls``: BCE-with-logits of every anchor and class against the task-aligned soft targets, summed, / S.
    - ``box``: ``1 - CIoU`` between decoded and assigned boxes (in grid units of each anchor's level) on positive
      anchors, weighted by the anchor's target score, summed, / S.
    - ``dfl``: DFL on the ltrb distances of positive anchors (targets clamped to ``reg_max - 1 - 0.01``), weighted
      and normalised as ``box``.

    ``total = (box + cls + dfl) * B``: the scaling of Ultralytics' trainer, so that its learning rates and gains carry
    over unchanged. The parts equal Ultralytics' ``v8DetectionLoss`` loss items for the same predictions and targets.

    Args:
        num_classes: number of classes C.
        strides: stride of each level, shallow to deep.
        reg_max: DFL bins per side R.
        box_gain: gain of the CIoU part.
        cls_gain: gain of the classification part.
        dfl_gain: gain of the DFL part.
        topk: positives per ground truth in the assigner.
        alpha: score exponent of the alignment metric.
        beta: IoU exponent of the alignment metric.
        min_gt_side: assigner's minimum ground-truth side for choosing candidates; default the middle stride (as
            YOLOv8), see ``TaskAlignedAssigner``.
    """

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[int],
        reg_max: int = 16,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        topk: int = 10,
        alpha: float = 0.5,
        beta: float = 6.0,
        min_gt_side: float | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.reg_max = reg_max
        self.box_gain, self.cls_gain, self.dfl_gain = box_gain, cls_gain, dfl_gain
        if min_gt_side is None:
            min_gt_side = float(self.strides[1] if len(self.strides) > 1 else self.strides[0])
        self.assigner = TaskAlignedAssigner(topk, num_classes, alpha, beta, min_gt_side=min_gt_side)

    def __call__(self, level_outputs: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss.

        Args:
            level_outputs: one ``[B, 4 * R + C, H_l, W_l]`` map per level (box logits first, then class logits).
            targets: ``[N, 6]`` rows ``(image_index, class_id, x1, y1, x2, y2)`` in network-input pixels.

        Returns:
            total: scalar ``(box + cls + dfl) * B``, differentiable, float32 (the loss runs in float32).
            parts: ``{"box", "cls", "dfl"}`` detached scalars (gains applied, not multiplied by B).
        """
        box_logits, cls_logits, anchors, stride = self._flatten(level_outputs)
        batch = cls_logits.shape[0]
        if targets.shape[0] and not ((targets[:, 1] >= 0) & (targets[:, 1] < self.num_classes)).all():
            bad = targets[:, 1][(targets[:, 1] < 0) | (targets[:, 1] >= self.num_classes)].unique().tolist()
            raise UserError(f"targets: class ids {bad} out of range [0, {self.num_classes})")
        gt_labels, gt_boxes, mask_gt = pad_targets(targets.to(cls_logits.device, torch.float32), batch)

        bins = torch.arange(self.reg_max, dtype=box_logits.dtype, device=box_logits.device)
        distances = box_logits.view(batch, -1, 4, self.reg_max).softmax(-1) @ bins  # [B, A, 4] in grid units
        pred_boxes = dist2bbox(distances, anchors)  # [B, A, 4] xyxy grid units

        _, target_boxes, target_scores, fg_mask, _ = self.assigner(
            cls_logits.detach().sigmoid(),
            (pred_boxes.detach() * stride).to(gt_boxes.dtype),
            anchors * stride,
            gt_labels,
            gt_boxes,
            mask_gt,
        )
        score_sum = target_scores.sum().clamp(min=1)
        cls_loss = F.binary_cross_entropy_with_logits(cls_logits, target_scores.to(cls_logits.dtype), reduction="none")
        cls_loss = cls_loss.sum() / score_sum

        target_boxes = target_boxes / stride  # [B, A, 4] grid units
        weight = target_scores[fg_mask].sum(-1)  # [P]
        ciou = bbox_iou(pred_boxes[fg_mask], target_boxes[fg_mask], ciou=True)  # [P]
        box_loss = ((1.0 - ciou) * weight).sum() / score_sum
        target_ltrb = bbox2dist(anchors, target_boxes, self.reg_max - 1 - 0.01)  # [B, A, 4]
        fg_logits = box_logits[fg_mask].view(-1, 4, self.reg_max)  # [P, 4, R]
        dfl_loss = (distribution_focal_loss(fg_logits, target_ltrb[fg_mask]) * weight).sum() / score_sum

        box_loss, cls_loss, dfl_loss = box_loss * self.box_gain, cls_loss * self.cls_gain, dfl_loss * self.dfl_gain
        total = (box_loss + cls_loss + dfl_loss) * batch
        return total, {"box": box_loss.detach(), "cls": cls_loss.detach(), "dfl": dfl_loss.detach()}

    def _flatten(self, level_outputs: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Concatenate the level maps over anchors and build the matching anchor grid.

        Returns:
            box_logits: ``[B, A, 4 * R]``.
            cls_logits: ``[B, A, C]``.
            anchors: ``[A, 2]`` cell centres in grid units.
            stride: ``[A, 1]``.
        """
        if len(level_outputs) != len(self.strides):
            raise UserError(f"loss: {len(level_outputs)} head levels but {len(self.strides)} strides {self.strides}")
        channels = 4 * self.reg_max + self.num_classes
        for level, out in enumerate(level_outputs):
            if out.ndim != 4 or out.shape[1] != channels:
                raise UserError(
                    f"loss: head level {level} has shape {tuple(out.shape)}, expected [B, {channels}, H, W] "
                    f"(4 * reg_max {self.reg_max} + num_classes {self.num_classes})"
                )
        # float32 whatever the head's dtype (AMP): the assigner's CIoU^6 and the sums need the range
        flat = torch.cat([out.flatten(2) for out in level_outputs], dim=2).float()  # [B, 4R + C, A]
        box_logits, cls_logits = flat.split((4 * self.reg_max, self.num_classes), dim=1)
        box_logits = box_logits.permute(0, 2, 1).contiguous()  # [B, A, 4R]
        cls_logits = cls_logits.permute(0, 2, 1).contiguous()  # [B, A, C]
        shapes = [tuple(out.shape[2:]) for out in level_outputs]
        anchors, stride = make_anchors(shapes, self.strides, device=flat.device, dtype=flat.dtype)
        return box_logits, cls_logits, anchors, stride
