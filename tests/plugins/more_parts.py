"""A backbone and a loss of a user's own, registered outside plugdet: the plugin test trains both with the tools."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from backbones.checkpoint import load_backbone_weights
from backbones.layers import ConvBNAct
from backbones.registry import register_backbone
from detect.losses.registry import register_loss
from detect.losses.yolo import yolo_loss


class PlainNet(nn.Module):
    """Five stride-2 3x3 convolutions (a VGG-like toy); maps at strides 8, 16, 32."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(5)]
        self.stem = ConvBNAct(3, widths[0], 3, 2)
        self.stages = nn.ModuleList(ConvBNAct(a, b, 3, 2) for a, b in zip(widths, widths[1:], strict=False))
        self.out_channels, self.strides = tuple(widths[2:]), (8, 16, 32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[1:]  # [B, 4w, H/8, W/8], [B, 8w, H/16, W/16], [B, 16w, H/32, W/32]

    def stage_modules(self) -> list[nn.Module]:
        return [self.stem, *self.stages]


@register_backbone("plain_toy")
def plain_toy(weights: str | None = None, width: int = 16) -> PlainNet:
    net = PlainNet(width)
    if weights is not None:  # e.g. the backbone.pt that train_cls wrote for it
        load_backbone_weights(net, weights, arch="plain_toy")
    return net


@register_loss("box_cls_only")
def box_cls_only(head: nn.Module, loss: dict[str, Any], assign: dict[str, Any]) -> Callable:
    """The YOLO loss without its DFL part: a criterion may return any parts, here only "box" and "cls"."""
    inner = yolo_loss(head, {**loss, "dfl": 0.0}, assign)

    def criterion(outputs: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = inner(outputs, targets)
        return total, {"box": parts["box"], "cls": parts["cls"]}

    return criterion
