"""Task-aligned label assignment (TOOD) for anchor-free detection.

Reference: Feng et al., "TOOD: Task-aligned One-stage Object Detection", ICCV 2021, arXiv:2108.07755. YOLOv8 and
YOLO11 use the same assigner with CIoU as the overlap (the default `iou`; DIoU, GIoU and plain IoU are settings);
this module reproduces their assignments exactly (tested against Ultralytics' implementation), written
independently.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from detect.boxes import IOU_KINDS, box_overlap, cxcywh2xyxy, xyxy2cxcywh

__all__ = ["AssignResult", "TaskAlignedAssigner"]


class AssignResult(NamedTuple):
    """Targets per anchor (B images, A anchors, C classes); see `TaskAlignedAssigner.forward`."""

    target_labels: Tensor  # [B, A] int64
    target_bboxes: Tensor  # [B, A, 4] xyxy
    target_scores: Tensor  # [B, A, C]
    fg_mask: Tensor  # [B, A] bool
    target_gt_idx: Tensor  # [B, A] int64


class TaskAlignedAssigner(nn.Module):
    """Assign ground-truth boxes to anchors by the task-alignment metric t = s^alpha * u^beta.

    For every ground truth, ``s`` is the predicted score of its class at an anchor and ``u`` the overlap (``iou``,
    CIoU by default, clamped at 0)
    between it and the anchor's predicted box. The positives of a ground truth are its ``topk`` anchors by ``t`` among
    the anchors whose centre lies strictly inside it. An anchor claimed by several ground truths goes to the one it
    overlaps most (highest CIoU over all ground truths containing it). The soft class target of a positive anchor is
    ``t / max_t * max_u`` of its ground truth (maxima over that ground truth's positives), so the best-aligned anchor
    of each object gets a target equal to its best IoU (TOOD's normalised alignment target).

    The module is stateless: all shapes are read from the inputs at every call.

    Args:
        topk: positives per ground truth (before conflicts are resolved).
        num_classes: number of classes C.
        alpha: exponent of the classification score in the metric.
        beta: exponent of the IoU in the metric.
        eps: guard in the normalisation of the metric.
        min_gt_side: for choosing candidate anchors only, a ground-truth side shorter than this (pixels) is widened
            to it about the box centre, so that tiny objects still contain anchor centres; targets keep the true box.
            YOLOv8 (Ultralytics 8.3+) uses its middle stride, 16. ``0`` turns it off.
        iou: the overlap ``u``: "ciou" (YOLOv8's), "diou", "giou" or "iou".
    """

    def __init__(
        self,
        topk: int = 10,
        num_classes: int = 80,
        alpha: float = 0.5,
        beta: float = 6.0,
        eps: float = 1e-9,
        min_gt_side: float = 16.0,
        iou: str = "ciou",
    ) -> None:
        super().__init__()
        if iou not in IOU_KINDS:
            raise ValueError(f"TaskAlignedAssigner: unknown iou {iou!r}; choose one of {', '.join(IOU_KINDS)}")
        self.iou = iou
        self.topk = topk
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.eps = eps
        self.min_gt_side = min_gt_side

    @torch.no_grad()
    def forward(
        self,
        pd_scores: Tensor,
        pd_bboxes: Tensor,
        anc_points: Tensor,
        gt_labels: Tensor,
        gt_bboxes: Tensor,
        mask_gt: Tensor,
    ) -> AssignResult:
        """Assign targets for a padded batch of ground truths.

        Args:
            pd_scores: ``[B, A, C]`` predicted class probabilities (after sigmoid).
            pd_bboxes: ``[B, A, 4]`` predicted xyxy boxes, same unit as ``anc_points`` and ``gt_bboxes`` (pixels).
            anc_points: ``[A, 2]`` anchor centres (x, y).
            gt_labels: ``[B, M, 1]`` class ids (any numeric dtype); padding rows arbitrary.
            gt_bboxes: ``[B, M, 4]`` xyxy ground-truth boxes; padding rows arbitrary.
            mask_gt: ``[B, M, 1]`` 1 for real ground truths, 0 for padding.

        Returns:
            target_labels: ``[B, A]`` int64 class of the assigned ground truth (meaningful only where ``fg_mask``;
                elsewhere the class of ground truth 0, or C when M == 0).
            target_bboxes: ``[B, A, 4]`` xyxy box of the assigned ground truth (meaningful only where ``fg_mask``).
            target_scores: ``[B, A, C]`` soft one-hot targets, zero on background anchors.
            fg_mask: ``[B, A]`` bool, True for positive anchors.
            target_gt_idx: ``[B, A]`` int64 index into M of the assigned ground truth (0 on background).
        """
        batch, num_anchors, _ = pd_scores.shape
        if gt_bboxes.shape[1] == 0:
            return self._empty(pd_scores, pd_bboxes)

        valid = mask_gt.bool()  # [B, M, 1]
        inside = self._anchors_inside(anc_points, gt_bboxes, valid)  # [B, M, A]
        align, overlaps = self._pair_metrics(pd_scores, pd_bboxes, gt_labels, gt_bboxes, inside & valid)
        pos = self._topk_mask(align, valid) & inside & valid  # [B, M, A]
        pos = self._resolve_conflicts(pos, overlaps)  # [B, M, A], at most one True per anchor
        pos = self._keep_positives(pos, align)  # [B, M, A]

        fg_mask, target_gt_idx = pos.to(torch.uint8).max(dim=1)  # [B, A] each
        fg_mask = fg_mask.bool()
        target_labels = gt_labels.long().squeeze(-1).gather(1, target_gt_idx).clamp(min=0)  # [B, A]
        target_bboxes = gt_bboxes.gather(1, target_gt_idx.unsqueeze(-1).expand(-1, -1, 4))  # [B, A, 4]

        # Soft targets: t * max_u / max_t per ground truth, then the (unique) assigned ground truth per anchor.
        align = align * pos
        overlaps = overlaps * pos
        best_align = align.amax(dim=-1, keepdim=True)  # [B, M, 1]
        best_overlap = overlaps.amax(dim=-1, keepdim=True)  # [B, M, 1]
        norm = (align * best_overlap / (best_align + self.eps)).amax(dim=1).unsqueeze(-1)  # [B, A, 1]
        one_hot = torch.zeros(batch, num_anchors, self.num_classes, dtype=norm.dtype, device=norm.device)
        one_hot.scatter_(2, target_labels.unsqueeze(-1), 1.0)  # [B, A, C]
        target_scores = one_hot * fg_mask.unsqueeze(-1) * norm
        return AssignResult(target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx)

    def _keep_positives(self, pos: Tensor, align: Tensor) -> Tensor:
        """The positives ``[B, M, A]`` after conflicts are resolved, as the targets use them: all of them here; a
        subclass may keep fewer (YOLO26's one-to-one assigner keeps each object's best)."""
        return pos

    def _empty(self, pd_scores: Tensor, pd_bboxes: Tensor) -> AssignResult:
        """Outputs when no image of the batch has a ground truth: everything is background."""
        batch, num_anchors, _ = pd_scores.shape
        labels = torch.full((batch, num_anchors), self.num_classes, dtype=torch.long, device=pd_scores.device)
        fg_mask = torch.zeros(batch, num_anchors, dtype=torch.bool, device=pd_scores.device)
        gt_idx = torch.zeros(batch, num_anchors, dtype=torch.long, device=pd_scores.device)
        return AssignResult(labels, torch.zeros_like(pd_bboxes), torch.zeros_like(pd_scores), fg_mask, gt_idx)

    def _anchors_inside(self, points: Tensor, gt_bboxes: Tensor, valid: Tensor) -> Tensor:
        """Anchors whose centre lies strictly (by more than ``eps``) inside each ground truth.

        Args:
            points: ``[A, 2]`` anchor centres.
            gt_bboxes: ``[B, M, 4]`` xyxy.
            valid: ``[B, M, 1]`` bool mask of real ground truths.

        Returns:
            ``[B, M, A]`` bool.
        """
        if self.min_gt_side > 0:
            centre_size = xyxy2cxcywh(gt_bboxes)  # [B, M, 4]
            too_small = (centre_size[..., 2:] < self.min_gt_side) & valid  # [B, M, 2]
            widened = torch.where(too_small, centre_size.new_tensor(self.min_gt_side), centre_size[..., 2:])
            gt_bboxes = cxcywh2xyxy(torch.cat((centre_size[..., :2], widened), dim=-1))
        x, y = points[:, 0], points[:, 1]  # [A] each
        x1, y1, x2, y2 = (gt_bboxes[..., i : i + 1] for i in range(4))  # [B, M, 1] each
        eps = 1e-9  # an anchor centre on an edge is outside
        return (x - x1 > eps) & (y - y1 > eps) & (x2 - x > eps) & (y2 - y > eps)

    def _pair_metrics(
        self, pd_scores: Tensor, pd_bboxes: Tensor, gt_labels: Tensor, gt_bboxes: Tensor, candidates: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Alignment metric and overlap for every (image, ground truth, anchor) candidate pair; 0 elsewhere.

        Args:
            pd_scores: ``[B, A, C]``.
            pd_bboxes: ``[B, A, 4]``.
            gt_labels: ``[B, M, 1]``.
            gt_bboxes: ``[B, M, 4]``.
            candidates: ``[B, M, A]`` bool.

        Returns:
            align: ``[B, M, A]`` s^alpha * u^beta.
            overlaps: ``[B, M, A]`` overlap clamped at 0.
        """
        img, gt, anc = candidates.nonzero(as_tuple=True)  # [P] each
        labels = gt_labels[img, gt, 0].long()  # [P]
        scores = pd_scores[img, anc, labels]  # [P]
        ious = box_overlap(gt_bboxes[img, gt], pd_bboxes[img, anc], self.iou).clamp(min=0)  # [P]
        overlaps = torch.zeros(candidates.shape, dtype=pd_bboxes.dtype, device=pd_bboxes.device)
        align = torch.zeros(candidates.shape, dtype=pd_scores.dtype, device=pd_scores.device)
        overlaps[img, gt, anc] = ious
        align[img, gt, anc] = scores.pow(self.alpha) * ious.pow(self.beta)
        return align, overlaps

    def _topk_mask(self, align: Tensor, valid: Tensor) -> Tensor:
        """The ``topk`` anchors by metric of each real ground truth.

        Args:
            align: ``[B, M, A]`` alignment metric.
            valid: ``[B, M, 1]`` bool.

        Returns:
            ``[B, M, A]`` bool.
        """
        k = min(self.topk, align.shape[-1])
        top_idx = align.topk(k, dim=-1, largest=True).indices  # [B, M, k]
        chosen = torch.zeros(align.shape, dtype=torch.bool, device=align.device)
        chosen.scatter_(-1, top_idx, True)
        return chosen & valid

    @staticmethod
    def _resolve_conflicts(pos: Tensor, overlaps: Tensor) -> Tensor:
        """Give each anchor claimed by several ground truths to the ground truth it overlaps most.

        Args:
            pos: ``[B, M, A]`` bool positives.
            overlaps: ``[B, M, A]`` CIoU of the candidate pairs (0 elsewhere).

        Returns:
            ``[B, M, A]`` bool positives with at most one ground truth per anchor.
        """
        shared = (pos.sum(dim=1, keepdim=True) > 1).expand_as(pos)  # [B, M, A]
        best = overlaps.max(dim=1).indices  # [B, A]
        best_one_hot = torch.zeros_like(pos).scatter_(1, best.unsqueeze(1), True)  # [B, M, A]
        return torch.where(shared, best_one_hot, pos)
