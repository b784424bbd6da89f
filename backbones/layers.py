"""Building blocks of CSP-Darknet and the YOLOv8 neck (ConvBNAct, Bottleneck, C2f, SPPF) and of YOLO11 (C3k, C3k2,
PSAttention, PSABlock, C2PSA).

Shapes and hyper-parameters follow YOLOv8 (Jocher et al., 2023) so that parameter counts and weights match it
one to one; the child names are ours (STYLE §10) and `detect/interop/` maps the foreign ones.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# YOLOv8's BatchNorm settings: a larger eps and a slower running-average update than PyTorch's defaults.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def same_padding(kernel: int, dilation: int = 1) -> int:
    """Padding that keeps the spatial size at stride 1 for an odd kernel.

    Args:
        kernel: kernel size.
        dilation: dilation of the kernel.

    Returns:
        The padding on each side.
    """
    effective = dilation * (kernel - 1) + 1
    return effective // 2


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d (eps 1e-3, momentum 0.03) -> SiLU.

    Args:
        c_in: input channels.
        c_out: output channels.
        kernel: square kernel size.
        stride: convolution stride.
        padding: explicit padding; None gives "same" padding for odd kernels.
        groups: convolution groups.
        dilation: convolution dilation.
        act: True for SiLU, False for identity, or an `nn.Module` to use as is.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        act: bool | nn.Module = True,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = same_padding(kernel, dilation)
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, c_in, H, W]. Returns: [B, c_out, H', W'] with H' = floor((H + 2p - k) / s) + 1."""
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two convolutions with an optional residual connection (used only when c_in == c_out).

    Args:
        c_in: input channels.
        c_out: output channels.
        shortcut: add the input to the output when the channel counts agree.
        groups: groups of the second convolution.
        kernels: kernel sizes of the first and second convolution.
        expansion: hidden channels = int(c_out * expansion).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        shortcut: bool = True,
        groups: int = 1,
        kernels: tuple[int, int] = (3, 3),
        expansion: float = 0.5,
    ) -> None:
        super().__init__()
        hidden = int(c_out * expansion)
        self.conv1 = ConvBNAct(c_in, hidden, kernels[0], 1)
        self.conv2 = ConvBNAct(hidden, c_out, kernels[1], 1, groups=groups)
        self.residual = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, c_in, H, W]. Returns: [B, c_out, H, W]."""
        y = self.conv2(self.conv1(x))
        return x + y if self.residual else y


class C2f(nn.Module):
    """CSP block with two convolutions and a chain of bottlenecks whose every output is kept (YOLOv8's C2f).

    `split_conv` maps the input to 2*h channels, split into two halves; each bottleneck refines the last
    tensor and every intermediate is concatenated, so `fuse_conv` sees (2 + num_blocks) * h channels.

    Args:
        c_in: input channels.
        c_out: output channels.
        num_blocks: number of bottlenecks.
        shortcut: residual connections inside the bottlenecks.
        groups: groups of each bottleneck's second convolution.
        expansion: hidden channels h = int(c_out * expansion).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        num_blocks: int = 1,
        shortcut: bool = False,
        groups: int = 1,
        expansion: float = 0.5,
    ) -> None:
        super().__init__()
        self.hidden = int(c_out * expansion)
        self.split_conv = ConvBNAct(c_in, 2 * self.hidden, 1, 1)
        self.fuse_conv = ConvBNAct((2 + num_blocks) * self.hidden, c_out, 1, 1)
        self.blocks = nn.ModuleList(
            Bottleneck(self.hidden, self.hidden, shortcut, groups, kernels=(3, 3), expansion=1.0)
            for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, c_in, H, W]. Returns: [B, c_out, H, W]."""
        parts = list(self.split_conv(x).chunk(2, dim=1))  # 2 x [B, h, H, W]
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.fuse_conv(torch.cat(parts, dim=1))  # [B, (2 + n) h, H, W] -> [B, c_out, H, W]


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools emulate pools of kernel k, 2k-1 and 3k-2.

    Args:
        c_in: input channels.
        c_out: output channels.
        kernel: max-pool kernel (stride 1, same padding).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 5) -> None:
        super().__init__()
        hidden = c_in // 2
        self.reduce_conv = ConvBNAct(c_in, hidden, 1, 1)
        self.pool = nn.MaxPool2d(kernel_size=kernel, stride=1, padding=kernel // 2)
        self.fuse_conv = ConvBNAct(4 * hidden, c_out, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, c_in, H, W]. Returns: [B, c_out, H, W]."""
        pooled = [self.reduce_conv(x)]
        for _ in range(3):
            pooled.append(self.pool(pooled[-1]))
        return self.fuse_conv(torch.cat(pooled, dim=1))  # [B, 4 * c_in // 2, H, W] -> [B, c_out, H, W]


# ---- YOLO11 blocks (Ultralytics, 2024): C3k, C3k2, position-sensitive attention, C2PSA ----


class C3k(nn.Module):
    """CSP block with three convolutions (YOLOv5's C3) whose bottlenecks use a chosen kernel: YOLO11's C3k.

    `main_conv` feeds the chain of bottlenecks, `skip_conv` bypasses it, and `fuse_conv` merges the two halves.

    Args:
        c_in: input channels.
        c_out: output channels.
        num_blocks: number of bottlenecks (YOLO11 uses 2).
        shortcut: residual connections inside the bottlenecks.
        groups: groups of each bottleneck's second convolution.
        expansion: hidden channels h = int(c_out * expansion).
        kernel: kernel size of both convolutions of every bottleneck.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        num_blocks: int = 2,
        shortcut: bool = True,
        groups: int = 1,
        expansion: float = 0.5,
        kernel: int = 3,
    ) -> None:
        super().__init__()
        hidden = int(c_out * expansion)
        self.main_conv = ConvBNAct(c_in, hidden, 1, 1)
        self.skip_conv = ConvBNAct(c_in, hidden, 1, 1)
        self.fuse_conv = ConvBNAct(2 * hidden, c_out, 1, 1)
        self.blocks = nn.Sequential(
            *(Bottleneck(hidden, hidden, shortcut, groups, (kernel, kernel), 1.0) for _ in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, c_in, H, W]. Returns: [B, c_out, H, W]."""
        main = self.blocks(self.main_conv(x))  # [B, h, H, W]
        return self.fuse_conv(torch.cat((main, self.skip_conv(x)), dim=1))  # [B, 2h, H, W] -> [B, c_out, H, W]


class C3k2(nn.Module):
    """YOLO11's C3k2: a C2f whose inner blocks are either bottlenecks (expansion 0.5) or C3k blocks.

    Same data flow as `C2f` (split into two halves, every block's output kept, all concatenated into `fuse_conv`).
    Unlike YOLOv8's C2f the bottlenecks halve their hidden width and keep their residuals everywhere, also in the neck.

    Args:
        c_in: input channels.
        c_out: output channels.
        num_blocks: number of inner blocks.
        c3k: True for C3k inner blocks (two 3x3 bottlenecks each), False for single bottlenecks.
        expansion: hidden channels h = int(c_out * expansion).
        shortcut: residual connections inside the inner blocks.
        groups: groups of the bottlenecks' second convolutions.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        num_blocks: int = 1,
        c3k: bool = False,
        expansion: float = 0.5,
        shortcut: bool = True,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.hidden = int(c_out * expansion)
        self.split_conv = ConvBNAct(c_in, 2 * self.hidden, 1, 1)
        self.fuse_conv = ConvBNAct((2 + num_blocks) * self.hidden, c_out, 1, 1)
        h = self.hidden
        self.blocks = nn.ModuleList(
            C3k(h, h, 2, shortcut, groups) if c3k else Bottleneck(h, h, shortcut, groups, (3, 3), 0.5)
            for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, c_in, H, W]. Returns: [B, c_out, H, W]."""
        parts = list(self.split_conv(x).chunk(2, dim=1))  # 2 x [B, h, H, W]
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.fuse_conv(torch.cat(parts, dim=1))  # [B, (2 + n) h, H, W] -> [B, c_out, H, W]


class PSAttention(nn.Module):
    """Multi-head self-attention over all H*W positions, with a depthwise 3x3 positional term on the values.

    Scaled dot-product attention (Vaswani et al., "Attention Is All You Need", 2017) with 1x1-convolution
    projections, in YOLO11's position-sensitive form: out = out_proj(attend(q, k, v) + positional(v)). Keys and
    queries have `key_dim = int(head_dim * attn_ratio)` channels per head, values `head_dim = dim // num_heads`.

    Args:
        dim: input and output channels.
        num_heads: attention heads (dim must be divisible by it).
        attn_ratio: key width relative to the head width.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = ConvBNAct(dim, dim + 2 * self.key_dim * num_heads, 1, 1, act=False)
        self.out_proj = ConvBNAct(dim, dim, 1, 1, act=False)
        self.positional = ConvBNAct(dim, dim, 3, 1, groups=dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, C, H, W]. Returns: [B, C, H, W]."""
        b, c, h, w = x.shape
        qkv = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, h * w)  # [B, heads, 2k + d, N]
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.head_dim], dim=2)  # [B, heads, k|k|d, N]
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)  # [B, heads, N, N], rows = queries
        attended = (v @ attn.transpose(-2, -1)).view(b, c, h, w)  # [B, heads, d, N] -> [B, C, H, W]
        return self.out_proj(attended + self.positional(v.reshape(b, c, h, w)))


class PSABlock(nn.Module):
    """Position-sensitive attention block: attention then a two-layer 1x1 feed-forward net, each with a residual.

    Args:
        channels: input and output channels.
        attn_ratio: key width relative to the head width.
        num_heads: attention heads.
        shortcut: residual connections around the attention and the feed-forward net.
    """

    def __init__(self, channels: int, attn_ratio: float = 0.5, num_heads: int = 4, shortcut: bool = True) -> None:
        super().__init__()
        self.attention = PSAttention(channels, num_heads, attn_ratio)
        self.ffn = nn.Sequential(
            OrderedDict(
                expand=ConvBNAct(channels, 2 * channels, 1, 1),
                project=ConvBNAct(2 * channels, channels, 1, 1, act=False),
            )
        )
        self.residual = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, C, H, W]. Returns: [B, C, H, W]."""
        x = x + self.attention(x) if self.residual else self.attention(x)
        return x + self.ffn(x) if self.residual else self.ffn(x)


class C2PSA(nn.Module):
    """YOLO11's C2PSA: split into two halves, refine one with a chain of PSA blocks, fuse both.

    Args:
        c_in: input channels.
        c_out: output channels (must equal c_in).
        num_blocks: number of PSA blocks.
        expansion: hidden channels h = int(c_in * expansion); the blocks use max(h // 64, 1) heads.
    """

    def __init__(self, c_in: int, c_out: int, num_blocks: int = 1, expansion: float = 0.5) -> None:
        super().__init__()
        if c_in != c_out:
            raise ValueError(f"C2PSA keeps the width: c_in {c_in} != c_out {c_out}")
        self.hidden = int(c_in * expansion)
        self.split_conv = ConvBNAct(c_in, 2 * self.hidden, 1, 1)
        self.fuse_conv = ConvBNAct(2 * self.hidden, c_out, 1, 1)
        heads = max(self.hidden // 64, 1)
        self.blocks = nn.Sequential(*(PSABlock(self.hidden, 0.5, heads) for _ in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, c_in, H, W]. Returns: [B, c_out, H, W]."""
        kept, refined = self.split_conv(x).split((self.hidden, self.hidden), dim=1)  # 2 x [B, h, H, W]
        return self.fuse_conv(torch.cat((kept, self.blocks(refined)), dim=1))  # [B, 2h, H, W] -> [B, c_out, H, W]


# ---- YOLO26 blocks (Ultralytics 8.4.190, yolo26.yaml): residual SPPF, C3k2 with attention inner blocks ----


class ResidualSPPF(SPPF):
    """YOLO26's SPPF: `SPPF` with an unactivated `reduce_conv` and the input added to the output.

    Three chained max-pools as in `SPPF`; the 1x1 reduction is linear (BatchNorm, no SiLU), and when the width is
    kept (c_in == c_out, as in yolo26.yaml) the block is residual: out = fuse_conv(cat(pools)) + x.

    Args:
        c_in: input channels.
        c_out: output channels.
        kernel: max-pool kernel (stride 1, same padding).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 5) -> None:
        super().__init__(c_in, c_out, kernel)
        self.reduce_conv.act = nn.Identity()
        self.residual = c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, c_in, H, W]. Returns: [B, c_out, H, W]."""
        y = super().forward(x)
        return y + x if self.residual else y


class BottleneckPSA(nn.Module):
    """A residual bottleneck (hidden width halved) followed by a position-sensitive attention block: the inner block
    of YOLO26's attention C3k2 (its last P5 merge).

    Args:
        channels: input and output channels.
        shortcut: residual connections in the bottleneck.
        groups: groups of the bottleneck's second convolution.
    """

    def __init__(self, channels: int, shortcut: bool = True, groups: int = 1) -> None:
        super().__init__()
        self.bottleneck = Bottleneck(channels, channels, shortcut, groups, (3, 3), 0.5)
        self.psa = PSABlock(channels, 0.5, max(channels // 64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, C, H, W]. Returns: [B, C, H, W]."""
        return self.psa(self.bottleneck(x))


class AttentionC3k2(C3k2):
    """YOLO26's attention C3k2: `C3k2`'s data flow with `BottleneckPSA` inner blocks (C3k2 with `attn` in yolo26.yaml;
    the attention wins over the C3k flag at every scale).

    Args:
        c_in: input channels.
        c_out: output channels.
        num_blocks: number of inner blocks.
        expansion: hidden channels h = int(c_out * expansion); the attention uses max(h // 64, 1) heads.
        shortcut: residual connections inside the bottlenecks.
        groups: groups of the bottlenecks' second convolutions.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        num_blocks: int = 1,
        expansion: float = 0.5,
        shortcut: bool = True,
        groups: int = 1,
    ) -> None:
        super().__init__(c_in, c_out, num_blocks, False, expansion, shortcut, groups)
        self.blocks = nn.ModuleList(BottleneckPSA(self.hidden, shortcut, groups) for _ in range(num_blocks))
