"""The YOLO26 loss: a one-to-many and a one-to-one branch, each BCE classification + CIoU box + L1 distances on
task-aligned targets, weighted o2m 0.8 -> 0.1 over the epochs. Registered as `yolo26`, the `yolo26` head's criterion.

Per branch (`DistanceLoss`), with the sums normalised by S = max(sum of target scores, 1) over the batch:

- ``cls``: BCE-with-logits of every anchor and class against the soft task-aligned targets, / S.
- ``box``: ``1 - CIoU`` of decoded and assigned boxes on positive anchors, weighted by their target score, / S.
- ``l1``: L1 between predicted and assigned ltrb distances in image units (pixels divided by the input width for
  left/right and its height for top/bottom), averaged over the four sides, weighted and normalised as ``box``. The
  head predicts the distances directly (reg_max 1), so this replaces YOLOv8's DFL term and takes its gain.

The one-to-many branch assigns TaskAligned's ``topk`` 10 anchors per object; the one-to-one branch 7, of which only
the best-aligned one stays (``topk2`` 1, `OneToOneAssigner`): one anchor per object, what the NMS-free decode needs
(the consistent dual assignment of YOLOv10, Wang et al., NeurIPS 2024, arXiv:2405.14458). ``total = w_o2m * T_o2m +
w_o2o * T_o2o`` with ``T = (box + cls + l1) * B`` per branch; ``w_o2m`` falls linearly from 0.8 at the first epoch to
0.1 at the last, and ``w_o2o = 1 - w_o2m`` (`o2m_weight`; the engine calls `set_epoch` at each epoch start). The
parts reported are the one-to-one branch's, as Ultralytics logs them. Every number equals Ultralytics 8.4.190's
`E2ELoss` (`tests/test_yolo26.py`).

References: Zheng et al., "Distance-IoU Loss" (CIoU), AAAI 2020, arXiv:1911.08287; Feng et al., "TOOD", ICCV 2021,
arXiv:2108.07755.
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
from detect.losses.yolo import pad_targets
from detect.models.heads.yolo26 import EndToEndDecoder

__all__ = ["DistanceLoss", "EndToEndLoss", "OneToOneAssigner", "build_yolo26_loss", "o2m_weight"]


def o2m_weight(epoch: int, epochs: int, start: float = 0.8, final: float = 0.1) -> float:
    """The one-to-many weight at (0-based) `epoch` of `epochs`: `start` at the first epoch, linearly down to `final`
    at the last (Ultralytics' `E2ELoss.decay`, in its order of operations, so the floats are the same)."""
    return max(1 - epoch / max(epochs - 1, 1), 0) * (start - final) + final


class OneToOneAssigner(TaskAlignedAssigner):
    """`TaskAlignedAssigner` that keeps, of each object's positives (after conflicts are resolved), only the `topk2`
    with the highest alignment metric: with `topk2` 1, one anchor per object.

    Args:
        topk2: positives kept per ground truth; the other arguments are `TaskAlignedAssigner`'s.
    """

    def __init__(self, topk: int = 7, num_classes: int = 80, topk2: int = 1, **kwargs: Any) -> None:
        super().__init__(topk, num_classes, **kwargs)
        self.topk2 = topk2

    def _keep_positives(self, pos: Tensor, align: Tensor) -> Tensor:
        """Of each object's positives, only the `topk2` with the highest alignment metric."""
        best = (align * pos).topk(min(self.topk2, pos.shape[-1]), dim=-1).indices  # [B, M, topk2]
        return pos & torch.zeros_like(pos).scatter_(-1, best, True)  # [B, M, A]


class DistanceLoss:
    """One branch of the YOLO26 loss (see the module docstring): BCE + CIoU + L1 on raw ltrb distances.

    Args:
        decoder: the head's `EndToEndDecoder` (anchors, split of the raw maps).
        assigner: `TaskAlignedAssigner` (one-to-many) or `OneToOneAssigner`.
        box_gain, cls_gain, l1_gain: gains of the parts.
        iou: the box part's overlap: "ciou" (YOLO26's), "diou", "giou" or "iou".
    """

    def __init__(
        self,
        decoder: EndToEndDecoder,
        assigner: TaskAlignedAssigner,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        l1_gain: float = 1.5,
        iou: str = "ciou",
    ) -> None:
        if iou not in IOU_KINDS:
            raise ValueError(f"DistanceLoss: unknown iou {iou!r}; choose one of {', '.join(IOU_KINDS)}")
        self.decoder, self.assigner, self.iou = decoder, assigner, iou
        self.box_gain, self.cls_gain, self.l1_gain = box_gain, cls_gain, l1_gain

    def __call__(self, level_outputs: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: level_outputs, one [B, 4 + C, H_l, W_l] map per level; targets [N, 6] (image, class, xyxy pixels).

        Returns:
            total: scalar (box + cls + l1) * B; parts: {"box", "cls", "l1"} detached, gains applied.
        """
        _check_levels(level_outputs, self.decoder)
        box_logits, cls_logits, anchors, stride = self.decoder.split(level_outputs)  # [B,A,4] [B,A,C] [A,2] [A,1]
        cls_logits = cls_logits.contiguous()  # [B, A, C]
        batch = cls_logits.shape[0]
        height, width = level_outputs[0].shape[2:]
        size = cls_logits.new_tensor([width, height, width, height]) * self.decoder.strides[0]  # [4] input W, H
        gt_labels, gt_boxes, mask_gt = pad_targets(targets.to(cls_logits.device, torch.float32), batch)
        distances = self.decoder.box_distances(box_logits)  # [B, A, 4] grid units
        pred_boxes = dist2bbox(distances, anchors)  # [B, A, 4] xyxy grid units
        assigned = self.assigner(cls_logits.detach().sigmoid(), (pred_boxes.detach() * stride).to(gt_boxes.dtype),
                                 anchors * stride, gt_labels, gt_boxes, mask_gt)  # fmt: skip
        target_scores, fg_mask = assigned.target_scores, assigned.fg_mask
        score_sum = target_scores.sum().clamp(min=1)
        cls_loss = F.binary_cross_entropy_with_logits(cls_logits, target_scores.to(cls_logits.dtype), reduction="none")
        cls_loss = cls_loss.sum() / score_sum

        target_boxes = assigned.target_bboxes / stride  # [B, A, 4] grid units
        weight = target_scores[fg_mask].sum(-1, keepdim=True)  # [P, 1]
        overlap = box_overlap(pred_boxes[fg_mask], target_boxes[fg_mask], self.iou).unsqueeze(-1)  # [P, 1]
        box_loss = ((1.0 - overlap) * weight).sum() / score_sum
        target_ltrb = bbox2dist(anchors, target_boxes) * stride / size  # [B, A, 4] in image units
        pred_ltrb = distances * stride / size  # [B, A, 4]
        l1 = F.l1_loss(pred_ltrb[fg_mask], target_ltrb[fg_mask], reduction="none").mean(-1, keepdim=True)  # [P, 1]
        l1_loss = (l1 * weight).sum() / score_sum

        box_loss, cls_loss, l1_loss = box_loss * self.box_gain, cls_loss * self.cls_gain, l1_loss * self.l1_gain
        total = (box_loss + cls_loss + l1_loss) * batch
        return total, {"box": box_loss.detach(), "cls": cls_loss.detach(), "l1": l1_loss.detach()}


def _check_levels(level_outputs: Sequence[Tensor], decoder: EndToEndDecoder) -> None:
    """One [B, 4 + C, H, W] map per stride, or a UserError naming the level and the expected shape."""
    if len(level_outputs) != len(decoder.strides):
        raise UserError(f"loss: {len(level_outputs)} head levels but {len(decoder.strides)} strides {decoder.strides}")
    for level, out in enumerate(level_outputs):
        if out.ndim != 4 or out.shape[1] != 4 + decoder.num_classes:
            raise UserError(f"loss: head level {level} has shape {tuple(out.shape)}, expected "
                            f"[B, {4 + decoder.num_classes}, H, W] (4 distances + num_classes)")  # fmt: skip


class EndToEndLoss:
    """The YOLO26 criterion: `w_o2m * one2many + w_o2o * one2one` (see the module docstring).

    Args:
        one2many: the one-to-many branch's loss (TaskAligned topk 10).
        one2one: the one-to-one branch's loss (`OneToOneAssigner`, topk 7, topk2 1).
        o2m_start, o2m_final: the one-to-many weight at the first and the last epoch.

    Attributes:
        o2m, o2o: the branch weights of the current epoch (`set_epoch`); before any call, the first epoch's.
    """

    def __init__(
        self, one2many: DistanceLoss, one2one: DistanceLoss, o2m_start: float = 0.8, o2m_final: float = 0.1
    ) -> None:
        self.one2many, self.one2one = one2many, one2one
        self.o2m_start, self.o2m_final = o2m_start, o2m_final
        self.o2m = o2m_start
        self.o2o = max(1.0 - self.o2m, 0)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """The branch weights of (0-based) `epoch` of `epochs` (`o2m_weight`); the engine calls it at each epoch
        start, so a resumed run has the weights of its epoch."""
        self.o2m = o2m_weight(epoch, epochs, self.o2m_start, self.o2m_final)
        self.o2o = max(1.0 - self.o2m, 0)

    def __call__(self, raw: Mapping[str, Sequence[Tensor]], targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Args: raw, the head's training outputs {"one2many", "one2one"}; targets [N, 6].

        Returns:
            total: w_o2m * T_o2m + w_o2o * T_o2o; parts: the one-to-one branch's {"box", "cls", "l1"}.
        """
        if "one2many" not in raw:
            raise UserError("the yolo26 loss needs the head's training outputs (one2many and one2one branches)")
        total_o2m, _ = self.one2many(raw["one2many"], targets)
        total_o2o, parts = self.one2one(raw["one2one"], targets)
        return total_o2m * self.o2m + total_o2o * self.o2o, parts


def build_yolo26_loss(
    decoder: EndToEndDecoder,
    box: float = 7.5,
    cls: float = 0.5,
    dfl: float = 1.5,
    iou: str = "ciou",
    topk: int = 10,
    topk_one2one: int = 7,
    topk2: int = 1,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
    assign_iou: str = "ciou",
    min_gt_side: float | None = None,
    o2m: float = 0.8,
    o2m_final: float = 0.1,
) -> EndToEndLoss:
    """The YOLO26 loss from plain numbers (Ultralytics 8.4.190's defaults). `dfl` is the gain of the L1 distance
    term (Ultralytics' `dfl` hyperparameter, which YOLO26 gives to L1); `min_gt_side` None is the middle stride."""
    strides = decoder.strides
    if min_gt_side is None:
        min_gt_side = float(strides[1] if len(strides) > 1 else strides[0])
    shared = {"alpha": alpha, "beta": beta, "eps": eps, "min_gt_side": min_gt_side, "iou": assign_iou}
    one2many = TaskAlignedAssigner(topk, decoder.num_classes, **shared)
    one2one = OneToOneAssigner(topk_one2one, decoder.num_classes, topk2, **shared)
    return EndToEndLoss(DistanceLoss(decoder, one2many, box, cls, dfl, iou),
                        DistanceLoss(decoder, one2one, box, cls, dfl, iou), o2m, o2m_final)  # fmt: skip


LOSS_KEYS = ("box", "cls", "dfl", "iou", "topk_one2one", "topk2", "o2m", "o2m_final")
ASSIGN_KEYS = ("topk", "alpha", "beta", "eps", "iou", "min_gt_side")


@register_loss("yolo26", loss_keys=LOSS_KEYS, assign_keys=ASSIGN_KEYS)
def yolo26_loss(head: Any, loss: Mapping[str, Any], assign: Mapping[str, Any]) -> EndToEndLoss:
    """The registered `yolo26` loss of a YOLO26 head, from `loss.*` (box, cls, dfl = the L1 gain, iou; in
    `loss.kwargs`: topk_one2one, topk2, o2m, o2m_final) and `assign.*` (topk, alpha, beta, eps, iou, min_gt_side)."""
    decoder = getattr(head, "decoder", None)
    if not isinstance(decoder, EndToEndDecoder):
        raise UserError(f"the yolo26 loss needs a yolo26 head (raw distances, one-to-one branch), not {type(head)}")
    kwargs = {k: v for k, v in loss.items() if k in LOSS_KEYS}
    kwargs.update({("assign_iou" if k == "iou" else k): v for k, v in assign.items() if k in ASSIGN_KEYS})
    return build_yolo26_loss(decoder, **kwargs)
