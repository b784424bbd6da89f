"""The backbone contract (DESIGN §3), checked on every registered name."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from backbones import build_backbone, list_backbones

# Heavy models run at a small input to keep this file fast; the contract is the same.
SMALL_INPUT = {"resnet101", "resnet152", "cspdarknet_l", "cspdarknet_x", "tv:vgg16_bn", "tv:convnext_tiny"}


def expected_sizes(h: int, w: int) -> list[tuple[int, int]]:
    return [(math.ceil(h / s), math.ceil(w / s)) for s in (8, 16, 32)]


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    assert model.strides == (8, 16, 32)
    assert isinstance(model.out_channels, tuple) and len(model.out_channels) == 3
    # Sizes divisible by 32, then not (ceil, or resized to ceil for tv models whose padding differs).
    inputs = [(2, 160, 224), (1, 100, 132)] if name not in SMALL_INPUT else [(1, 64, 96), (1, 72, 104)]
    for batch, h, w in inputs:
        with torch.no_grad():
            maps = model(torch.rand(batch, 3, h, w))
        assert isinstance(maps, list) and len(maps) == 3
        assert [m.shape[1] for m in maps] == list(model.out_channels)
        assert [tuple(m.shape[2:]) for m in maps] == expected_sizes(h, w), (h, w)
        assert all(m.shape[0] == batch and torch.isfinite(m).all() for m in maps)

    stages = model.stage_modules()
    assert len(stages) >= 2 and all(isinstance(s, nn.Module) for s in stages)
    in_stages = [id(p) for s in stages for p in s.parameters()]
    assert len(in_stages) == len(set(in_stages)), "a parameter appears in two stages"
    assert set(in_stages) == {id(p) for p in model.parameters()}
