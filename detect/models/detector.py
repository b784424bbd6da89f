"""The detector: any registered backbone -> any registered neck -> any registered head family.

Inference options, for tools (all are the caller's choice; none changes the weights' meaning):

- `detector.eval()` then `detector(images)` -> the head's decoded outputs (YOLO: `[B, A, 4 + C]`), and
  `detector.detect(images, conf, iou, max_det)` -> detections per image in input pixels.
- `detector.fuse()`: folds every BatchNorm that follows a convolution into it (inference only, irreversible; the
  detector refuses `train()` afterwards). Same outputs up to float rounding, fewer kernels, lower latency.
- channels_last: `detector.to(memory_format=torch.channels_last)` and
  `images.contiguous(memory_format=torch.channels_last)`; faster convolutions on CPU (oneDNN) and on CUDA.
- bf16: `with torch.autocast(device.type, dtype=torch.bfloat16): preds = detector(images)` — best with channels_last;
  the head decodes in float32 whatever the autocast dtype, so `preds` is always float32.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from detect.models.heads.base import DetectionHead


class Detector(nn.Module):
    """Backbone, neck and head in sequence; any registered parts that keep the contracts of DESIGN §3.

    Args:
        backbone: returns maps at its `strides` and has `out_channels`.
        neck: maps the backbone's list of maps to the head's list of maps.
        head: a head family (`detect.models.heads.base.DetectionHead`) whose inputs are the neck's outputs.

    Attributes:
        num_classes, strides: copied from the head.
        input_stride: what the input's sides must be multiples of: the backbone's deepest stride (32). Levels a neck
            adds beyond it (RetinaNet's P6/P7 at 64 and 128) are stride-2 convolutions that take any size.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: DetectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.num_classes: int = head.num_classes
        self.strides: tuple[int, ...] = tuple(head.strides)
        self.input_stride = int(max(backbone.strides))
        self.fused = False

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        """Run the detector.

        Args:
            images: [B, 3, H, W] float in [0, 1], H and W multiples of the largest stride (32).
            targets: [N, 6] rows (image_index, class_id, x1, y1, x2, y2); only families whose training forward
                needs them (`head.needs_targets`, two-stage) read them.

        Returns:
            Train mode: the head's raw outputs (what its criterion consumes).
            Eval mode: `head.decode(raw)`; for the YOLO family [B, A, 4 + C] float32, xyxy input pixels then
            sigmoid scores (also the exported output).
        """
        image_size = (images.shape[-2], images.shape[-1])  # ints in eager mode; traced sizes stay free in an export
        raw = self.head(self.neck(self.backbone(images)), image_size, targets if self.training else None)
        return raw if self.training else self.head.decode(raw, image_size)

    @torch.no_grad()
    def detect(
        self, images: torch.Tensor, conf: float, iou: float, max_det: int, multi_label: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image in input pixels: dict(boxes [K, 4] xyxy, scores [K], labels [K]); eval mode.

        The head family turns its decoded outputs into detections (`head.postprocess`); the caller maps them back
        to original pixels (`detect.postprocess.undo_letterbox`).
        """
        return self.head.postprocess(self(images), conf, iou, max_det, multi_label)

    def train(self, mode: bool = True) -> Detector:
        """Set train/eval mode; a fused detector has no BatchNorm left to train and refuses train mode."""
        if mode and self.fused:
            raise RuntimeError("this Detector was fused for inference (BatchNorm folded); build a new one to train it")
        return super().train(mode)

    @torch.no_grad()
    def fuse(self) -> Detector:
        """Fold each BatchNorm into the convolution before it, for inference; switches to eval mode.

        Folds the pairs `conv`/`bn` (`ConvBNAct`: CSP-Darknet, neck, head; timm's `ConvNormAct`), `convK`/`bnK`
        (torchvision and timm ResNets) and a Conv2d directly followed by a BatchNorm2d inside an `nn.Sequential`
        (torchvision's conv-norm-activation blocks, VGG-BN, ResNet downsample). A BatchNorm in any other place stays
        (still correct, just not faster); so does a BatchNorm2d subclass whose own forward does more than normalise,
        except timm's `BatchNormAct2d`, which is replaced by its activation (`_folded_remainder`).

        Returns:
            self.
        """
        self.eval()
        for module in self.modules():
            for conv_name, bn_name in _conv_bn_pairs(module):
                conv, bn = getattr(module, conv_name), getattr(module, bn_name)
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, _folded_remainder(bn))
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
        and _folded_remainder(children[bn]) is not None
    ]


def _folded_remainder(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What takes a BatchNorm2d's place once it is folded into its conv; None where it must not be folded.

    A plain BatchNorm2d leaves nothing (Identity). timm's BatchNormAct2d normalises, then applies its `drop` and
    its `act` inside its own forward: it leaves its `act`, since `drop` is an identity in eval mode, the only mode
    of a fused detector. Any other subclass with a forward of its own does unknown extra work and is not folded.
    timm is looked up only if something imported it: without it, no BatchNormAct2d exists.
    """
    if type(bn).forward is nn.BatchNorm2d.forward:
        return nn.Identity()
    timm_bn_act = getattr(sys.modules.get("timm.layers"), "BatchNormAct2d", None)
    if timm_bn_act is not None and type(bn) is timm_bn_act:
        return bn.act
    return None
