"""The YOLO head family: YOLOv8's and YOLO11's decoupled anchor-free heads with the DFL integral of GFL.

Per level, two independent branches read the neck map: `box_branch` predicts, for each side of the box (left, top,
right, bottom), logits over `reg_max` distance bins; `cls_branch` predicts one logit per class. The box distance is
the expectation of the softmax over the bins (Li et al., "Generalized Focal Loss", NeurIPS 2020, arXiv:2006.04388),
in grid units of the level, measured from the anchor point at the cell centre. YOLOv8's class branch is two 3x3
convolutions; YOLO11's is depthwise-separable (a 3x3 depthwise then a 1x1 pointwise convolution, twice).

Registered heads: `yolov8` and `yolo11`. Their criterion is the `yolo` loss (`detect.losses.yolo`, BCE + IoU + DFL
on TaskAligned targets). `YoloDecoder` is the one decode: the head owns one, the loss and export use the head's.
Eval-mode output (also the ONNX output, since the decode is traceable): `[B, A, 4 + C]`, xyxy input pixels then
sigmoid scores, which `detect.postprocess.postprocess` turns into detections by class-aware NMS.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

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


def tracing() -> bool:
    """True while torch.jit.trace or torch.onnx.export records the graph (sizes are then graph values, not ints)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class YoloDecoder:
    """The one YOLO decode: raw level maps -> anchor points, DFL distances, xyxy boxes and class scores.

    The head owns one (`YoloHead.decoder`) and decodes through it; its loss uses the head's (`detect.losses.yolo`), so
    the anchors and the bins the loss sees are the head's; a loss built from plain numbers builds its own. It holds no
    weights, only numbers and caches: anchors per set of level sizes and device, the DFL bins per device.

    The box distance of a side is the expectation of the softmax over its `reg_max` bins (GFL's integral, Li et al.,
    "Generalized Focal Loss", NeurIPS 2020, arXiv:2006.04388), in grid units of the level, measured from the anchor
    point at the cell centre (`detect.boxes.make_anchors`).

    Args:
        num_classes: C.
        strides: stride of each level in input pixels, shallow to deep.
        reg_max: R, distance bins per box side.
    """

    max_cached_shapes: ClassVar[int] = 8  # level-size sets kept (rect validation batches have a few aspect ratios)

    def __init__(self, num_classes: int, strides: Sequence[int], reg_max: int) -> None:
        self.num_classes = int(num_classes)
        self.strides: tuple[int, ...] = tuple(int(s) for s in strides)
        self.reg_max = int(reg_max)
        self._anchors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bins: dict[torch.device, torch.Tensor] = {}

    def anchors(self, raw: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor points [A, 2] (grid units) and per-anchor strides [A, 1], float32, for these maps' sizes.

        Eager: made once per (level sizes, device) and then the same tensors (at most `max_cached_shapes` sizes kept,
        the oldest dropped). Traced (TorchScript, ONNX): computed in the graph from the maps' own sizes, since a cached
        tensor would be frozen into the file and a dynamic-shape export must take any size.
        """
        device = raw[0].device
        if tracing():
            return make_anchors([o.shape[2:] for o in raw], self.strides, device=device)
        shapes = tuple((int(o.shape[2]), int(o.shape[3])) for o in raw)
        key = (shapes, device)
        if key not in self._anchors:
            if len(self._anchors) >= self.max_cached_shapes:
                del self._anchors[next(iter(self._anchors))]  # dicts keep insertion order: the oldest
            self._anchors[key] = make_anchors(shapes, self.strides, device=device, dtype=torch.float32)
        return self._anchors[key]

    def bins(self, device: torch.device) -> torch.Tensor:
        """The DFL bin values 0..R-1, [R] float32, made once per device."""
        if device not in self._bins:
            self._bins[device] = torch.arange(self.reg_max, dtype=torch.float32, device=device)
        return self._bins[device]

    def split(self, raw: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The level maps as per-anchor box and class logits, in float32 (the loss and the decode need the range
        under AMP), with the anchors of these sizes.

        Args:
            raw: per-level [B, 4 * R + C, H_l, W_l], box bin logits first (side-major: l, t, r, b, R bins each).

        Returns:
            box_logits [B, A, 4 * R] and cls_logits [B, A, C], transposed views of one [B, 4R + C, A] tensor (so
            `reshape`, not `view`; elementwise ops then run in the maps' memory order, YOLOv8's, to the last ulp),
            anchor points [A, 2] and strides [A, 1] (`anchors`); A = sum of H_l * W_l, level by level, row-major in a
            level.
        """
        flat = torch.cat([o.float().flatten(2) for o in raw], dim=2)  # [B, 4R + C, A]
        box_flat, cls_flat = flat.split((4 * self.reg_max, self.num_classes), dim=1)  # [B, 4R, A], [B, C, A]
        points, strides = self.anchors(raw)  # [A, 2], [A, 1]
        return box_flat.transpose(1, 2), cls_flat.transpose(1, 2), points, strides

    def box_distances(self, box_logits: torch.Tensor, bins: torch.Tensor | None = None) -> torch.Tensor:
        """The DFL expectation of each side: softmax over the bins times the bin values.

        A 1x1 convolution of the probabilities with the bin values sums in the same order as YOLOv8's, so imported
        Ultralytics weights decode to the same boxes to the last few ulps.

        Args:
            box_logits: [B, A, 4 * R], as `split` returns them.
            bins: [R] bin values; default `bins(device)`. A head passes its own `dfl_bins` (the weights' values).

        Returns:
            [B, A, 4] ltrb distances in grid units.
        """
        batch, num_anchors, reg_max = box_logits.shape[0], box_logits.shape[1], self.reg_max
        bins = self.bins(box_logits.device) if bins is None else bins
        by_side = box_logits.transpose(1, 2).reshape(batch, 4, reg_max, num_anchors)  # [B, 4, R, A]
        probs = by_side.transpose(1, 2).softmax(dim=1)  # [B, R, 4, A]
        distance = F.conv2d(probs, bins.to(probs.dtype).view(1, reg_max, 1, 1))  # [B, 1, 4, A]
        return distance.view(batch, 4, num_anchors).transpose(1, 2)  # [B, A, 4]

    def decode(self, raw: Sequence[torch.Tensor], bins: torch.Tensor | None = None) -> torch.Tensor:
        """Boxes and scores of every anchor, in float32 whatever the input dtype or autocast state; traceable.

        Args:
            raw: per-level [B, 4 * R + C, H_l, W_l].
            bins: [R] bin values (see `box_distances`).

        Returns:
            [B, A, 4 + C]: xyxy boxes in input pixels, then sigmoid class scores; anchors in `split`'s order.
        """
        with torch.autocast(raw[0].device.type, enabled=False):
            box_logits, cls_logits, points, strides = self.split(raw)  # [B, A, 4R], [B, A, C], [A, 2], [A, 1]
            boxes = dist2bbox(self.box_distances(box_logits, bins), points) * strides  # [B, A, 4] xyxy pixels
            return torch.cat((boxes, cls_logits.sigmoid()), dim=-1)  # [B, A, 4 + C]


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
    `decoder` (a `YoloDecoder`) holds the anchors and the split of the raw maps; the loss is built on it.
    """

    default_loss = "yolo"
    traceable_decode = True

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
        # (requires_grad is False); `reset_bias` and loading keep it at arange(reg_max). The decode reads these, the
        # values the weights carry (an EMA-averaged file may hold them an ulp off arange, as Ultralytics' do).
        self.dfl_bins = nn.Parameter(torch.arange(self.reg_max, dtype=torch.float32), requires_grad=False)
        self.decoder = YoloDecoder(self.num_classes, self.strides, self.reg_max)  # anchors, bins, split, decode
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

    def decode(self, raw: Sequence[torch.Tensor], image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Boxes and scores of every anchor (`YoloDecoder.decode` with this head's `dfl_bins`); float32, traceable.

        Args:
            raw: per-level [B, 4 * reg_max + C, H_l, W_l], as returned by `forward`.

        Returns:
            [B, A, 4 + C]: xyxy boxes in input pixels, then sigmoid class scores; A = sum of H_l * W_l, anchors level
            by level and row-major inside a level (the order of `make_anchors`).
        """
        return self.decoder.decode(raw, self.dfl_bins)

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
