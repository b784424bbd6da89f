"""The detector spec (what every detector checkpoint's `arch` holds) and the builders over the registries.

A spec names the backbone, the neck and the head, each with its keyword arguments, and the number of classes, so
`build_detector(spec)` rebuilds any registered family. Its checkpoint form (`DetectorSpec.to_arch`) is

    {"spec": 2, "num_classes": C, "backbone": {"name", "kwargs"}, "neck": {"name", "kwargs"}, "head": {...}}

Checkpoints written before the spec (main at 7293d08) are read as the YOLOv8 family they describe
(`DetectorSpec.from_arch`, `detect.models.yolo_family.legacy_yolo_spec`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbones.checkpoint import load_backbone_weights
from backbones.errors import UserError
from backbones.registry import build_backbone
from detect.models.detector import Detector
from detect.models.registry import NECKS, build_head, build_neck

logger = logging.getLogger("plugdet")

SPEC_VERSION = 2


@dataclass(frozen=True)
class PartSpec:
    """A registered part and the keyword arguments of its factory (plain data: str, numbers, lists, dicts)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}


@dataclass(frozen=True)
class DetectorSpec:
    """Everything `build_detector` needs to rebuild a detector: its classes and its three registered parts."""

    num_classes: int
    backbone: PartSpec
    neck: PartSpec
    head: PartSpec

    def to_arch(self) -> dict[str, Any]:
        """The checkpoint form (see the module docstring)."""
        return {"spec": SPEC_VERSION, "num_classes": int(self.num_classes), "backbone": self.backbone.to_dict(),
                "neck": self.neck.to_dict(), "head": self.head.to_dict()}  # fmt: skip

    @classmethod
    def from_arch(cls, arch: Mapping[str, Any]) -> DetectorSpec:
        """Read a checkpoint's `arch` in the spec form (the YOLOv8 form of checkpoints written before it is
        `detect.models.yolo_family.legacy_yolo_spec`'s, which `detect.checkpoints.spec_of` chooses)."""
        if "spec" not in arch:
            raise UserError(f"arch {dict(arch)} is not a detector spec (no 'spec' version)")
        if int(arch["spec"]) > SPEC_VERSION:
            raise UserError(f"detector spec version {arch['spec']} is newer than this plugdet's ({SPEC_VERSION})")
        parts = {key: PartSpec(str(arch[key]["name"]), dict(arch[key].get("kwargs") or {}))
                 for key in ("backbone", "neck", "head")}  # fmt: skip
        return cls(int(arch["num_classes"]), **parts)


def neck_takes_scale(name: str) -> bool:
    """Whether the registered neck's factory has a `scale` parameter (it then gets `model.scale`)."""
    return "scale" in inspect.signature(NECKS.get(name)).parameters


def build_detector(spec: DetectorSpec, backbone_weights: str | Path | Mapping[str, Any] | None = None) -> Detector:
    """Build the detector a spec describes from the registries.

    Args:
        spec: the parts and the number of classes.
        backbone_weights: a backbone checkpoint (`backbone.pt` from train_cls, or its dict) loaded strictly into the
            backbone; the number of transferred tensors is logged.

    Returns:
        A `Detector` in train mode (head biases at their family's priors).
    """
    if int(spec.num_classes) < 1:
        raise UserError(f"num_classes must be >= 1, got {spec.num_classes}")
    body = build_backbone(spec.backbone.name, **spec.backbone.kwargs)
    if backbone_weights is not None:
        count = load_backbone_weights(body, backbone_weights, arch=spec.backbone.name)
        source = backbone_weights if isinstance(backbone_weights, str | Path) else "a checkpoint dict"
        logger.info("backbone %s: transferred %d tensors from %s", spec.backbone.name, count, source)
    strides = tuple(int(s) for s in body.strides)
    neck = build_neck(spec.neck.name, body.out_channels, strides, **spec.neck.kwargs)
    head = build_head(spec.head.name, spec.num_classes, neck.out_channels, neck.strides, **spec.head.kwargs)
    return Detector(body, neck, head)
