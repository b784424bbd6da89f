"""Tests for backbones/layers.py: shapes, parameter counts and hand-checked forward results."""

from __future__ import annotations

import torch
from torch import nn

from backbones.layers import SPPF, Bottleneck, C2f, ConvBNAct, same_padding


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_conv_bn_act_children_and_bn_settings() -> None:
    layer = ConvBNAct(3, 8, kernel=3, stride=2)
    assert [name for name, _ in layer.named_children()] == ["conv", "bn", "act"]
    assert layer.conv.bias is None
    assert layer.conv.padding == (1, 1)
    assert layer.bn.eps == 1e-3 and layer.bn.momentum == 0.03
    assert isinstance(layer.act, nn.SiLU)
    assert count(layer) == 3 * 8 * 9 + 2 * 8
    assert layer(torch.zeros(2, 3, 15, 20)).shape == (2, 8, 8, 10)


def test_conv_bn_act_identity_activation_matches_manual() -> None:
    torch.manual_seed(0)
    layer = ConvBNAct(2, 3, kernel=1, act=False).eval()
    layer.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    layer.bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    layer.bn.weight.data.copy_(torch.tensor([1.0, 2.0, 3.0]))
    layer.bn.bias.data.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(1, 2, 4, 5)
    conv = torch.einsum("oc,bchw->bohw", layer.conv.weight[:, :, 0, 0], x)
    mean = layer.bn.running_mean.view(1, 3, 1, 1)
    var = layer.bn.running_var.view(1, 3, 1, 1)
    expected = (conv - mean) / torch.sqrt(var + 1e-3) * layer.bn.weight.view(1, 3, 1, 1) + layer.bn.bias.view(
        1, 3, 1, 1
    )
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert isinstance(ConvBNAct(2, 3, act=nn.ReLU()).act, nn.ReLU)


def test_same_padding_with_dilation() -> None:
    assert same_padding(1) == 0
    assert same_padding(3) == 1
    assert same_padding(5) == 2
    assert same_padding(3, dilation=2) == 2
    assert ConvBNAct(4, 4, kernel=3, dilation=2)(torch.zeros(1, 4, 9, 7)).shape == (1, 4, 9, 7)


def test_bottleneck_residual_only_when_channels_match() -> None:
    same = Bottleneck(8, 8, shortcut=True)
    assert same.residual
    assert not Bottleneck(8, 16, shortcut=True).residual
    assert not Bottleneck(8, 8, shortcut=False).residual
    assert same.conv1.conv.out_channels == 4  # expansion 0.5
    # Zeroing the last BN's scale and shift makes the branch output SiLU(0) = 0: the block is the identity.
    nn.init.zeros_(same.conv2.bn.weight)
    nn.init.zeros_(same.conv2.bn.bias)
    x = torch.randn(2, 8, 5, 6)
    assert torch.equal(same.eval()(x), x)


def test_c2f_structure_and_count() -> None:
    block = C2f(16, 32, num_blocks=2, shortcut=True)
    assert [name for name, _ in block.named_children()] == ["split_conv", "fuse_conv", "blocks"]
    assert block.split_conv.conv.out_channels == 32  # 2 * hidden, hidden = 16
    assert block.fuse_conv.conv.in_channels == (2 + 2) * 16
    assert len(block.blocks) == 2 and all(b.residual for b in block.blocks)
    expected = (16 * 32 + 64) + (64 * 32 + 64) + 2 * 2 * (16 * 16 * 9 + 32)
    assert count(block) == expected
    assert block(torch.zeros(1, 16, 7, 9)).shape == (1, 32, 7, 9)


def test_c2f_forward_concatenates_every_block_output() -> None:
    torch.manual_seed(0)
    block = C2f(8, 8, num_blocks=2).eval()
    x = torch.randn(1, 8, 6, 6)
    a, b = block.split_conv(x).chunk(2, 1)
    c = block.blocks[0](b)
    d = block.blocks[1](c)
    assert torch.allclose(block(x), block.fuse_conv(torch.cat([a, b, c, d], 1)))


def test_sppf_equals_parallel_pools() -> None:
    torch.manual_seed(0)
    layer = SPPF(8, 12, kernel=5).eval()
    assert [name for name, _ in layer.named_children()] == ["reduce_conv", "pool", "fuse_conv"]
    x = torch.randn(1, 8, 11, 13)
    y = layer.reduce_conv(x)
    pools = [nn.functional.max_pool2d(y, k, 1, k // 2) for k in (5, 9, 13)]  # chained 5-pools = 5, 9, 13
    assert torch.allclose(layer(x), layer.fuse_conv(torch.cat([y, *pools], 1)))
    assert layer(x).shape == (1, 12, 11, 13)
