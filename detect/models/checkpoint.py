"""Detector checkpoints: what `train_det.py` writes (`last.pt`, `best.pt`) and what `val_det.py` / `predict.py` read.

A detector checkpoint is plain data (loads with `torch.load(weights_only=True)`):

    {"kind": "plugdet-detector", "arch": the detector spec (`DetectorSpec.to_arch`: backbone, neck, head + kwargs),
     "model": state_dict used for inference (the EMA weights when EMA is on),
     "class_names", "category_ids", "metrics", "config" (resolved, plain dict; its `imports` name the plugin
     modules that registered the parts), "epoch",
     "train_state": {...} (last.pt only: raw weights, optimizer, EMA, scaler, position, RNG)}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from backbones.checkpoint import load_checkpoint
from backbones.errors import UserError
from detect.models.build import DetectorSpec, build_detector
from detect.models.detector import Detector
from detect.plugins import import_plugins

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
    path: str | os.PathLike, device: str | torch.device = "cpu", fuse: bool = False, channels_last: bool = False
) -> tuple[Detector, dict[str, Any]]:
    """Build the detector a checkpoint file describes and load its inference weights (`detector_from_checkpoint`).

    Returns:
        (detector in eval mode, the checkpoint dict).
    """
    checkpoint = read_detector_checkpoint(path)
    return detector_from_checkpoint(checkpoint, device, fuse, channels_last, where=str(path)), checkpoint


def detector_from_checkpoint(
    checkpoint: Mapping[str, Any],
    device: str | torch.device = "cpu",
    fuse: bool = False,
    channels_last: bool = False,
    where: str = "checkpoint",
) -> Detector:
    """Build the detector a checkpoint dict describes and load its inference weights.

    The plugin modules of the checkpoint's config (`imports`) are imported first, so parts registered outside
    plugdet rebuild too; checkpoints written before the detector spec load as the YOLOv8 they describe.

    Args:
        checkpoint: from `read_detector_checkpoint`.
        device: where to put the model.
        fuse: fold BatchNorm into the convolutions (inference only; same outputs to ~1e-6, faster).
        channels_last: NHWC memory format (faster convolutions on CPU and CUDA; feed channels_last inputs too).
        where: the file, for messages.

    Returns:
        The detector in eval mode.
    """
    import_plugins((checkpoint.get("config") or {}).get("imports") or [])
    arch = checkpoint["arch"]
    model = build_detector(DetectorSpec.from_arch(arch))
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
