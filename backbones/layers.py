"""Building blocks of CSP-Darknet and the YOLOv8 neck: ConvBNAct, Bottleneck, C2f, SPPF.

Shapes and hyper-parameters follow YOLOv8 (Jocher et al., 2023) so that parameter counts and weights match it
one to one; the child names are ours (STYLE §10) and `detect/interop/` maps the foreign ones.
"""

from __future__ import annotations

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
