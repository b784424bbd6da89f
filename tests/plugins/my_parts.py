"""My own parts for plugdet: a neck and a head, registered under my names; plugdet itself is not edited."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from backbones.layers import ConvBNAct
from detect.models.heads.yolo import YoloHead
from detect.models.registry import register_head, register_neck


class LiteFPN(nn.Module):
    """1x1 lateral convolutions to one width, then a top-down sum of upsampled deeper maps (FPN, no smoothing)."""

    def __init__(self, in_channels: tuple[int, ...], strides: tuple[int, ...], width: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(ConvBNAct(c, width, 1) for c in in_channels)
        self.out_channels, self.strides = (width,) * len(in_channels), strides

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = [lateral(x) for lateral, x in zip(self.lateral, features, strict=True)]
        for i in range(len(maps) - 2, -1, -1):  # deep to shallow: [B, width, H_i, W_i] each
            maps[i] = maps[i] + F.interpolate(maps[i + 1], size=maps[i].shape[-2:], mode="nearest")
        return maps


class SlimYoloHead(YoloHead):
    """YOLOv8's head with one 3x3 convolution per branch instead of two; its loss, decode and NMS come with it."""

    def box_branch_for(self, c_in: int, hidden: int, c_out: int) -> nn.Module:
        return nn.Sequential(OrderedDict(conv=ConvBNAct(c_in, hidden, 3), pred=nn.Conv2d(hidden, c_out, 1)))

    cls_branch_for = box_branch_for


register_neck("lite_fpn")(LiteFPN)
register_head("slim_yolo")(SlimYoloHead)
