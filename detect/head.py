"""Decoupled anchor-free detection head (YOLOv8) with the DFL integral of Generalized Focal Loss.

Per level, two independent branches read the neck map: `box_branch` predicts, for each side of the box (left, top,
right, bottom), logits over `reg_max` distance bins; `cls_branch` predicts one logit per class. The box distance is
the expectation of the softmax over the bins (Li et al., "Generalized Focal Loss", NeurIPS 2020, arXiv:2006.04388),
in grid units of the level, measured from the anchor point at the cell centre.
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


def _branch(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """3x3 ConvBNAct -> 3x3 ConvBNAct -> 1x1 Conv2d with bias: [B, c_in, H, W] -> [B, c_out, H, W]."""
    return nn.Sequential(
        OrderedDict(
            conv1=ConvBNAct(c_in, hidden, 3),
            conv2=ConvBNAct(hidden, hidden, 3),
            pred=nn.Conv2d(hidden, c_out, 1),
        )
    )


class DetectHead(nn.Module):
    """YOLOv8's decoupled head: per level a box branch (4 * reg_max bin logits) and a class branch (C logits).

    Hidden widths are YOLOv8's, from the shallowest level's channels c0: box max(16, c0 // 4, 4 * reg_max),
    class max(c0, min(C, 100)).

    Args:
        num_classes: C, the number of classes.
        in_channels: channels of each input level (shallow to deep).
        strides: stride of each level in input pixels.
        reg_max: number of distance bins per box side; distances cover [0, reg_max - 1] grid cells.
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int], strides: Sequence[int], reg_max: int = 16) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"DetectHead: {len(in_channels)} levels of channels but {len(strides)} strides")
        if num_classes < 1 or reg_max < 1:
            raise ValueError(f"DetectHead: num_classes ({num_classes}) and reg_max ({reg_max}) must be >= 1")
        self.num_classes = int(num_classes)
        self.reg_max = int(reg_max)
        self.strides: tuple[int, ...] = tuple(int(s) for s in strides)
        self.in_channels: tuple[int, ...] = tuple(int(c) for c in in_channels)
        c0 = self.in_channels[0]
        box_hidden = max(16, c0 // 4, 4 * self.reg_max)
        cls_hidden = max(c0, min(self.num_classes, 100))
        self.box_branch = nn.ModuleList(_branch(c, box_hidden, 4 * self.reg_max) for c in self.in_channels)
        self.cls_branch = nn.ModuleList(_branch(c, cls_hidden, self.num_classes) for c in self.in_channels)
        # The bin values 0..reg_max-1 of the DFL integral. A frozen Parameter rather than a buffer on purpose: YOLOv8
        # keeps them as the weight of a frozen 1x1 conv, which its parameter counts include (yolov8n: 3,157,200
        # parameters, 3,157,184 trainable), and we match those counts exactly. Optimisers must skip it
        # (requires_grad is False); `reset_bias` and loading keep it at arange(reg_max).
        self.dfl_bins = nn.Parameter(torch.arange(self.reg_max, dtype=torch.float32), requires_grad=False)
        self._anchor_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self.reset_bias()

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

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Raw per-level predictions (what the loss consumes).

        Args:
            features: one map per level, [B, in_channels[l], H_l, W_l].

        Returns:
            One tensor per level, [B, 4 * reg_max + C, H_l, W_l]: box bin logits first, then class logits.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"DetectHead: expected {len(self.strides)} feature maps, got {len(features)}")
        return [
            torch.cat((box(x), cls(x)), dim=1)  # [B, 4R + C, H_l, W_l]
            for x, box, cls in zip(features, self.box_branch, self.cls_branch, strict=True)
        ]

    def anchors(
        self, feature_shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor points (grid units) and per-anchor strides for these level sizes, cached for the last shapes.

        Args:
            feature_shapes: (H_l, W_l) per level.
            device: device of the outputs.
            dtype: dtype of the outputs.

        Returns:
            points [A, 2] (x, y) cell centres in grid units; stride_per_anchor [A, 1].
        """
        key = (tuple(tuple(s) for s in feature_shapes), device, dtype)
        if self._anchor_cache is None or self._anchor_cache[0] != key:
            points, strides = make_anchors(feature_shapes, self.strides, offset=0.5, device=device, dtype=dtype)
            self._anchor_cache = (key, points, strides)
        return self._anchor_cache[1], self._anchor_cache[2]

    def decode(self, level_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Boxes and scores of every anchor, computed in float32 whatever the input dtype or autocast state.

        The DFL expectation is a 1x1 convolution of the bin probabilities with the bin values, which sums in the
        same order as YOLOv8 does, so imported Ultralytics weights decode to the same boxes to the last few ulps.

        Args:
            level_outputs: per-level [B, 4 * reg_max + C, H_l, W_l], as returned by `forward`.

        Returns:
            [B, A, 4 + C]: xyxy boxes in input pixels, then sigmoid class scores; A = sum of H_l * W_l, anchors level
            by level and row-major inside a level (the order of `make_anchors`).
        """
        batch, reg_max = level_outputs[0].shape[0], self.reg_max
        shapes = [(int(o.shape[2]), int(o.shape[3])) for o in level_outputs]
        device = level_outputs[0].device
        with torch.autocast(device.type, enabled=False):
            flat = torch.cat([o.float().flatten(2) for o in level_outputs], dim=2)  # [B, 4R + C, A]
            num_anchors = flat.shape[2]
            box_logits, cls_logits = flat.split((4 * reg_max, self.num_classes), dim=1)
            probs = box_logits.view(batch, 4, reg_max, num_anchors).transpose(1, 2).softmax(dim=1)  # [B, R, 4, A]
            bins = self.dfl_bins.float().view(1, reg_max, 1, 1)
            distance = F.conv2d(probs, bins).view(batch, 4, num_anchors).transpose(1, 2)  # [B, A, 4] ltrb, grid units
            points, stride = self.anchors(shapes, device, torch.float32)  # [A, 2], [A, 1]
            boxes = dist2bbox(distance, points) * stride  # [B, A, 4] xyxy pixels
            scores = cls_logits.transpose(1, 2).sigmoid()  # [B, A, C]
            return torch.cat((boxes, scores), dim=-1)
