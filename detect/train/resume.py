"""The part every resumable checkpoint shares (train_cls's last.pt and train_det's `train_state`).

Weights, optimizer, EMA and AMP scaler states, the position (epoch, batches done), the best score so far and the
global RNG states; `detect.train.classify.make_checkpoint` and `detect.train.builders.training_state` add their
own keys.
Everything is plain data and tensors, so the checkpoint loads with `weights_only=True`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backbones.errors import UserError
from detect.train.distributed import unwrap
from detect.train.optim import ModelEMA
from detect.train.seeding import rng_state, set_rng_state


def resume_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: ModelEMA | None,
    scaler: torch.amp.GradScaler | None,
    position: tuple[int, int],
    best: dict[str, Any],
) -> dict[str, Any]:
    """The shared resume keys: model, optimizer, ema, scaler, epoch, batch, best, rng.

    Args:
        model: the trained model (a DDP wrapper is unwrapped).
        position: (epoch in progress, batches of it done); (E, 0) at the boundary after epoch E - 1.
        best: the best evaluation so far (e.g. {"top1", "epoch"} or {"AP", "AP50", "epoch"}).
    """
    return {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": position[0],
        "batch": position[1],
        "best": dict(best),
        "rng": rng_state(),
    }


def restore_resume_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: ModelEMA | None,
    scaler: torch.amp.GradScaler | None,
    path: str,
) -> tuple[tuple[int, int], dict[str, Any]]:
    """Load `resume_state` keys into the training objects and the global RNGs.

    Returns:
        (position (epoch, batch), best) to continue from.

    Raises:
        UserError: the state does not fit the model or optimizer, or EMA is asked for and the run had none (names
            `path`).
    """
    try:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            if state.get("ema") is None:
                raise UserError(f"{path} was trained without train.ema; cannot resume with train.ema=true")
            ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"cannot resume from {path}: {str(exc).strip().splitlines()[0]}") from None
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return (int(state["epoch"]), int(state["batch"])), dict(state["best"])
