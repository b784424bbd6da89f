"""CSP-Darknet with C2f stages and SPPF: the YOLOv8 backbone (layers 0-9 of yolov8*.yaml) at five scales.

Parameter counts equal Ultralytics' layers 0-9: n 1,272,656; s 5,079,712; m 11,855,856; l 19,808,576;
x 30,943,120 (tested).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from backbones.checkpoint import load_backbone_weights
from backbones.errors import UserError
from backbones.layers import SPPF, C2f, ConvBNAct
from backbones.registry import register_backbone

# scale -> (depth multiple, width multiple, max channels), YOLOv8's values.
CSP_SCALES: dict[str, tuple[float, float, int]] = {
    "n": (0.33, 0.25, 1024),
    "s": (0.33, 0.50, 1024),
    "m": (0.67, 0.75, 768),
    "l": (1.00, 1.00, 512),
    "x": (1.00, 1.25, 512),
}

# Unscaled channels of the stem and of the four stages, and C2f blocks per stage.
BASE_CHANNELS = (64, 128, 256, 512, 1024)
BASE_DEPTHS = (3, 6, 6, 3)


def scale_width(channels: int, width: float, max_channels: int) -> int:
    """Scaled channel count: min(channels, max_channels) * width, rounded up to a multiple of 8.

    Args:
        channels: unscaled channels.
        width: width multiple.
        max_channels: cap applied before scaling.

    Returns:
        The channel count.
    """
    return int(math.ceil(min(channels, max_channels) * width / 8) * 8)


def scale_depth(n: int, depth: float) -> int:
    """Scaled number of repeated blocks: max(round(n * depth), 1) (n itself when n == 1).

    Args:
        n: unscaled repeats.
        depth: depth multiple.

    Returns:
        The number of blocks.
    """
    return max(round(n * depth), 1) if n > 1 else n


class CSPDarknet(nn.Module):
    """YOLOv8's backbone: a stride-2 stem, then four stages (stride-2 conv + C2f), SPPF after the last stage.

    Args:
        depth: depth multiple (scales the C2f block counts 3, 6, 6, 3).
        width: width multiple (scales the channels 64, 128, 256, 512, 1024).
        max_channels: channel cap applied before the width multiple.

    Attributes:
        out_channels: channels of the three outputs (stages 2, 3, 4).
        strides: (8, 16, 32).
    """

    def __init__(self, depth: float, width: float, max_channels: int) -> None:
        super().__init__()
        channels = [scale_width(c, width, max_channels) for c in BASE_CHANNELS]
        self.stem = ConvBNAct(3, channels[0], kernel=3, stride=2)
        self.stages = nn.ModuleList()
        for i, num_blocks in enumerate(BASE_DEPTHS):
            c_in, c_out = channels[i], channels[i + 1]
            layers: OrderedDict[str, nn.Module] = OrderedDict(
                downsample=ConvBNAct(c_in, c_out, kernel=3, stride=2),
                c2f=C2f(c_out, c_out, scale_depth(num_blocks, depth), shortcut=True),
            )
            if i == len(BASE_DEPTHS) - 1:
                layers["sppf"] = SPPF(c_out, c_out, kernel=5)
            self.stages.append(nn.Sequential(layers))
        self.out_channels: tuple[int, int, int] = (channels[2], channels[3], channels[4])
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
        """Returns [stem, stage 1 (stride 4), stage 2 (8), stage 3 (16), stage 4 (32, with SPPF)]."""
        return [self.stem, *self.stages]


def build_cspdarknet(scale: str, weights: str | None = None) -> CSPDarknet:
    """Builds CSP-Darknet at a YOLOv8 scale, optionally loading a local checkpoint.

    Args:
        scale: one of "n", "s", "m", "l", "x".
        weights: None, or the path of a backbone checkpoint (`save_backbone`) or of a plain state dict.

    Returns:
        The backbone.
    """
    if scale not in CSP_SCALES:
        raise UserError(f"unknown CSP-Darknet scale {scale!r}: choose one of {', '.join(CSP_SCALES)}")
    model = CSPDarknet(*CSP_SCALES[scale])
    if weights is not None:
        load_backbone_weights(model, weights, arch=f"cspdarknet_{scale}")
    return model


@register_backbone("cspdarknet_n")
def cspdarknet_n(weights: str | None = None) -> CSPDarknet:
    """CSP-Darknet, YOLOv8n scale (1,272,656 parameters)."""
    return build_cspdarknet("n", weights)


@register_backbone("cspdarknet_s")
def cspdarknet_s(weights: str | None = None) -> CSPDarknet:
    """CSP-Darknet, YOLOv8s scale (5,079,712 parameters)."""
    return build_cspdarknet("s", weights)


@register_backbone("cspdarknet_m")
def cspdarknet_m(weights: str | None = None) -> CSPDarknet:
    """CSP-Darknet, YOLOv8m scale (11,855,856 parameters)."""
    return build_cspdarknet("m", weights)


@register_backbone("cspdarknet_l")
def cspdarknet_l(weights: str | None = None) -> CSPDarknet:
    """CSP-Darknet, YOLOv8l scale (19,808,576 parameters)."""
    return build_cspdarknet("l", weights)


@register_backbone("cspdarknet_x")
def cspdarknet_x(weights: str | None = None) -> CSPDarknet:
    """CSP-Darknet, YOLOv8x scale (30,943,120 parameters)."""
    return build_cspdarknet("x", weights)
