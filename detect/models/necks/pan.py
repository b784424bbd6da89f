"""YOLOv8's PAN-FPN neck: a top-down (FPN) then a bottom-up (PAN) path, every merge refined by a C2f block.

Feature pyramid (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017, arXiv:1612.03144) plus the
path-aggregation bottom-up pass (Liu et al., "Path Aggregation Network for Instance Segmentation", CVPR 2018,
arXiv:1803.01534), in the form YOLOv8 uses: no lateral 1x1 convolutions, nearest upsampling, concatenation, C2f
without residuals. The neck takes any backbone's three maps (strides 8/16/32), so the input widths come from
`backbone.out_channels` and only the output widths and the block depth come from the scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from backbones.csp import CSP_SCALES, scale_depth, scale_width
from backbones.errors import UserError
from backbones.layers import C2f, ConvBNAct
from detect.models.registry import register_neck

# Widths and block count of the neck before scaling (YOLOv8's yaml values for P3 / P4 / P5 and the C2f repeats).
BASE_WIDTHS = (256, 512, 1024)
BASE_BLOCKS = 3


class PathAggregation(nn.Module):
    """Top-down then bottom-up fusion of three feature maps, a merge block after every concatenation.

    Data flow (`cat` is channel concatenation, the first operand first, as in YOLOv8 / YOLO11 so their weights load):

    - top-down:  t4 = top_down_p4(cat(up(c5), c4));   p3 = top_down_p3(cat(up(t4), c3))
    - bottom-up: p4 = bottom_up_p4(cat(downsample_p3(p3), t4));   p5 = bottom_up_p5(cat(downsample_p4(p4), c5))

    Args:
        in_channels: channels of the backbone's (c3, c4, c5).
        channels: output channels of (p3, p4, p5); `top_down_p4` also has the p4 width.
        make_block: `(c_in, c_out, position) -> module` for the four merges, position 0..3 in the order
            top_down_p4, top_down_p3, bottom_up_p4, bottom_up_p5 (YOLOv8: C2f; YOLO11: C3k2).
        strides: strides of the three levels.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: Sequence[int],
        make_block: Callable[[int, int, int], nn.Module],
        strides: Sequence[int] = (8, 16, 32),
    ) -> None:
        super().__init__()
        if len(in_channels) != 3 or len(channels) != 3 or len(strides) != 3:
            raise ValueError(f"{type(self).__name__} needs three levels, got in_channels={in_channels}, "
                             f"channels={channels}, strides={strides}")  # fmt: skip
        c3, c4, c5 = (int(c) for c in in_channels)
        w3, w4, w5 = (int(c) for c in channels)
        self.top_down_p4 = make_block(c5 + c4, w4, 0)
        self.top_down_p3 = make_block(w4 + c3, w3, 1)
        self.downsample_p3 = ConvBNAct(w3, w3, 3, 2)
        self.bottom_up_p4 = make_block(w3 + w4, w4, 2)
        self.downsample_p4 = ConvBNAct(w4, w4, 3, 2)
        self.bottom_up_p5 = make_block(w4 + c5, w5, 3)
        self.in_channels: tuple[int, int, int] = (c3, c4, c5)
        self.out_channels: tuple[int, int, int] = (w3, w4, w5)
        self.strides: tuple[int, int, int] = tuple(int(s) for s in strides)  # type: ignore[assignment]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Fuse the pyramid.

        Args:
            features: (c3 [B, C3, H/8, W/8], c4 [B, C4, H/16, W/16], c5 [B, C5, H/32, W/32]).

        Returns:
            [p3 [B, w3, H/8, W/8], p4 [B, w4, H/16, W/16], p5 [B, w5, H/32, W/32]].
        """
        c3, c4, c5 = features
        t4 = self.top_down_p4(torch.cat((_upsample_to(c5, c4), c4), dim=1))  # [B, C5 + C4, H/16, W/16] -> w4
        p3 = self.top_down_p3(torch.cat((_upsample_to(t4, c3), c3), dim=1))  # [B, w4 + C3, H/8, W/8] -> w3
        p4 = self.bottom_up_p4(torch.cat((self.downsample_p3(p3), t4), dim=1))  # [B, w3 + w4, H/16, W/16] -> w4
        p5 = self.bottom_up_p5(torch.cat((self.downsample_p4(p4), c5), dim=1))  # [B, w4 + C5, H/32, W/32] -> w5
        return [p3, p4, p5]


class PAN(PathAggregation):
    """YOLOv8's neck: `PathAggregation` with a C2f (no residuals) of `num_blocks` bottlenecks at every merge.

    Args:
        in_channels: channels of the backbone's (c3, c4, c5).
        channels: output channels of (p3, p4, p5).
        num_blocks: bottlenecks in every C2f.
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int], num_blocks: int) -> None:
        super().__init__(in_channels, channels, lambda c_in, c_out, _: C2f(c_in, c_out, num_blocks, shortcut=False))


def _upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling of `x` [B, C, h, w] -> [B, C, 2h, 2w] (the sizes must then equal `ref`'s)."""
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    if up.shape[-2:] != ref.shape[-2:]:
        raise ValueError(
            f"neck: upsampled map {tuple(up.shape[-2:])} does not match {tuple(ref.shape[-2:])}; "
            "input height and width must be multiples of 32"
        )
    return up


def build_pan(in_channels: Sequence[int], scale: str) -> PAN:
    """The YOLOv8 neck at one of the CSP scales, on top of any backbone.

    Args:
        in_channels: the backbone's `out_channels` (three levels).
        scale: one of `CSP_SCALES` ("n", "s", "m", "l", "x").

    Returns:
        A `PAN` with widths `scale_width((256, 512, 1024))` and `scale_depth(3)` bottlenecks per C2f.
    """
    if scale not in CSP_SCALES:
        raise UserError(f"unknown detector scale {scale!r}: choose one of {', '.join(CSP_SCALES)}")
    depth, width, max_channels = CSP_SCALES[scale]
    channels = tuple(scale_width(c, width, max_channels) for c in BASE_WIDTHS)
    return PAN(in_channels, channels, scale_depth(BASE_BLOCKS, depth))


@register_neck("yolov8")
def yolov8_neck(in_channels: Sequence[int], strides: Sequence[int], scale: str = "n") -> PAN:
    """The registered YOLOv8 neck: `build_pan` on three maps at strides 8/16/32."""
    if tuple(strides) != (8, 16, 32):
        raise UserError(f"the yolov8 neck needs backbone maps at strides 8, 16, 32, got {tuple(strides)}")
    return build_pan(in_channels, scale)
