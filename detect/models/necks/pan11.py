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

from backbones.csp import scale_depth, scale_width
from backbones.csp11 import C3K2_REPEATS, C3K_EVERYWHERE, CSP11_SCALES
from backbones.errors import UserError
from backbones.layers import C3k2
from detect.models.necks.pan import PathAggregation
from detect.models.registry import register_neck

# Widths of the neck before scaling (yolo11.yaml's values for P3 / P4 / P5).
BASE_WIDTHS = (256, 512, 1024)
# C3k inner blocks per C3k2 (top_down_p4, top_down_p3, bottom_up_p4, bottom_up_p5) as yolo11.yaml writes them; at
# the scales in C3K_EVERYWHERE all four use C3k.
YAML_C3K = (False, False, False, True)


class PAN11(PathAggregation):
    """YOLO11's neck: YOLOv8's data flow (`PathAggregation`) with a C3k2 block at every merge.

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
        if len(c3k) != 4:
            raise ValueError(f"PAN11 needs four C3k flags, got {c3k}")
        super().__init__(in_channels, channels, lambda c_in, c_out, i: C3k2(c_in, c_out, num_blocks, c3k[i]), strides)


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
