"""The FPN neck of torchvision's detector families: `torchvision.ops.FeaturePyramidNetwork` on any backbone.

Nothing here re-implements the pyramid: the lateral 1x1 and output 3x3 convolutions, the top-down nearest
upsampling and the extra levels are torchvision's own modules, so a torchvision family built on this neck is
torchvision's model (`tests/test_torchvision_heads.py` proves it number for number). What this module adds is the
neck contract (DESIGN §3): a list of maps in, a list out, `out_channels` and `strides`, and the extra levels by name:

- `extra="p6p7"`: `LastLevelP6P7`, two stride-2 3x3 convolutions giving P6 and P7 (RetinaNet, FCOS: P3-P7). P6 is
  computed from P5 (`p6_from="p5"`, torchvision's v2 RetinaNet and its FCOS) or from the backbone's C5
  (`p6_from="c5"`, the original RetinaNet).
- `extra="pool"`: `LastLevelMaxPool`, a stride-2 subsampling of P5 (Faster R-CNN's RPN-only level).
- `extra="none"`: the backbone's levels only.

torchvision.ops is imported when an FPN is built (it pulls in torch._dynamo, ~1.5 s, at import).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from backbones.errors import UserError
from detect.models.registry import register_neck

EXTRA_LEVELS = {"p6p7": 2, "pool": 1, "none": 0}


class FPN(nn.Module):
    """torchvision's FeaturePyramidNetwork as a plugdet neck.

    Args:
        in_channels: the backbone's channels per level (shallow to deep).
        strides: the backbone's strides per level.
        out_channels: the channels of every output level (torchvision: 256).
        extra: "p6p7", "pool" or "none" (see the module docstring).
        p6_from: "p5" or "c5", for `extra="p6p7"`.

    Attributes:
        out_channels, strides: per output level, extra levels included (each extra level doubles the stride).
        names: the level names torchvision gives the maps ("0", "1", ..., then "p6", "p7" or "pool"); the RoI pooler
            of Faster R-CNN pools by these names.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        out_channels: int = 256,
        extra: str = "p6p7",
        p6_from: str = "p5",
    ) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

        super().__init__()
        if extra not in EXTRA_LEVELS:
            raise UserError(f"model.neck_kwargs.extra={extra!r}: choose one of {', '.join(EXTRA_LEVELS)}")
        if p6_from not in ("p5", "c5"):
            raise UserError(f"model.neck_kwargs.p6_from={p6_from!r}: choose p5 or c5")
        blocks = {"p6p7": lambda: LastLevelP6P7(out_channels if p6_from == "p5" else in_channels[-1], out_channels),
                  "pool": LastLevelMaxPool, "none": lambda: None}  # fmt: skip
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=blocks[extra]())
        self.input_names = [str(k) for k in range(len(in_channels))]
        self.names = self.input_names + {"p6p7": ["p6", "p7"], "pool": ["pool"], "none": []}[extra]
        extra_strides = [int(strides[-1]) * 2 ** (k + 1) for k in range(EXTRA_LEVELS[extra])]
        self.strides: tuple[int, ...] = (*(int(s) for s in strides), *extra_strides)
        self.out_channels: tuple[int, ...] = (int(out_channels),) * len(self.strides)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pyramid's maps, shallow to deep, extra levels last."""
        return list(self.fpn(OrderedDict(zip(self.input_names, features, strict=True))).values())


@register_neck("fpn")
def fpn_neck(
    in_channels: Sequence[int],
    strides: Sequence[int],
    out_channels: int = 256,
    extra: str = "p6p7",
    p6_from: str = "p5",
) -> FPN:
    """torchvision's FPN with P6/P7 (default), a max-pool level, or no extra level (`model.neck_kwargs`)."""
    return FPN(in_channels, strides, out_channels, extra, p6_from)
