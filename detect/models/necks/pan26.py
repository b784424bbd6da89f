"""YOLO26's PAN-FPN neck (layers 11-22 of Ultralytics 8.4.190's yolo26.yaml): YOLO11's data flow, C3k inner blocks
in every merge, and an attention C3k2 as the last (P5) merge.

Feature pyramid (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017, arXiv:1612.03144) plus the
path-aggregation bottom-up pass (Liu et al., "Path Aggregation Network for Instance Segmentation", CVPR 2018,
arXiv:1803.01534). The three first merges are C3k2 blocks with C3k inner blocks at every scale (yolo26.yaml asks for
them); the last is a single-block C3k2 whose inner block is a bottleneck then a position-sensitive attention block
(`AttentionC3k2`). The neck takes any backbone's three maps (strides 8/16/32); only the output widths and the block
depth come from the scale.
"""

from __future__ import annotations

from collections.abc import Sequence

from backbones.csp import scale_depth, scale_width
from backbones.csp11 import C3K2_REPEATS
from backbones.csp26 import CSP26_SCALES
from backbones.errors import UserError
from backbones.layers import AttentionC3k2, C3k2
from detect.models.necks.pan import PathAggregation
from detect.models.registry import register_neck

# Widths of the neck before scaling (yolo26.yaml's values for P3 / P4 / P5).
BASE_WIDTHS = (256, 512, 1024)
ATTENTION_REPEATS = 1  # yolo26.yaml's last merge (layer 22) repeats 1 before depth scaling: 1 at every scale


class PAN26(PathAggregation):
    """YOLO26's neck: `PathAggregation` with C3k2 (C3k inner blocks) merges and an `AttentionC3k2` last merge.

    Args:
        in_channels: channels of the backbone's (c3, c4, c5).
        channels: output channels of (p3, p4, p5).
        num_blocks: inner blocks of the three C3k2 merges (top_down_p4, top_down_p3, bottom_up_p4).
        attention_blocks: inner blocks of the attention merge (bottom_up_p5).
        strides: strides of the three levels.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: Sequence[int],
        num_blocks: int,
        attention_blocks: int = ATTENTION_REPEATS,
        strides: Sequence[int] = (8, 16, 32),
    ) -> None:
        def make_block(c_in: int, c_out: int, position: int) -> C3k2:
            if position == 3:
                return AttentionC3k2(c_in, c_out, attention_blocks)
            return C3k2(c_in, c_out, num_blocks, c3k=True)

        super().__init__(in_channels, channels, make_block, strides)


@register_neck("yolo26")
def build_yolo26_neck(in_channels: Sequence[int], strides: Sequence[int], scale: str = "n") -> PAN26:
    """The registered YOLO26 neck at one of its scales, on top of any backbone's three maps.

    Args:
        in_channels: the backbone's `out_channels` (three levels).
        strides: the backbone's `strides` (e.g. 8, 16, 32; each level twice the stride of the one before).
        scale: one of `CSP26_SCALES` ("n", "s", "m", "l", "x").

    Returns:
        A `PAN26` with widths `scale_width((256, 512, 1024))`, `scale_depth(2)` C3k blocks per C3k2 merge and one
        attention block in the last merge.
    """
    if scale not in CSP26_SCALES:
        raise UserError(f"unknown YOLO26 neck scale {scale!r}: choose one of {', '.join(CSP26_SCALES)}")
    if len(strides) != 3 or strides[1] != 2 * strides[0] or strides[2] != 2 * strides[1]:
        raise UserError(f"the YOLO26 neck needs three levels, each at twice the stride of the last, got {strides}")
    depth, width, max_channels = CSP26_SCALES[scale]
    channels = tuple(scale_width(c, width, max_channels) for c in BASE_WIDTHS)
    attention_blocks = scale_depth(ATTENTION_REPEATS, depth)
    return PAN26(in_channels, channels, scale_depth(C3K2_REPEATS, depth), attention_blocks, strides)
