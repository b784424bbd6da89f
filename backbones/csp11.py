"""The YOLO11 backbone (layers 0-10 of Ultralytics' yolo11.yaml) at five scales: C3k2 stages, SPPF and C2PSA.

Parameter counts equal Ultralytics' layers 0-10: n 1,365,472; s 5,441,984; m 10,352,192; l 12,833,600;
x 28,847,328 (tested).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn

from backbones.checkpoint import load_backbone_weights
from backbones.csp import scale_depth, scale_width
from backbones.errors import UserError
from backbones.layers import C2PSA, SPPF, C3k2, ConvBNAct
from backbones.registry import register_backbone

# scale -> (depth multiple, width multiple, max channels), yolo11.yaml's values.
CSP11_SCALES: dict[str, tuple[float, float, int]] = {
    "n": (0.50, 0.25, 1024),
    "s": (0.50, 0.50, 1024),
    "m": (0.50, 1.00, 512),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.50, 512),
}
# Ultralytics' parse_model turns every C3k2 into C3k blocks at these scales, whatever the yaml says.
C3K_EVERYWHERE = frozenset({"m", "l", "x"})
STEM_CHANNELS = 64
C3K2_REPEATS = 2  # every C3k2 of yolo11.yaml repeats 2 (before depth scaling)
C2PSA_REPEATS = 2


class StageSpec(NamedTuple):
    """One backbone stage of yolo11.yaml before scaling: a stride-2 conv to `down`, then C3k2 to `out`."""

    down: int
    out: int
    expansion: float
    c3k: bool


# yolo11.yaml layers 1-8, two per stage.
STAGES = (
    StageSpec(128, 256, 0.25, False),
    StageSpec(256, 512, 0.25, False),
    StageSpec(512, 512, 0.50, True),
    StageSpec(1024, 1024, 0.50, True),
)


class CSP11(nn.Module):
    """YOLO11's backbone: a stride-2 stem, four stages (stride-2 conv + C3k2), then SPPF and C2PSA in the last.

    Args:
        depth: depth multiple (scales the C3k2 and C2PSA repeats of 2).
        width: width multiple (scales the channels of `STAGES`).
        max_channels: channel cap applied before the width multiple.
        c3k_everywhere: C3k inner blocks in every C3k2 (Ultralytics' m, l, x); else only in stages 3 and 4.

    Attributes:
        out_channels: channels of the three outputs (stages 2, 3, 4).
        strides: (8, 16, 32).
    """

    def __init__(self, depth: float, width: float, max_channels: int, c3k_everywhere: bool = False) -> None:
        super().__init__()
        stem = scale_width(STEM_CHANNELS, width, max_channels)
        self.stem = ConvBNAct(3, stem, kernel=3, stride=2)
        self.stages = nn.ModuleList()
        c_in = stem
        num_blocks = scale_depth(C3K2_REPEATS, depth)
        for i, spec in enumerate(STAGES):
            down, out = scale_width(spec.down, width, max_channels), scale_width(spec.out, width, max_channels)
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                downsample=ConvBNAct(c_in, down, kernel=3, stride=2),
                c3k2=C3k2(down, out, num_blocks, spec.c3k or c3k_everywhere, spec.expansion),
            )
            if i == len(STAGES) - 1:
                layers["sppf"] = SPPF(out, out, kernel=5)
                layers["c2psa"] = C2PSA(out, out, scale_depth(C2PSA_REPEATS, depth))
            self.stages.append(nn.Sequential(layers))
            c_in = out
        widths = [scale_width(spec.out, width, max_channels) for spec in STAGES]
        self.out_channels: tuple[int, int, int] = (widths[1], widths[2], widths[3])
        self.strides: tuple[int, int, int] = (8, 16, 32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x [B, 3, H, W]. Returns: [B, c3, H/8, W/8], [B, c4, H/16, W/16], [B, c5, H/32, W/32] (ceil)."""
        x = self.stem(x)
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                outputs.append(x)
        return outputs

    def stage_modules(self) -> list[nn.Module]:
        """Returns [stem, stage 1 (stride 4), stage 2 (8), stage 3 (16), stage 4 (32, with SPPF and C2PSA)]."""
        return [self.stem, *self.stages]


def build_csp11(scale: str, weights: str | None = None) -> CSP11:
    """Builds the YOLO11 backbone at one of its scales, optionally loading a local checkpoint.

    Args:
        scale: one of "n", "s", "m", "l", "x".
        weights: None, or the path of a backbone checkpoint (`save_backbone`) or of a plain state dict.

    Returns:
        The backbone.
    """
    if scale not in CSP11_SCALES:
        raise UserError(f"unknown YOLO11 backbone scale {scale!r}: choose one of {', '.join(CSP11_SCALES)}")
    model = CSP11(*CSP11_SCALES[scale], c3k_everywhere=scale in C3K_EVERYWHERE)
    if weights is not None:
        load_backbone_weights(model, weights, arch=f"csp11_{scale}")
    return model


@register_backbone("csp11_n")
def csp11_n(weights: str | None = None) -> CSP11:
    """YOLO11 backbone, n scale (1,365,472 parameters)."""
    return build_csp11("n", weights)


@register_backbone("csp11_s")
def csp11_s(weights: str | None = None) -> CSP11:
    """YOLO11 backbone, s scale (5,441,984 parameters)."""
    return build_csp11("s", weights)


@register_backbone("csp11_m")
def csp11_m(weights: str | None = None) -> CSP11:
    """YOLO11 backbone, m scale (10,352,192 parameters)."""
    return build_csp11("m", weights)


@register_backbone("csp11_l")
def csp11_l(weights: str | None = None) -> CSP11:
    """YOLO11 backbone, l scale (12,833,600 parameters)."""
    return build_csp11("l", weights)


@register_backbone("csp11_x")
def csp11_x(weights: str | None = None) -> CSP11:
    """YOLO11 backbone, x scale (28,847,328 parameters)."""
    return build_csp11("x", weights)
