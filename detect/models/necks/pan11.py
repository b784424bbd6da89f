"""YOLO11's PAN-FPN neck (layers 11-22 of Ultralytics' yolo11.yaml): YOLOv8's data flow with C3k2 blocks.

Feature pyramid (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017, arXiv:1612.03144) plus the
path-aggregation bottom-up pass (Liu et al., "Path Aggregation Network for Instance Segmentation", CVPR 2018,
arXiv:1803.01534): nearest upsampling, concatenation and a C3k2 block at every merge. The neck takes any backbone's
three maps (strides 8/16/32), so the input widths come from `backbone.out_channels`; only the output widths, the
block depth and the C3k flags come from the scale.

Parameter counts on `csp11_<scale>` equal Ultralytics' layers 11-22: n 793,696; s 3,166,400; m 8,289,792;
l 11,065,856; x 24,880,896 (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from backbones.csp import scale_depth, scale_width
from backbones.csp11 import C3K2_REPEATS, C3K_EVERYWHERE, CSP11_SCALES
from backbones.errors import UserError
from backbones.layers import C3k2, ConvBNAct
from detect.models.registry import register_neck

# Widths of the neck before scaling (yolo11.yaml's values for P3 / P4 / P5).
BASE_WIDTHS = (256, 512, 1024)
# C3k inner blocks per C3k2 (top_down_p4, top_down_p3, bottom_up_p4, bottom_up_p5) as yolo11.yaml writes them; at
# the scales in C3K_EVERYWHERE all four use C3k.
YAML_C3K = (False, False, False, True)


class PAN11(nn.Module):
    """Top-down then bottom-up fusion of three feature maps (strides 8, 16, 32) with C3k2 blocks.

    Data flow (`cat` is channel concatenation, the first operand first, as in YOLO11 so that its weights load):

    - top-down:  t4 = top_down_p4(cat(up(c5), c4));   p3 = top_down_p3(cat(up(t4), c3))
    - bottom-up: p4 = bottom_up_p4(cat(downsample_p3(p3), t4));   p5 = bottom_up_p5(cat(downsample_p4(p4), c5))

    Args:
        in_channels: channels of the backbone's (c3, c4, c5).
        channels: output channels of (p3, p4, p5); `top_down_p4` also has the p4 width.
        num_blocks: inner blocks in every C3k2.
        c3k: C3k inner blocks (True) or bottlenecks (False) for (top_down_p4, top_down_p3, bottom_up_p4,
            bottom_up_p5).
        strides: strides of the three levels.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: Sequence[int],
        num_blocks: int,
        c3k: Sequence[bool] = YAML_C3K,
        strides: Sequence[int] = (8, 16, 32),
    ) -> None:
        super().__init__()
        if len(in_channels) != 3 or len(channels) != 3 or len(strides) != 3 or len(c3k) != 4:
            raise ValueError(
                f"PAN11 needs three levels and four C3k flags, got in_channels={in_channels}, channels={channels}, "
                f"strides={strides}, c3k={c3k}"
            )
        c3, c4, c5 = (int(c) for c in in_channels)
        w3, w4, w5 = (int(c) for c in channels)
        self.top_down_p4 = C3k2(c5 + c4, w4, num_blocks, c3k[0])
        self.top_down_p3 = C3k2(w4 + c3, w3, num_blocks, c3k[1])
        self.downsample_p3 = ConvBNAct(w3, w3, 3, 2)
        self.bottom_up_p4 = C3k2(w3 + w4, w4, num_blocks, c3k[2])
        self.downsample_p4 = ConvBNAct(w4, w4, 3, 2)
        self.bottom_up_p5 = C3k2(w4 + c5, w5, num_blocks, c3k[3])
        self.in_channels: tuple[int, int, int] = (c3, c4, c5)
        self.out_channels: tuple[int, int, int] = (w3, w4, w5)
        s3, s4, s5 = (int(s) for s in strides)
        self.strides: tuple[int, int, int] = (s3, s4, s5)

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


def _upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling of `x` [B, C, h, w] -> [B, C, 2h, 2w] (the sizes must then equal `ref`'s)."""
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    if up.shape[-2:] != ref.shape[-2:]:
        raise ValueError(
            f"PAN11: upsampled map {tuple(up.shape[-2:])} does not match {tuple(ref.shape[-2:])}; "
            "input height and width must be multiples of 32"
        )
    return up


@register_neck("yolo11")
def build_yolo11_neck(in_channels: Sequence[int], strides: Sequence[int], scale: str = "n") -> PAN11:
    """The registered YOLO11 neck at one of its scales, on top of any backbone's three maps.

    Args:
        in_channels: the backbone's `out_channels` (three levels).
        strides: the backbone's `strides` (e.g. 8, 16, 32; each level twice the stride of the one before).
        scale: one of `CSP11_SCALES` ("n", "s", "m", "l", "x").

    Returns:
        A `PAN11` with widths `scale_width((256, 512, 1024))`, `scale_depth(2)` inner blocks per C3k2, and C3k
        blocks where yolo11.yaml puts them (everywhere at m, l, x, as Ultralytics' parse_model does).
    """
    if scale not in CSP11_SCALES:
        raise UserError(f"unknown YOLO11 neck scale {scale!r}: choose one of {', '.join(CSP11_SCALES)}")
    if len(strides) != 3 or strides[1] != 2 * strides[0] or strides[2] != 2 * strides[1]:
        raise UserError(f"the YOLO11 neck needs three levels, each at twice the stride of the last, got {strides}")
    depth, width, max_channels = CSP11_SCALES[scale]
    channels = tuple(scale_width(c, width, max_channels) for c in BASE_WIDTHS)
    c3k = (True,) * 4 if scale in C3K_EVERYWHERE else YAML_C3K
    return PAN11(in_channels, channels, scale_depth(C3K2_REPEATS, depth), c3k, strides)
