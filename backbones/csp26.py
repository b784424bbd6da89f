"""The YOLO26 backbone (layers 0-10 of Ultralytics 8.4.190's yolo26.yaml) at five scales.

YOLO11's backbone (`backbones.csp11`: the same stem, C3k2 stages, scales and C2PSA) with YOLO26's SPPF: an
unactivated 1x1 reduction and a residual connection (`ResidualSPPF`). The SPPF adds no parameter, so the counts equal
YOLO11's layers 0-10: n 1,365,472; s 5,441,984; m 10,352,192; l 12,833,600; x 28,847,328 (tested).
"""

from __future__ import annotations

from backbones.checkpoint import load_backbone_weights
from backbones.csp11 import C3K_EVERYWHERE, CSP11, CSP11_SCALES
from backbones.errors import UserError
from backbones.layers import ResidualSPPF
from backbones.registry import register_backbone

# scale -> (depth multiple, width multiple, max channels): yolo26.yaml's values, the same as yolo11.yaml's.
CSP26_SCALES = CSP11_SCALES
SPPF_KERNEL = 5


class CSP26(CSP11):
    """YOLO26's backbone: `CSP11` whose last stage's SPPF is YOLO26's `ResidualSPPF`.

    Args:
        depth: depth multiple (scales the C3k2 and C2PSA repeats of 2).
        width: width multiple.
        max_channels: channel cap applied before the width multiple.
        c3k_everywhere: C3k inner blocks in every C3k2 (Ultralytics' m, l, x); else only in stages 3 and 4.

    Attributes:
        out_channels: channels of the three outputs (stages 2, 3, 4).
        strides: (8, 16, 32).
    """

    def __init__(self, depth: float, width: float, max_channels: int, c3k_everywhere: bool = False) -> None:
        super().__init__(depth, width, max_channels, c3k_everywhere)
        last = self.stages[-1]
        channels = self.out_channels[-1]
        last.sppf = ResidualSPPF(channels, channels, SPPF_KERNEL)  # same place in the stage, same child names


def build_csp26(scale: str, weights: str | None = None) -> CSP26:
    """Builds the YOLO26 backbone at one of its scales, optionally loading a local checkpoint.

    Args:
        scale: one of "n", "s", "m", "l", "x".
        weights: None, or the path of a backbone checkpoint (`save_backbone`) or of a plain state dict.

    Returns:
        The backbone.
    """
    if scale not in CSP26_SCALES:
        raise UserError(f"unknown YOLO26 backbone scale {scale!r}: choose one of {', '.join(CSP26_SCALES)}")
    model = CSP26(*CSP26_SCALES[scale], c3k_everywhere=scale in C3K_EVERYWHERE)
    if weights is not None:
        load_backbone_weights(model, weights, arch=f"csp26_{scale}")
    return model


@register_backbone("csp26_n")
def csp26_n(weights: str | None = None) -> CSP26:
    """YOLO26 backbone, n scale (1,365,472 parameters)."""
    return build_csp26("n", weights)


@register_backbone("csp26_s")
def csp26_s(weights: str | None = None) -> CSP26:
    """YOLO26 backbone, s scale (5,441,984 parameters)."""
    return build_csp26("s", weights)


@register_backbone("csp26_m")
def csp26_m(weights: str | None = None) -> CSP26:
    """YOLO26 backbone, m scale (10,352,192 parameters)."""
    return build_csp26("m", weights)


@register_backbone("csp26_l")
def csp26_l(weights: str | None = None) -> CSP26:
    """YOLO26 backbone, l scale (12,833,600 parameters)."""
    return build_csp26("l", weights)


@register_backbone("csp26_x")
def csp26_x(weights: str | None = None) -> CSP26:
    """YOLO26 backbone, x scale (28,847,328 parameters)."""
    return build_csp26("x", weights)
