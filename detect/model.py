"""The detector: any registered backbone -> YOLOv8 PAN-FPN neck -> decoupled DFL head.

Inference options, for tools (all are the caller's choice; none changes the weights' meaning):

- `detector.eval()` then `detector(images)` -> decoded `[B, A, 4 + C]` (pass it to `detect.postprocess.postprocess`).
- `detector.fuse()`: folds every BatchNorm that follows a convolution into it (inference only, irreversible; the
  detector refuses `train()` afterwards). Same outputs up to float rounding, fewer kernels, lower latency.
- channels_last: `detector.to(memory_format=torch.channels_last)` and
  `images.contiguous(memory_format=torch.channels_last)`; faster convolutions on CPU (oneDNN) and on CUDA.
- bf16: `with torch.autocast(device.type, dtype=torch.bfloat16): preds = detector(images)` — best with channels_last;
  the head decodes in float32 whatever the autocast dtype, so `preds` is always float32.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from backbones.checkpoint import load_backbone_weights
from backbones.csp import CSP_SCALES
from backbones.errors import UserError
from backbones.registry import build_backbone
from detect.head import DetectHead
from detect.neck import PAN, build_pan

logger = logging.getLogger("plugdet")


class Detector(nn.Module):
    """Backbone, neck and head in sequence.

    Args:
        backbone: returns three maps at strides 8/16/32 and has `out_channels` and `strides`.
        neck: maps the backbone's list of maps to the head's list of maps.
        head: a `DetectHead` whose `in_channels` are the neck's outputs.

    Attributes:
        num_classes, strides, reg_max: copied from the head.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: DetectHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.num_classes: int = head.num_classes
        self.strides: tuple[int, ...] = head.strides
        self.reg_max: int = head.reg_max
        self.fused = False

    def forward(self, images: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """Run the detector.

        Args:
            images: [B, 3, H, W] float in [0, 1], H and W multiples of the largest stride (32).

        Returns:
            Train mode: per-level raw maps [B, 4 * reg_max + C, H_l, W_l] (for `DetectionLoss`).
            Eval mode: decoded [B, A, 4 + C] float32 — xyxy input pixels, then sigmoid scores.
        """
        outputs = self.head(self.neck(self.backbone(images)))
        return outputs if self.training else self.head.decode(outputs)

    def train(self, mode: bool = True) -> Detector:
        """Set train/eval mode; a fused detector has no BatchNorm left to train and refuses train mode."""
        if mode and self.fused:
            raise RuntimeError("this Detector was fused for inference (BatchNorm folded); build a new one to train it")
        return super().train(mode)

    @torch.no_grad()
    def fuse(self) -> Detector:
        """Fold each BatchNorm into the convolution before it, for inference; switches to eval mode.

        Folds the pairs `conv`/`bn` (`ConvBNAct`: CSP-Darknet, neck, head), `convK`/`bnK` (torchvision ResNets) and a
        Conv2d directly followed by a BatchNorm2d inside an `nn.Sequential` (torchvision's conv-norm-activation
        blocks, VGG-BN, ResNet downsample). A BatchNorm in any other place stays (still correct, just not faster).

        Returns:
            self.
        """
        self.eval()
        for module in self.modules():
            for conv_name, bn_name in _conv_bn_pairs(module):
                conv, bn = getattr(module, conv_name), getattr(module, bn_name)
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
        self.fused = True
        return self


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names of the (Conv2d, BatchNorm2d) children of `module` where the BatchNorm normalises that conv's output."""
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        names = list(children)
        candidates = list(zip(names, names[1:], strict=False))
    else:
        candidates = [(name, "bn" + name[len("conv") :]) for name in children if name.startswith("conv")]
    return [
        (conv, bn)
        for conv, bn in candidates
        if isinstance(children.get(conv), nn.Conv2d)
        and isinstance(children.get(bn), nn.BatchNorm2d)
        and children[bn].num_features == children[conv].out_channels
    ]


def build_detector(
    scale: str = "n",
    num_classes: int = 80,
    backbone: str | None = None,
    backbone_weights: str | Path | Mapping[str, Any] | None = None,
    reg_max: int = 16,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> Detector:
    """Build a YOLOv8-style detector at a scale, on any registered backbone.

    With the default backbone and 80 classes the parameter counts are exactly YOLOv8's: n 3,157,200, s 11,166,560,
    m 25,902,640, l 43,691,520, x 68,229,648.

    Args:
        scale: "n", "s", "m", "l" or "x"; sets the neck's widths and depth (and the default backbone).
        num_classes: number of classes C.
        backbone: a registered backbone name (`resnet50`, `tv:vgg16_bn`, ...); None means `cspdarknet_<scale>`.
        backbone_weights: a backbone checkpoint (`backbone.pt` from train_cls, or its dict) loaded strictly into the
            backbone; the number of transferred tensors is logged.
        reg_max: DFL bins per box side.
        backbone_kwargs: extra keyword arguments of the backbone factory.

    Returns:
        A `Detector` in train mode, head biases at YOLOv8's priors.
    """
    if scale not in CSP_SCALES:
        raise UserError(f"unknown detector scale {scale!r}: choose one of {', '.join(CSP_SCALES)}")
    if int(num_classes) < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    name = backbone if backbone is not None else f"cspdarknet_{scale}"
    body = build_backbone(name, **dict(backbone_kwargs or {}))
    if backbone_weights is not None:
        count = load_backbone_weights(body, backbone_weights, arch=name)
        source = backbone_weights if isinstance(backbone_weights, str | Path) else "a checkpoint dict"
        logger.info("backbone %s: transferred %d tensors from %s", name, count, source)
    neck: PAN = build_pan(body.out_channels, scale)
    head = DetectHead(num_classes, neck.out_channels, body.strides, reg_max=reg_max)
    return Detector(body, neck, head)
