"""Ultralytics YOLOv8, YOLO11 and YOLO26 detection weights <-> plugdet `Detector` (the family's own backbone), n..x.

The two models compute the same function; only the parameter names differ. The names are mapped explicitly, layer
by layer (`ULTRALYTICS_LAYERS`) and child by child (`CHILD_NAMES`), never by position, so a foreign layout fails with
the first key that has no counterpart instead of loading silently into the wrong place. This module holds YOLOv8's
map; YOLO11's is in `detect.interop.ultralytics11`, YOLO26's in `detect.interop.ultralytics26`, and
`from_ultralytics` tells the families apart (`ultralytics_family`).

SECURITY — read before loading a file. An Ultralytics `.pt` is a pickle of Python objects (the whole model), and
unpickling a file can run arbitrary code. `from_ultralytics(path)` therefore first uses Ultralytics' own restricted
loader (`torch.load(weights_only=True)` with an allow-list of its model classes), which official checkpoints pass.
Only if you pass `trust_pickle=True` does it fall back to a full unpickle (`weights_only=False`) — do that only for a
file you trust as you would trust a script. This module is the one place in plugdet that may unpickle; everything
else reads checkpoints with `weights_only=True`. Loading a file needs the `ultralytics` package importable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.errors import UserError
from detect.interop.ultralytics11 import (
    is_yolo11_layout,
    our_key_to_yolo11,
    uses_c3k_everywhere,
    yolo11_key_to_ours,
    yolo11_scale,
)
from detect.interop.ultralytics26 import (
    is_yolo26_detector_state,
    is_yolo26_layout,
    our_key_to_yolo26,
    yolo26_key_to_ours,
)
from detect.models import Detector, build_detector, yolo_spec

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
# Our family (neck and head name) -> how Ultralytics says it.
FAMILY_NAMES = {"yolov8": "YOLOv8", "yolo11": "YOLO11", "yolo26": "YOLO26"}


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


def ultralytics_family(keys: Iterable[str]) -> str:
    """The family of an Ultralytics detection state dict: "yolo26" for YOLO26's layout (C2PSA attention in layer 10,
    an end-to-end Detect in layer 23), "yolo11" for YOLO11's (C2PSA, Detect with DFL bins in layer 23), else "yolov8"
    (whose map then names the first key that does not fit)."""
    keys = list(keys)
    if is_yolo26_layout(keys):
        return "yolo26"
    return "yolo11" if is_yolo11_layout(keys) else "yolov8"


def translate_ultralytics(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, str]:
    """An Ultralytics detection state dict in plugdet's names (float32 copies), with its family and scale.

    Returns:
        (our state dict, family "yolov8" | "yolo11" | "yolo26", scale "n".."x"); a UserError names the first key or
        shape that fits no family.
    """
    family = ultralytics_family(state)
    translate = {"yolov8": _translate_yolov8, "yolo11": _translate_yolo11, "yolo26": _translate_yolo26}[family]
    ours, scale = translate(state)
    return ours, family, scale


def from_ultralytics(source: Any, trust_pickle: bool = False) -> Detector:
    """Build a plugdet `Detector` holding the weights of an Ultralytics YOLOv8, YOLO11 or YOLO26 detection model.

    The family comes from the layout (`ultralytics_family`) and is logged ("loaded Ultralytics YOLO11n ..."); the
    detector is the family's own backbone, neck and head (`cspdarknet_<scale>`, `csp11_<scale>` or `csp26_<scale>`,
    neck and head "yolov8", "yolo11" or "yolo26"). The scale comes from the stem width (YOLO11 / YOLO26 m and l share
    it: the depth tells them apart), checked against the model's yaml `scale` when present; the number of classes and
    reg_max from the head's shapes. Outputs match Ultralytics' eval outputs (boxes there are cxcywh `[B, 4 + C, A]`,
    ours xyxy `[B, A, 4 + C]`; YOLO26: the end-to-end `[B, 300, 6]` of both, Ultralytics' with `end2end` set).
    A fused Ultralytics model (one branch dropped) is not a layout this reads.

    Args:
        source: an `ultralytics.YOLO`, a `DetectionModel`, or the path of a local Ultralytics `.pt` checkpoint.
        trust_pickle: allow a full unpickle (`weights_only=False`) when the restricted loader refuses the file; this
            runs code from the file — only for files you trust.

    Returns:
        A `Detector` in eval mode (call `.train()` to fine-tune it).
    """
    model = _resolve_model(source, trust_pickle)
    ours, family, scale = translate_ultralytics(model.state_dict())
    label = f"{FAMILY_NAMES[family]}{scale}"
    yaml = getattr(model, "yaml", None)
    yaml_scale = yaml.get("scale") if isinstance(yaml, dict) else None
    if yaml_scale and yaml_scale != scale:
        evidence = "stem width is" if family == "yolov8" else "stem width and depth are"
        raise UserError(f"Ultralytics model says scale {yaml_scale!r} but its {evidence} that of {scale!r}")
    num_classes = ours["head.cls_branch.0.pred.weight"].shape[0]
    reg_max = ours["head.box_branch.0.pred.weight"].shape[0] // 4
    if _DFL_KEYS[1] in ours:  # YOLO26 (reg_max 1) has no DFL bins
        ours[_DFL_KEYS[1]] = ours[_DFL_KEYS[1]].reshape(-1)  # [1, R, 1, 1] -> [R]
    with torch.device("meta"):  # no init work: every tensor comes from `ours` below
        detector = build_detector(yolo_spec(scale, num_classes, family=family, reg_max=reg_max))
    _check_same_layout(detector, ours, label)
    detector.load_state_dict(ours, strict=True, assign=True)
    logger.info("loaded Ultralytics %s (%d classes): %d tensors", label, num_classes, len(ours))
    return detector.eval()


def _float_copy(value: torch.Tensor) -> torch.Tensor:
    """A float32 copy (checkpoints hold fp16, and the detector must not share storage with the source model)."""
    return value.detach().to(torch.float32, copy=True) if value.is_floating_point() else value.clone()


def _translate_yolov8(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """YOLOv8 keys -> ours, and the scale from the stem width; a UserError for a key or stem of no YOLOv8."""
    ours = {}
    for key, value in state.items():
        try:
            ours[ultralytics_key_to_ours(key)] = _float_copy(value)
        except KeyError as err:
            raise UserError(f"not a YOLOv8 detection model: no plugdet counterpart for key {key!r}") from err
    stem = ours.get("backbone.stem.conv.weight")
    if stem is None or stem.shape[0] not in _SCALE_BY_STEM:
        raise UserError(f"not a YOLOv8 detection model: unexpected stem {None if stem is None else tuple(stem.shape)}")
    return ours, _SCALE_BY_STEM[stem.shape[0]]


def _translate_yolo11(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """YOLO11 keys -> ours, and the scale from the stem width and depth; a UserError for a key or shape of no
    YOLO11."""
    scale = yolo11_scale(state)
    if scale is None:
        stem = tuple(state["model.0.conv.weight"].shape) if "model.0.conv.weight" in state else None
        raise UserError(f"not a YOLO11 detection model: stem {stem} and the depth of layer 2 are no yolo11.yaml scale")
    c3k_everywhere = uses_c3k_everywhere(state)
    try:
        ours = {yolo11_key_to_ours(k, c3k_everywhere): _float_copy(v) for k, v in state.items()}
    except KeyError as err:
        raise UserError(f"not a YOLO11 detection model: no plugdet counterpart for key {err.args[0]!r}") from err
    return ours, scale


def _translate_yolo26(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """YOLO26 keys -> ours, and the scale from the stem width and depth (YOLO11's scales and rule); a UserError for a
    key or shape of no YOLO26."""
    scale = yolo11_scale(state)
    if scale is None:
        stem = tuple(state["model.0.conv.weight"].shape) if "model.0.conv.weight" in state else None
        raise UserError(f"not a YOLO26 detection model: stem {stem} and the depth of layer 2 are no yolo26.yaml scale")
    c3k_everywhere = uses_c3k_everywhere(state)
    try:
        ours = {yolo26_key_to_ours(k, c3k_everywhere): _float_copy(v) for k, v in state.items()}
    except KeyError as err:
        raise UserError(f"not a YOLO26 detection model: no plugdet counterpart for key {err.args[0]!r}") from err
    if "head.box_branch.0.pred.weight" not in ours:  # Ultralytics' fuse() drops the one-to-many branch
        raise UserError(f"not a YOLO26{scale} detection layout: no one-to-many head branch (a fused model?); import "
                        "the trained checkpoint")  # fmt: skip
    return ours, scale


def _check_same_layout(detector: Detector, ours: Mapping[str, torch.Tensor], label: str) -> None:
    """Raise a `UserError` naming the first key or shape that differs between the translated and built models."""
    expected = detector.state_dict()
    missing = [k for k in expected if k not in ours]
    unexpected = [k for k in ours if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"not a {label} detection layout: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, value in expected.items():
        if value.shape != ours[key].shape:
            raise UserError(
                f"{key}: shape {tuple(ours[key].shape)} in the Ultralytics model, {tuple(value.shape)} in ours"
            )


def to_ultralytics_state_dict(detector: Detector) -> dict[str, torch.Tensor]:
    """The state dict of an Ultralytics YOLOv8, YOLO11 or YOLO26 `DetectionModel` with the same weights (the family's
    own backbone only; a `csp11` backbone, which has a C2PSA, means YOLO11; a one-to-one head branch means YOLO26).

    Load it with `DetectionModel(f"yolov8{scale}.yaml", nc=C).load_state_dict(sd)` (or `yolo11` / `yolo26`).

    Args:
        detector: a `Detector` on `cspdarknet_<scale>` with the yolov8 neck and head, on `csp11_<scale>` with the
            yolo11 neck and head, or on `csp26_<scale>` with the yolo26 neck and head; not fused.

    Returns:
        {Ultralytics key: tensor (detached copy)}.
    """
    state = detector.state_dict()
    yolo11 = any(key.startswith("backbone.stages.3.c2psa.") for key in state)
    to_theirs = our_key_to_yolo11 if yolo11 else our_key_to_ultralytics
    if is_yolo26_detector_state(state):
        to_theirs = our_key_to_yolo26
    out = {}
    for key, value in state.items():
        try:
            theirs = to_theirs(key)
        except KeyError as err:
            raise UserError(f"to_ultralytics_state_dict: no Ultralytics counterpart for {key!r}") from err
        value = value.detach().clone()
        out[theirs] = value.reshape(1, -1, 1, 1) if key == _DFL_KEYS[1] else value
    return out
