"""The state of one detection training run between epochs (`tools/train_det.py` builds and advances it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from detect.config import config_to_dict
from detect.models.checkpoint import detector_checkpoint
from detect.precision import Precision
from detect.train.builders import training_state
from detect.train.distributed import DistInfo, unwrap
from detect.train.engine import Optimization, StepState


@dataclass
class DetRun:
    """Everything one training run holds between epochs (built by `setup`, advanced by `train_epoch`)."""

    cfg: Any
    info: DistInfo
    model: torch.nn.Module
    criterion: Any
    opt: Optimization
    precision: Precision
    train_set: Any
    val_set: Any
    loaders: tuple[Any, Any, Any]  # train loader, train sampler, val loader
    run_dir: Path
    arch: dict
    step: StepState = field(default_factory=StepState)
    position: tuple[int, int] = (0, 0)  # (epoch, batches of it done)
    partial_sums: dict | None = None
    best: dict = field(default_factory=lambda: {"AP": -1.0, "epoch": 0})
    summary: dict = field(default_factory=dict)  # COCO numbers of the last evaluation, stored with the checkpoint
    saved: tuple[int, int] | None = None  # the position last.pt holds (None: no last.pt yet)
    tb: Any = None

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights evaluated and saved: the EMA when on, else the model, never the DDP wrapper."""
        return self.opt.ema.ema if self.opt.ema is not None else unwrap(self.model)

    def checkpoint(self, metrics: dict, epoch: int, with_state: bool) -> dict:
        o, source = self.opt, self.train_set.source
        state = training_state(self.model, o.optimizer, o.ema, o.scaler, self.position, self.step.last_step,
                               self.best, self.partial_sums) if with_state else None  # fmt: skip
        return detector_checkpoint(self.evaluated, self.arch, list(source.class_names), list(source.category_ids),
                                   config_to_dict(self.cfg), metrics, epoch, state)  # fmt: skip
