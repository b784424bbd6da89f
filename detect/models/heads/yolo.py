"""The YOLO head family: YOLOv8's and YOLO11's decoupled anchor-free heads with the DFL integral of GFL.

Per level, two independent branches read the neck map: `box_branch` predicts, for each side of the box (left, top,
right, bottom), logits over `reg_max` distance bins; `cls_branch` predicts one logit per class. The box distance is
the expectation of the softmax over the bins (Li et al., "Generalized Focal Loss", NeurIPS 2020, arXiv:2006.04388),
in grid units of the level, measured from the anchor point at the cell centre. YOLOv8's class branch is two 3x3
convolutions; YOLO11's is depthwise-separable (a 3x3 depthwise then a 1x1 pointwise convolution, twice).

Registered heads: `yolov8` and `yolo11`. Their criterion is the `yolo` loss (`detect.losses.yolo`, BCE + IoU + DFL
on TaskAligned targets); `flatten_levels` and `dfl_distances` are the one decode both the head and the loss use.
Eval-mode output (also the ONNX output): `[B, A, 4 + C]`, xyxy input pixels then sigmoid scores, which
`detect.postprocess.postprocess` turns into detections by class-aware NMS.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from backbones.layers import ConvBNAct
from detect.boxes import dist2bbox, make_anchors
from detect.models.heads.base import DetectionHead
from detect.models.registry import register_head
from detect.postprocess import postprocess


def _box_branch(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """3x3 ConvBNAct -> 3x3 ConvBNAct -> 1x1 Conv2d with bias: [B, c_in, H, W] -> [B, c_out, H, W]."""
    return nn.Sequential(
        OrderedDict(
            conv1=ConvBNAct(c_in, hidden, 3), conv2=ConvBNAct(hidden, hidden, 3), pred=nn.Conv2d(hidden, c_out, 1)
        )
    )


def _separable_branch(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """YOLO11's class branch: (3x3 depthwise -> 1x1 pointwise) x 2 -> 1x1 Conv2d with bias."""
    return nn.Sequential(
        OrderedDict(
            depthwise1=ConvBNAct(c_in, c_in, 3, groups=c_in),
            pointwise1=ConvBNAct(c_in, hidden, 1),
            depthwise2=ConvBNAct(hidden, hidden, 3, groups=hidden),
            pointwise2=ConvBNAct(hidden, hidden, 1),
            pred=nn.Conv2d(hidden, c_out, 1),
        )
    )


def flatten_levels(
    level_outputs: Sequence[torch.Tensor], reg_max: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the level maps over anchors, in float32 (the loss and the decode need the range under AMP).

    Args:
        level_outputs: per-level [B, 4 * reg_max + C, H_l, W_l].

    Returns:
        box_logits [B, 4 * reg_max, A] and cls_logits [B, C, A]; anchors level by level, row-major in a level.
    """
    flat = torch.cat([o.float().flatten(2) for o in level_outputs], dim=2)  # [B, 4R + C, A]
    box_logits, cls_logits = flat.split((4 * reg_max, num_classes), dim=1)
    return box_logits, cls_logits


def dfl_distances(box_logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """The DFL expectation: per side, the softmax over the bins times the bin values (GFL's integral).

    A 1x1 convolution of the probabilities with the bin values sums in the same order as YOLOv8's, so imported
    Ultralytics weights decode to the same boxes to the last few ulps.

    Args:
        box_logits: [B, 4 * R, A].
        bins: [R] the bin values 0..R-1.

    Returns:
        [B, A, 4] ltrb distances in grid units.
    """
    batch, channels, num_anchors = box_logits.shape
    reg_max = channels // 4
    probs = box_logits.view(batch, 4, reg_max, num_anchors).transpose(1, 2).softmax(dim=1)  # [B, R, 4, A]
    distance = F.conv2d(probs, bins.to(probs.dtype).view(1, reg_max, 1, 1))  # [B, 1, 4, A]
    return distance.view(batch, 4, num_anchors).transpose(1, 2)  # [B, A, 4]


class YoloHead(DetectionHead):
    """YOLOv8 / YOLO11 decoupled head: per level a box branch (4 * reg_max bin logits) and a class branch (C logits).

    Hidden widths are Ultralytics', from the shallowest level's channels c0: box max(16, c0 // 4, 4 * reg_max),
    class max(c0, min(C, 100)).

    Args:
        num_classes: C, the number of classes.
        in_channels: channels of each input level (shallow to deep).
        strides: stride of each level in input pixels.
        reg_max: number of distance bins per box side; distances cover [0, reg_max - 1] grid cells.

    A variant overrides `box_branch_for` / `cls_branch_for` (`Yolo11Head` does); the loss, the decode and NMS come
    with the family. Every branch ends in a 1x1 `pred` convolution with a bias (`reset_bias` sets its prior).
    """

    default_loss = "yolo"

    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int],
        strides: Sequence[int],
        reg_max: int = 16,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"YoloHead: {len(in_channels)} levels of channels but {len(strides)} strides")
        if num_classes < 1 or reg_max < 1:
            raise ValueError(f"YoloHead: num_classes ({num_classes}) and reg_max ({reg_max}) must be >= 1")
        self.num_classes = int(num_classes)
        self.reg_max = int(reg_max)
        self.strides: tuple[int, ...] = tuple(int(s) for s in strides)
        self.in_channels: tuple[int, ...] = tuple(int(c) for c in in_channels)
        c0 = self.in_channels[0]
        box_hidden = max(16, c0 // 4, 4 * self.reg_max)
        cls_hidden = max(c0, min(self.num_classes, 100))
        self.box_branch = nn.ModuleList(self.box_branch_for(c, box_hidden, 4 * self.reg_max) for c in self.in_channels)
        self.cls_branch = nn.ModuleList(self.cls_branch_for(c, cls_hidden, self.num_classes) for c in self.in_channels)
        # The bin values 0..reg_max-1 of the DFL integral. A frozen Parameter rather than a buffer on purpose: YOLOv8
        # keeps them as the weight of a frozen 1x1 conv, which its parameter counts include (yolov8n: 3,157,200
        # parameters, 3,157,184 trainable), and we match those counts exactly. Optimisers must skip it
        # (requires_grad is False); `reset_bias` and loading keep it at arange(reg_max).
        self.dfl_bins = nn.Parameter(torch.arange(self.reg_max, dtype=torch.float32), requires_grad=False)
        self._anchor_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self.reset_bias()

    def box_branch_for(self, c_in: int, hidden: int, c_out: int) -> nn.Module:
        """One level's box branch: [B, c_in, H, W] -> [B, c_out = 4 * reg_max, H, W] (YOLOv8's: two 3x3 convs)."""
        return _box_branch(c_in, hidden, c_out)

    def cls_branch_for(self, c_in: int, hidden: int, c_out: int) -> nn.Module:
        """One level's class branch: [B, c_in, H, W] -> [B, c_out = C, H, W] (YOLOv8's: two 3x3 convs)."""
        return _box_branch(c_in, hidden, c_out)

    @property
    def num_outputs(self) -> int:
        """Channels of each level's output: 4 * reg_max box logits then num_classes class logits."""
        return 4 * self.reg_max + self.num_classes

    @torch.no_grad()
    def reset_bias(self) -> None:
        """YOLOv8's prior on the last biases: box bins 1.0; class log(5 / C / (640 / stride)^2).

        The class prior assumes about 5 objects per 640x640 image spread over the level's (640 / stride)^2 cells
        (the focal-loss prior of RetinaNet, Lin et al. 2017), so that early training is not swamped by negatives.
        """
        for box, cls, stride in zip(self.box_branch, self.cls_branch, self.strides, strict=True):
            box.pred.bias.fill_(1.0)
            cls.pred.bias.fill_(math.log(5 / self.num_classes / (640 / stride) ** 2))
        self.dfl_bins.copy_(torch.arange(self.reg_max, dtype=self.dfl_bins.dtype, device=self.dfl_bins.device))

    def forward(
        self,
        features: Sequence[torch.Tensor],
        image_size: tuple[int, int] | None = None,
        targets: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Raw per-level predictions (what the loss consumes); `image_size` and `targets` are not needed here.

        Args:
            features: one map per level, [B, in_channels[l], H_l, W_l].

        Returns:
            One tensor per level, [B, 4 * reg_max + C, H_l, W_l]: box bin logits first, then class logits.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"YoloHead: expected {len(self.strides)} feature maps, got {len(features)}")
        return [
            torch.cat((box(x), cls(x)), dim=1)  # [B, 4R + C, H_l, W_l]
            for x, box, cls in zip(features, self.box_branch, self.cls_branch, strict=True)
        ]

    def anchors(
        self, feature_shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor points (grid units) [A, 2] and per-anchor strides [A, 1] for these level sizes (`make_anchors`),
        cached for the last shapes."""
        key = (tuple(tuple(s) for s in feature_shapes), device, dtype)
        if self._anchor_cache is None or self._anchor_cache[0] != key:
            points, strides = make_anchors(feature_shapes, self.strides, offset=0.5, device=device, dtype=dtype)
            self._anchor_cache = (key, points, strides)
        return self._anchor_cache[1], self._anchor_cache[2]

    def decode(self, raw: Sequence[torch.Tensor], image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Boxes and scores of every anchor, computed in float32 whatever the input dtype or autocast state.

        Args:
            raw: per-level [B, 4 * reg_max + C, H_l, W_l], as returned by `forward`.

        Returns:
            [B, A, 4 + C]: xyxy boxes in input pixels, then sigmoid class scores; A = sum of H_l * W_l, anchors level
            by level and row-major inside a level (the order of `make_anchors`).
        """
        shapes = [(int(o.shape[2]), int(o.shape[3])) for o in raw]
        device = raw[0].device
        with torch.autocast(device.type, enabled=False):
            box_logits, cls_logits = flatten_levels(raw, self.reg_max, self.num_classes)  # [B, 4R, A], [B, C, A]
            distance = dfl_distances(box_logits, self.dfl_bins.float())  # [B, A, 4] ltrb, grid units
            points, stride = self.anchors(shapes, device, torch.float32)  # [A, 2], [A, 1]
            boxes = dist2bbox(distance, points) * stride  # [B, A, 4] xyxy pixels
            scores = cls_logits.transpose(1, 2).sigmoid()  # [B, A, C]
            return torch.cat((boxes, scores), dim=-1)

    def postprocess(
        self, decoded: torch.Tensor, conf: float, iou: float, max_det: int, multi_label: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Class-aware NMS over the anchors' best class above `conf`, or every (anchor, class) pair above it with
        `multi_label` (YOLOv8's validation setting)."""
        return postprocess(decoded.float(), conf, iou, max_det, multi_label=multi_label)


class Yolo11Head(YoloHead):
    """YOLO11's head (`Detect` of yolo11*.yaml): YOLOv8's box branch, a depthwise-separable class branch."""

    def cls_branch_for(self, c_in: int, hidden: int, c_out: int) -> nn.Module:
        return _separable_branch(c_in, hidden, c_out)


@register_head("yolov8")
def yolov8_head(num_classes: int, in_channels: Sequence[int], strides: Sequence[int], reg_max: int = 16) -> YoloHead:
    """YOLOv8's head (`Detect` of yolov8*.yaml)."""
    return YoloHead(num_classes, in_channels, strides, reg_max)


@register_head("yolo11")
def yolo11_head(num_classes: int, in_channels: Sequence[int], strides: Sequence[int], reg_max: int = 16) -> YoloHead:
    """YOLO11's head."""
    return Yolo11Head(num_classes, in_channels, strides, reg_max)
