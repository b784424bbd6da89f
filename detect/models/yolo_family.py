"""The YOLO family (YOLOv8, YOLO11, YOLO26) as a spec: its neck and head at a scale on any backbone, and the checkpoints
written before the detector spec existed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backbones.csp import CSP_SCALES
from backbones.errors import UserError
from detect.models.build import DetectorSpec, PartSpec, build_detector
from detect.models.detector import Detector

FAMILY_BACKBONES = {"yolov8": "cspdarknet", "yolo11": "csp11", "yolo26": "csp26"}  # family -> its backbone, per scale
FAMILY_REG_MAX = {"yolov8": 16, "yolo11": 16, "yolo26": 1}  # DFL bins per side (1: raw distances, no DFL)


def yolo_spec(
    scale: str = "n",
    num_classes: int = 80,
    backbone: str | None = None,
    family: str = "yolov8",
    reg_max: int | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> DetectorSpec:
    """The spec of a YOLO-family detector: `family` ("yolov8", "yolo11" or "yolo26") neck and head at `scale` on any
    backbone (default: the family's own, `cspdarknet_<scale>`, `csp11_<scale>` or `csp26_<scale>`); `reg_max` None is
    the family's (`FAMILY_REG_MAX`: 16, or 1 for YOLO26, whose head takes no other)."""
    if scale not in CSP_SCALES:
        raise UserError(f"unknown detector scale {scale!r}: choose one of {', '.join(CSP_SCALES)}")
    if family not in FAMILY_BACKBONES:
        raise UserError(f"unknown YOLO family {family!r}: choose one of {', '.join(FAMILY_BACKBONES)}")
    default_backbone = f"{FAMILY_BACKBONES[family]}_{scale}"
    return DetectorSpec(
        num_classes=int(num_classes),
        backbone=PartSpec(backbone or default_backbone, dict(backbone_kwargs or {})),
        neck=PartSpec(family, {"scale": scale}),
        head=PartSpec(family, {"reg_max": int(FAMILY_REG_MAX[family] if reg_max is None else reg_max)}),
    )


def legacy_yolo_spec(arch: Mapping[str, Any]) -> DetectorSpec:
    """The spec of an `arch` written before the spec (main at 7293d08): `{"scale", "num_classes", "backbone",
    "reg_max"}`, always YOLOv8's neck and head."""
    return yolo_spec(arch.get("scale", "n"), int(arch["num_classes"]), arch.get("backbone"),
                     reg_max=int(arch.get("reg_max", 16)))  # fmt: skip


def build_yolo(
    scale: str = "n",
    num_classes: int = 80,
    backbone: str | None = None,
    backbone_weights: str | Path | Mapping[str, Any] | None = None,
    reg_max: int | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    family: str = "yolov8",
) -> Detector:
    """A YOLOv8 (or YOLO11, `family="yolo11"`, or YOLO26, `family="yolo26"`) detector at a scale, on any registered
    backbone; `reg_max` None is the family's (16; YOLO26: 1).

    With the default backbone and 80 classes the parameter counts are exactly Ultralytics': YOLOv8 n 3,157,200,
    s 11,166,560, m 25,902,640, l 43,691,520, x 68,229,648; YOLO11 n 2,624,080, s 9,458,752, m 20,114,688,
    l 25,372,160, x 56,966,176; YOLO26 (both head branches, as trained) n 2,572,280, s 10,009,784, m 21,896,248,
    l 26,299,704, x 58,993,368.
    """
    spec = yolo_spec(scale, num_classes, backbone, family, reg_max, backbone_kwargs)
    return build_detector(spec, backbone_weights)
