"""Ultralytics YOLOv8 detection weights <-> plugdet `Detector` (default CSP-Darknet backbone), every scale n..x.

The two models compute the same function; only the parameter names differ. The names are mapped explicitly, layer
by layer (`ULTRALYTICS_LAYERS`) and child by child (`CHILD_NAMES`), never by position, so a foreign layout fails with
the first key that has no counterpart instead of loading silently into the wrong place.

SECURITY — read before loading a file. An Ultralytics `.pt` is a pickle of Python objects (the whole model), and
unpickling a file can run arbitrary code. `from_ultralytics(path)` therefore first uses Ultralytics' own restricted
loader (`torch.load(weights_only=True)` with an allow-list of its model classes), which official checkpoints pass.
Only if you pass `trust_pickle=True` does it fall back to a full unpickle (`weights_only=False`) — do that only for a
file you trust as you would trust a script. This module is the one place in plugdet that may unpickle; everything
else reads checkpoints with `weights_only=True`. Loading a file needs the `ultralytics` package importable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.errors import UserError
from detect.models import Detector, build_yolo

logger = logging.getLogger("plugdet")

# Layer index in Ultralytics' yolov8.yaml -> (our module path, kind of block). Indices 10, 11, 13, 14, 17, 20 are
# Upsample/Concat (no parameters).
ULTRALYTICS_LAYERS: dict[int, tuple[str, str]] = {
    0: ("backbone.stem", "conv"),
    1: ("backbone.stages.0.downsample", "conv"),
    2: ("backbone.stages.0.c2f", "c2f"),
    3: ("backbone.stages.1.downsample", "conv"),
    4: ("backbone.stages.1.c2f", "c2f"),
    5: ("backbone.stages.2.downsample", "conv"),
    6: ("backbone.stages.2.c2f", "c2f"),
    7: ("backbone.stages.3.downsample", "conv"),
    8: ("backbone.stages.3.c2f", "c2f"),
    9: ("backbone.stages.3.sppf", "sppf"),
    12: ("neck.top_down_p4", "c2f"),
    15: ("neck.top_down_p3", "c2f"),
    16: ("neck.downsample_p3", "conv"),
    18: ("neck.bottom_up_p4", "c2f"),
    19: ("neck.downsample_p4", "conv"),
    21: ("neck.bottom_up_p5", "c2f"),
    22: ("head", "detect"),
}
# Their child name -> ours, per kind of block. A ConvBNAct's own children (`conv`, `bn`) have the same names.
CHILD_NAMES: dict[str, dict[str, str]] = {
    "c2f": {"cv1": "split_conv", "cv2": "fuse_conv", "m": "blocks"},
    "bottleneck": {"cv1": "conv1", "cv2": "conv2"},
    "sppf": {"cv1": "reduce_conv", "cv2": "fuse_conv"},
    "detect": {"cv2": "box_branch", "cv3": "cls_branch"},
    "branch": {"0": "conv1", "1": "conv2", "2": "pred"},
}
_REVERSED = {kind: {ours: theirs for theirs, ours in table.items()} for kind, table in CHILD_NAMES.items()}
_DFL_KEYS = ("model.22.dfl.conv.weight", "head.dfl_bins")  # the frozen DFL bins: [1, R, 1, 1] theirs, [R] ours
# Stem width -> scale (scale_width(64, width): 16, 32, 48, 64, 80 — one per scale).
_SCALE_BY_STEM = {16: "n", 32: "s", 48: "m", 64: "l", 80: "x"}


def _rename_tail(kind: str, parts: list[str], tables: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Rename the parts of a key below a layer; raises KeyError for a name with no counterpart."""
    if kind == "conv":
        return parts
    if kind == "sppf":
        return [tables["sppf"][parts[0]], *parts[1:]]
    if kind == "c2f" and parts[1].isdigit():  # a bottleneck: m.<i>.cv1.conv.weight
        return [tables["c2f"][parts[0]], parts[1], tables["bottleneck"][parts[2]], *parts[3:]]
    if kind == "c2f":
        return [tables["c2f"][parts[0]], *parts[1:]]
    # detect: cv2.<level>.<0|1|2>.(conv|bn).weight or cv2.<level>.2.weight
    if not parts[1].isdigit():
        raise KeyError(parts[1])
    return [tables["detect"][parts[0]], parts[1], tables["branch"][parts[2]], *parts[3:]]


def ultralytics_key_to_ours(key: str) -> str:
    """Map one Ultralytics YOLOv8 state-dict key to the plugdet `Detector` key.

    Args:
        key: e.g. "model.2.m.0.cv1.conv.weight".

    Returns:
        e.g. "backbone.stages.0.c2f.blocks.0.conv1.conv.weight".

    Raises:
        KeyError: the key has no counterpart (not a YOLOv8 detection layout).
    """
    if key == _DFL_KEYS[0]:
        return _DFL_KEYS[1]
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "model" or not parts[1].isdigit() or int(parts[1]) not in ULTRALYTICS_LAYERS:
        raise KeyError(key)
    prefix, kind = ULTRALYTICS_LAYERS[int(parts[1])]
    return ".".join([prefix, *_rename_tail(kind, parts[2:], CHILD_NAMES)])


def our_key_to_ultralytics(key: str) -> str:
    """Inverse of `ultralytics_key_to_ours`; raises KeyError for a key of another layout."""
    if key == _DFL_KEYS[1]:
        return _DFL_KEYS[0]
    for index, (prefix, kind) in ULTRALYTICS_LAYERS.items():
        if key.startswith(prefix + "."):
            tail = key[len(prefix) + 1 :].split(".")
            return ".".join(["model", str(index), *_rename_tail(kind, tail, _REVERSED)])
    raise KeyError(key)


def _resolve_model(source: Any, trust_pickle: bool) -> nn.Module:
    """The Ultralytics `DetectionModel` inside a YOLO object, a DetectionModel or a checkpoint path."""
    if isinstance(source, str | Path):
        source = _load_checkpoint_model(Path(source), trust_pickle)
    inner = getattr(source, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "yaml"):  # a YOLO wrapper around a DetectionModel
        source = inner
    if not isinstance(source, nn.Module) or not isinstance(getattr(source, "model", None), nn.Sequential):
        raise UserError(f"from_ultralytics: expected a YOLO, a DetectionModel or a .pt path, got {type(source)}")
    return source


def _load_checkpoint_model(path: Path, trust_pickle: bool) -> nn.Module:
    """Load the model object of an Ultralytics checkpoint file (see the module docstring on safety)."""
    if not path.is_file():  # checked first: Ultralytics' loader would try to download a missing name
        raise UserError(f"Ultralytics checkpoint not found: {path}")
    try:
        from ultralytics.nn.tasks import torch_safe_load
    except ImportError as err:
        raise UserError(f"loading {path} needs the `ultralytics` package (pip install ultralytics)") from err
    try:
        checkpoint, _ = torch_safe_load(str(path), safe_only=True)  # weights_only=True + Ultralytics' allow-list
    except Exception as err:  # refused by the allow-list, or an Ultralytics without the restricted loader
        if not trust_pickle:
            raise UserError(
                f"{path}: the restricted loader refused this file ({type(err).__name__}: {err}); if you trust it as "
                "code, pass trust_pickle=True to unpickle it fully"
            ) from err
        logger.warning("unpickling %s with weights_only=False: this runs code from the file (trust_pickle=True)", path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # explicit opt-in, see module docstring
    if isinstance(checkpoint, nn.Module):
        return checkpoint
    if isinstance(checkpoint, dict):
        for name in ("ema", "model"):  # Ultralytics' own preference: the EMA weights first
            if isinstance(checkpoint.get(name), nn.Module):
                return checkpoint[name]
    raise UserError(f"{path}: not an Ultralytics checkpoint (no model object under 'ema' or 'model')")


def from_ultralytics(source: Any, trust_pickle: bool = False) -> Detector:
    """Build a plugdet `Detector` holding the weights of an Ultralytics YOLOv8 detection model.

    The scale comes from the stem width (checked against the model's yaml `scale` when present), the number of
    classes and reg_max from the head's shapes. Outputs match Ultralytics' eval outputs (boxes there are cxcywh
    `[B, 4 + C, A]`; ours are xyxy `[B, A, 4 + C]`).

    Args:
        source: an `ultralytics.YOLO`, a `DetectionModel`, or the path of a local Ultralytics `.pt` checkpoint.
        trust_pickle: allow a full unpickle (`weights_only=False`) when the restricted loader refuses the file; this
            runs code from the file — only for files you trust.

    Returns:
        A `Detector` in eval mode (call `.train()` to fine-tune it).
    """
    model = _resolve_model(source, trust_pickle)
    try:  # float32 copies: checkpoints hold fp16, and the detector must not share storage with `model`
        ours = {
            ultralytics_key_to_ours(k): v.detach().to(torch.float32, copy=True) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()
        }
    except KeyError as err:
        raise UserError(f"not a YOLOv8 detection model: no plugdet counterpart for key {err.args[0]!r}") from err
    stem = ours.get("backbone.stem.conv.weight")
    if stem is None or stem.shape[0] not in _SCALE_BY_STEM:
        raise UserError(f"not a YOLOv8 detection model: unexpected stem {None if stem is None else tuple(stem.shape)}")
    scale = _SCALE_BY_STEM[stem.shape[0]]
    yaml = getattr(model, "yaml", None)
    yaml_scale = yaml.get("scale") if isinstance(yaml, dict) else None
    if yaml_scale and yaml_scale != scale:
        raise UserError(f"Ultralytics model says scale {yaml_scale!r} but its stem width is that of {scale!r}")
    num_classes = ours["head.cls_branch.0.pred.weight"].shape[0]
    reg_max = ours["head.box_branch.0.pred.weight"].shape[0] // 4
    ours[_DFL_KEYS[1]] = ours[_DFL_KEYS[1]].reshape(-1)  # [1, R, 1, 1] -> [R]
    with torch.device("meta"):  # no init work: every tensor comes from `ours` below
        detector = build_yolo(scale, num_classes=num_classes, reg_max=reg_max)
    _check_same_layout(detector, ours, scale)
    detector.load_state_dict(ours, strict=True, assign=True)
    logger.info("loaded Ultralytics YOLOv8%s (%d classes): %d tensors", scale, num_classes, len(ours))
    return detector.eval()


def _check_same_layout(detector: Detector, ours: Mapping[str, torch.Tensor], scale: str) -> None:
    """Raise a `UserError` naming the first key or shape that differs between the translated and built models."""
    expected = detector.state_dict()
    missing = [k for k in expected if k not in ours]
    unexpected = [k for k in ours if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"not a YOLOv8{scale} detection layout: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, value in expected.items():
        if value.shape != ours[key].shape:
            raise UserError(
                f"{key}: shape {tuple(ours[key].shape)} in the Ultralytics model, {tuple(value.shape)} in ours"
            )


def to_ultralytics_state_dict(detector: Detector) -> dict[str, torch.Tensor]:
    """The state dict of an Ultralytics YOLOv8 `DetectionModel` with the same weights (default backbone only).

    Load it with `DetectionModel(f"yolov8{scale}.yaml", nc=C).load_state_dict(sd)`.

    Args:
        detector: a `Detector` on `cspdarknet_<scale>`, not fused.

    Returns:
        {Ultralytics key: tensor (detached copy)}.
    """
    out = {}
    for key, value in detector.state_dict().items():
        try:
            theirs = our_key_to_ultralytics(key)
        except KeyError as err:
            raise UserError(f"to_ultralytics_state_dict: no Ultralytics counterpart for {key!r}") from err
        value = value.detach().clone()
        out[theirs] = value.reshape(1, -1, 1, 1) if key == _DFL_KEYS[1] else value
    return out
