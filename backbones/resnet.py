"""ResNet-18/34/50/101/152 from torchvision (v1.5: stride on the 3x3 conv) returning C3/C4/C5 (He et al., 2016).

The child names are torchvision's (`conv1 bn1 layer1..layer4`), so an ImageNet state dict loads once its `fc.*`
keys are dropped. resnet50 has 23,508,032 parameters here (torchvision's 25,557,032 minus the 2,049,000 of fc).
"""

from __future__ import annotations

import torch
from torch import nn

from backbones.checkpoint import is_backbone_checkpoint, load_backbone_weights, read_weights
from backbones.registry import register_backbone

RESNET_DEPTHS = (18, 34, 50, 101, 152)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool and fc; outputs layer2, layer3, layer4 (strides 8, 16, 32).

    Args:
        depth: 18, 34, 50, 101 or 152.

    Attributes:
        out_channels: (128, 256, 512) for 18/34, (512, 1024, 2048) for the bottleneck ResNets.
        strides: (8, 16, 32).
    """

    def __init__(self, depth: int) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {RESNET_DEPTHS}, got {depth}")
        import torchvision  # here, not at import: `import backbones` stays light (~1 s of torchvision)

        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        expansion = 4 if depth >= 50 else 1
        self.out_channels: tuple[int, int, int] = (128 * expansion, 256 * expansion, 512 * expansion)
        self.strides: tuple[int, int, int] = (8, 16, 32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x [B, 3, H, W]. Returns: C3 [B, c3, H/8, W/8], C4 [B, c4, H/16, W/16], C5 [B, c5, H/32, W/32]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, 64, H/4, W/4]
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

    def stage_modules(self) -> list[nn.Module]:
        """Returns [stem (conv1 + bn1), layer1 (stride 4), layer2 (8), layer3 (16), layer4 (32)].

        The stem is a container made on each call; it holds the same conv1 and bn1 modules.
        """
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]


def build_resnet(depth: int, weights: str | None = None) -> ResNetBackbone:
    """Builds a ResNet backbone, optionally with weights.

    Args:
        depth: 18, 34, 50, 101 or 152.
        weights: None; a local file (a torchvision state dict with or without `fc.*`, or a backbone checkpoint);
            or a torchvision weights name such as "IMAGENET1K_V1", read only from the torch cache (never downloaded).

    Returns:
        The backbone.
    """
    model = ResNetBackbone(depth)
    if weights is not None:
        arch = f"resnet{depth}"
        loaded = read_weights(weights, arch, torchvision_model=arch)
        if not is_backbone_checkpoint(loaded):  # a torchvision state dict: its classifier is not ours
            loaded = {k: v for k, v in loaded.items() if not k.startswith("fc.")}
        load_backbone_weights(model, loaded, arch=arch, source_name=str(weights))
    return model


@register_backbone("resnet18")
def resnet18(weights: str | None = None) -> ResNetBackbone:
    """ResNet-18: C3/C4/C5 with 128/256/512 channels."""
    return build_resnet(18, weights)


@register_backbone("resnet34")
def resnet34(weights: str | None = None) -> ResNetBackbone:
    """ResNet-34: C3/C4/C5 with 128/256/512 channels."""
    return build_resnet(34, weights)


@register_backbone("resnet50")
def resnet50(weights: str | None = None) -> ResNetBackbone:
    """ResNet-50: C3/C4/C5 with 512/1024/2048 channels (23,508,032 parameters)."""
    return build_resnet(50, weights)


@register_backbone("resnet101")
def resnet101(weights: str | None = None) -> ResNetBackbone:
    """ResNet-101: C3/C4/C5 with 512/1024/2048 channels."""
    return build_resnet(101, weights)


@register_backbone("resnet152")
def resnet152(weights: str | None = None) -> ResNetBackbone:
    """ResNet-152: C3/C4/C5 with 512/1024/2048 channels."""
    return build_resnet(152, weights)
