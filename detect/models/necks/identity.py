"""The identity neck: the backbone's maps, unchanged, for head families that hold their own neck.

The DETR families (`detect.models.heads.detr`) fuse the levels in their hybrid encoder (AIFI + CCFF, a top-down and
bottom-up pyramid), which is part of the transformers model inside the head, so nothing sits between the backbone and
the head: `model.neck=identity` (their registered default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from detect.models.registry import register_neck


class IdentityNeck(nn.Module):
    """The neck contract (DESIGN §3) with nothing to compute: the maps pass through, channels and strides too."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = tuple(int(c) for c in in_channels)
        self.strides = tuple(int(s) for s in strides)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(features)


@register_neck("identity")
def identity_neck(in_channels: Sequence[int], strides: Sequence[int]) -> IdentityNeck:
    """The backbone's maps as they are (for heads with a neck of their own, as the DETR families' hybrid encoder)."""
    return IdentityNeck(in_channels, strides)
