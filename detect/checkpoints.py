"""Detector checkpoints: what training writes (`last.pt`, `best.pt`) and what val_det, predict, export, the API, resume
and fine-tuning read. This module sits above `detect.models` and `detect.losses`: it is where plugin code is consented.

A detector checkpoint is plain data (loads with `torch.load(weights_only=True)`):

    {"kind": "plugdet-detector", "arch": the detector spec (`DetectorSpec.to_arch`: backbone, neck, head + kwargs),
     "model": state_dict used for inference (the EMA weights when EMA is on),
     "class_names", "category_ids", "metrics", "config" (resolved, plain dict; its `imports` name the plugin
     modules that registered the parts), "epoch",
     "train_state": {...} (last.pt only: `detect.train.state.ResumeState.to_dict()`)}

A checkpoint is data: nothing read from it runs code. Its config's `imports` say which plugin modules registered its
parts, but plugdet never imports them on the checkpoint's word: the user names their plugin modules
(`imports=[...]` on train_det / val_det, `--imports` on predict and export, `load(weights, imports=[...])`), and a
checkpoint naming a module the user did not name is one line (`UserError`, exit 2 in the tools) that names it and
says how to allow it, with nothing imported (`consent_to_plugins`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.checkpoint import load_checkpoint
from backbones.errors import UserError
from detect.models.build import DetectorSpec, build_detector
from detect.models.detector import Detector
from detect.models.yolo_family import legacy_yolo_spec
from detect.plugins import import_plugins

logger = logging.getLogger("plugdet")

KIND = "plugdet-detector"


def detector_checkpoint(
    model: nn.Module,
    arch: Mapping[str, Any],
    class_names: Sequence[str],
    category_ids: Sequence[int],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    epoch: int,
    train_state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (see the module docstring); tensors are moved to the CPU."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint = {
        "kind": KIND,
        "arch": dict(arch),
        "model": state,
        "class_names": list(class_names),
        "category_ids": [int(c) for c in category_ids],
        "metrics": dict(metrics),
        "config": dict(config),
        "epoch": int(epoch),
    }
    if train_state is not None:
        checkpoint["train_state"] = dict(train_state)
    return checkpoint


def read_detector_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a detector checkpoint; anything else (a backbone.pt, a foreign file) is a UserError."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("kind") != KIND:
        what = (
            "a backbone checkpoint (from train_cls)"
            if "arch" in checkpoint and "kwargs" in checkpoint
            else (f"a file with keys {sorted(checkpoint)[:6]}")
        )
        raise UserError(f"{path} is not a plugdet detector checkpoint (from train_det.py): it is {what}")
    return checkpoint


def load_detector(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    fuse: bool = False,
    channels_last: bool = False,
    imports: Sequence[str] = (),
) -> tuple[Detector, dict[str, Any]]:
    """Build the detector a checkpoint file describes and load its inference weights (`detector_from_checkpoint`).

    Returns:
        (detector in eval mode, the checkpoint dict).
    """
    checkpoint = read_detector_checkpoint(path)
    return detector_from_checkpoint(checkpoint, device, fuse, channels_last, str(path), imports), checkpoint


def _module_key(name: str) -> str:
    """What identifies a plugin module: a dotted name as it is, a `.py` file by the module name plugdet imports it
    under (its stem: `detect.plugins` imports `parts.py` as `plugdet_plugin_parts`, wherever it lies)."""
    return f"file:{Path(name).stem}" if name.endswith(".py") else f"module:{name}"


def consent_to_plugins(checkpoint: Mapping[str, Any], imports: Sequence[str], where: str, how: str) -> None:
    """Refuse a checkpoint whose config names plugin modules the user did not name (`refuse_unnamed_plugins`); then
    import the user's own (`imports`), and only those."""
    refuse_unnamed_plugins(checkpoint, imports, where, how)
    import_plugins(imports)


def refuse_unnamed_plugins(checkpoint: Mapping[str, Any], imports: Sequence[str], where: str, how: str) -> None:
    """Raise when a checkpoint's config names plugin modules the user did not name; imports nothing.

    Args:
        checkpoint: a detector checkpoint dict (or an exported model's metadata, with "config").
        imports: the plugin modules the user named (the only ones ever imported).
        where: the file, for the message.
        how: how this tool or call names modules, e.g. "--imports MODULE" or "imports=[MODULE]".

    Raises:
        UserError: one line naming the modules the checkpoint needs and the user did not name.
    """
    needed = [str(m) for m in ((checkpoint.get("config") or {}).get("imports") or [])]
    named = {_module_key(str(m)) for m in imports}
    missing = [m for m in needed if _module_key(m) not in named]
    if missing:
        listed = ("," if "[" in how else " ").join(missing)  # imports=[a,b] or --imports a b
        raise UserError(f"{where} was trained with plugin modules {', '.join(missing)}, which you did not name: a "
                        f"checkpoint is data and plugdet never imports code because a file says so; if you trust "
                        f"them, name them yourself ({how.replace('MODULE', listed)})")  # fmt: skip


def spec_of(arch: Mapping[str, Any]) -> DetectorSpec:
    """The detector spec a checkpoint's `arch` holds; an `arch` written before the spec is the YOLOv8 it describes."""
    return DetectorSpec.from_arch(arch) if "spec" in arch else legacy_yolo_spec(arch)


def detector_from_checkpoint(
    checkpoint: Mapping[str, Any],
    device: str | torch.device = "cpu",
    fuse: bool = False,
    channels_last: bool = False,
    where: str = "checkpoint",
    imports: Sequence[str] = (),
    how: str = "imports=[MODULE]",
) -> Detector:
    """Build the detector a checkpoint dict describes and load its inference weights.

    The plugin modules the user named (`imports`) are imported first, after `consent_to_plugins` checked that they
    cover the checkpoint's; checkpoints written before the detector spec load as the YOLOv8 they describe.

    Args:
        checkpoint: from `read_detector_checkpoint`.
        device: where to put the model.
        fuse: fold BatchNorm into the convolutions (inference only; same outputs to ~1e-6, faster).
        channels_last: NHWC memory format (faster convolutions on CPU and CUDA; feed channels_last inputs too).
        where: the file, for messages.
        imports: the plugin modules the user named; how: how the caller names them (for the refusal).

    Returns:
        The detector in eval mode.
    """
    consent_to_plugins(checkpoint, imports, where, how)
    arch = checkpoint["arch"]
    model = build_detector(spec_of(arch))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise UserError(f"{where}: weights do not fit the architecture {arch}: {first}") from None
    model = model.to(device).eval()
    if fuse:
        model.fuse()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_detector_weights(model: Detector, path: str) -> int:
    """Initialise a detector from a detector checkpoint (`model.weights`: a train_det best.pt / last.pt, or an
    imported Ultralytics file), as fine-tuning does: every tensor whose name and shape match is copied; tensors of
    another shape (the class layers, for another number of classes) keep their initialisation and are listed in the
    log. A checkpoint that shares no tensor, or lacks one of the model's, is a UserError naming the key.

    Returns:
        The number of tensors copied.
    """
    saved = read_detector_checkpoint(path)["model"]
    own = model.state_dict()
    missing = [key for key in own if key not in saved]
    if missing:
        raise UserError(f"model.weights={path}: the checkpoint has no {missing[0]!r} ({len(missing)} of the model's "
                        f"{len(own)} tensors missing): it is another architecture than model.*")  # fmt: skip
    reshaped = [key for key in own if saved[key].shape != own[key].shape]
    model.load_state_dict({k: saved[k] if k not in reshaped else v for k, v in own.items()})
    kept = f"; kept {len(reshaped)} of other shapes ({', '.join(reshaped[:3])}...)" if reshaped else ""
    logger.info("model.weights: copied %d of %d tensors from %s%s", len(own) - len(reshaped), len(own), path, kept)
    return len(own) - len(reshaped)
