"""One resume state for every run: the model, its optimisation, the position and the best score so far.

A classification last.pt holds `ResumeState.to_dict()` at its top level (beside `config`, `arch`, `class_names`); a
detection last.pt holds it as `train_state` (beside the inference weights, `detect.checkpoints`). Everything is plain
data and tensors, so the checkpoint loads with `weights_only=True`. Files written before this class (train_cls's
`epoch_sums`, train_det's `partial_sums`) still load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from backbones.errors import UserError
from detect.train.distributed import unwrap
from detect.train.engine import StepState, pending_gradients, restore_gradients
from detect.train.optim import ModelEMA
from detect.train.seeding import rng_state, set_rng_state

_OLD_SUMS_KEYS = ("epoch_sums", "partial_sums")  # train_cls's and train_det's names before this class


@dataclass(kw_only=True)
class ResumeState(StepState):
    """Everything a run continues from, exactly (bit-identical on CPU with a fixed seed).

    Attributes:
        model: the trained model (a DDP wrapper is unwrapped when saved).
        optimizer, ema, scaler: its optimisation (EMA and the fp16 scaler are optional).
        position: (epoch in progress, batches of it done); (E, 0) at the boundary after epoch E - 1.
        best: the best evaluation so far, e.g. {"top1", "top5", "epoch"} or {"AP", "AP50", "epoch"}.
        sums: the running sums of an interrupted epoch (classification: [loss * n, correct, n]; detection: a
            `LossSums` state), so that the resumed epoch's results row equals an uninterrupted one.
        last_step: (`StepState`) the global iteration of the last optimizer step (detection's gradient
            accumulation; the engine updates it in place).
        keep_gradients: save gradients not yet stepped (detection accumulates them over batches).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: ModelEMA | None = None
    scaler: torch.amp.GradScaler | None = None
    position: tuple[int, int] = (0, 0)
    best: dict[str, Any] = field(default_factory=dict)
    sums: Any = None
    keep_gradients: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The state as plain data and tensors (CPU), with the global RNG states."""
        sums = self.sums
        return {
            "model": {k: v.detach().cpu() for k, v in unwrap(self.model).state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.position[0],
            "batch": self.position[1],
            "best": dict(self.best),
            "sums": (dict(sums) if isinstance(sums, Mapping) else list(sums)) if sums else None,
            "last_step": self.last_step,
            "gradients": pending_gradients(self.model) if self.keep_gradients else {},
            "rng": rng_state(),
        }

    def restore(self, saved: Mapping[str, Any], path: str) -> None:
        """Load a `to_dict` (or an older file's) state into the training objects, the global RNGs and this object.

        Raises:
            UserError: a part is missing, or the state does not fit the model or optimizer, or EMA is asked for and
                the run had none (names `path`).
        """
        missing = [key for key in ("model", "optimizer", "epoch", "batch", "best", "rng") if key not in saved]
        if missing:
            raise UserError(f"{path} holds no complete training state (missing {', '.join(missing)}): resume from "
                            "the run's last.pt")  # fmt: skip
        try:
            unwrap(self.model).load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.ema is not None:
                if saved.get("ema") is None:
                    raise UserError(f"{path} was trained without train.ema; cannot resume with train.ema=true")
                self.ema.load_state_dict(saved["ema"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"cannot resume from {path}: {str(exc).strip().splitlines()[0]}") from None
        if self.scaler is not None and saved.get("scaler") is not None:
            self.scaler.load_state_dict(saved["scaler"])
        restore_gradients(self.model, saved.get("gradients") or {})
        set_rng_state(saved["rng"])
        self.position = (int(saved["epoch"]), int(saved["batch"]))
        self.best = dict(saved["best"])
        self.sums = next((saved[k] for k in ("sums", *_OLD_SUMS_KEYS) if saved.get(k) is not None), None)
        self.last_step = int(saved.get("last_step", -1))
