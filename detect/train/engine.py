"""Detection training as plain functions (STYLE 8): one epoch of any head family's training.

`train_one_epoch` follows YOLOv8's step: warmup of lr / momentum / accumulation per iteration (`optim.warmup_*`),
gradients accumulated up to the nominal batch size, gradient-norm clipping, an optimizer step, an EMA update. Every
step runs with Ctrl-C / SIGTERM deferred (`cli.deferred_interrupts`), so an interrupted run always stops between two
consistent steps; `StepState` tells where, and a resume skips exactly the batches already folded into an
optimizer step. The engine names no loss part: it logs, averages and checkpoints whatever `parts` the criterion
returns (`criterion(raw_outputs, targets) -> (total, parts)`).

Under DDP no rank stops alone (issue 12): before each step every rank says whether its batch loaded and whether it
holds a signal (`group_faults.agree`), after the forward whether its loss is finite (`_check_finite`), so a fault on
one rank stops all of them at the same step, and an interrupted epoch's loss sums are those of all ranks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from backbones.errors import UserError
from backbones.freeze import keep_frozen_bn_eval
from detect.precision import Precision, fp16_overflowing, leave_fp16
from detect.train.distributed import all_reduce_sum, fetch, get_rank, get_world_size, is_main_process, unwrap
from detect.train.group_faults import agree
from detect.train.optim import ModelEMA, set_group_values, warmup_accumulate, warmup_values, yolo_lr_factor
from detect.train.signals import AgreedInterrupt, ForcedStop, TrainingInterrupted, deferred_interrupts, leaving


@dataclass(frozen=True)
class Schedule:
    """YOLOv8's per-iteration lr, momentum and accumulation, from plain numbers.

    The epoch's lr is lr * yolo_lr_factor(epoch); during the first `warmup_iters` iterations the bias group's lr
    falls from `warmup_bias_lr`, the others rise from 0, momentum rises from `warmup_momentum`, and gradient
    accumulation ramps from 1 batch to nominal_batch_size / batch_size.
    """

    lr: float
    lrf: float
    epochs: int
    scheduler: str
    momentum: float
    warmup_iters: int
    warmup_bias_lr: float
    warmup_momentum: float
    batch_size: int
    nominal_batch_size: int

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, iteration: int) -> int:
        """Set every group's lr / momentum for a global iteration; returns the batches to accumulate."""
        target = self.lr * yolo_lr_factor(epoch, self.epochs, self.lrf, self.scheduler)
        names = [group.get("name", "") for group in optimizer.param_groups]
        scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]  # MuSGD's class branches: 3
        values = warmup_values(iteration, self.warmup_iters, names, target, self.momentum, self.warmup_bias_lr,
                               self.warmup_momentum, scales)  # fmt: skip
        set_group_values(optimizer, values)
        return warmup_accumulate(iteration, self.warmup_iters, self.nominal_batch_size, self.batch_size)


@dataclass
class StepState:
    """Where training stands: the global iteration of the last optimizer step (-1 before the first), and whether the
    loop left an overflowing fp16 for bf16 (`_fall_back`; the run adopts it for its later epochs, its evaluation and
    its checkpoints' config)."""

    last_step: int = -1
    fell_back_to_bf16: bool = False


def _check_finite(total: torch.Tensor, parts: Mapping[str, torch.Tensor], epoch: int, batch: int, step: int,
                  may_fall_back: bool = False) -> bool:  # fmt: skip
    """A non-finite loss stops training before it reaches the weights (DESIGN §8); names the part and the step.
    Returns True when every loss is finite; False, instead of stopping, when `may_fall_back` (fp16 under `auto`,
    which then runs the batch again in bf16).

    Under DDP every process learns of any process's non-finite loss at the same step (one small all-reduce of the
    flags), so all stop together, before the backward pass that would otherwise wait for the missing rank forever;
    the message names the rank, and only rank 0 prints it (`rank0_reports`).
    """
    names, world = list(parts), get_world_size()
    flags = torch.zeros(world, len(names) + 1, dtype=torch.float64)  # [ranks, parts + total]: 1 = non-finite
    values = torch.stack([v.detach().double().reshape(()) for v in (*parts.values(), total)]).cpu()
    flags[get_rank()] = (~torch.isfinite(values)).double()
    if world > 1:
        all_reduce_sum(flags)
    bad_ranks = [rank for rank in range(world) if flags[rank].any()]
    if not bad_ranks or may_fall_back:
        return not bad_ranks
    rank = bad_ranks[0]
    bad = [name for k, name in enumerate(names) if flags[rank, k]] or ["total"]
    mine = rank == get_rank()
    shown = ", ".join(f"{name}={float(parts.get(name, total).detach())}" if mine else name for name in bad)
    where = f" on rank {rank}" if world > 1 else ""
    error = UserError(
        f"non-finite loss ({shown}){where} at epoch {epoch + 1}, batch {batch + 1} (iteration {step}): stopped "
        "before the weights changed; last.pt keeps the last good epoch (try a lower train.lr, or train.precision=fp32)"
    )
    error.rank0_reports = True  # every rank raises it; run_tool prints it on rank 0 only
    if world > 1:
        leaving()  # torchrun's SIGTERM to the ranks still running must not cut their exit short
    raise error


def pending_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients accumulated since the last optimizer step (empty right after a step), by parameter name."""
    return {name: p.grad.detach().cpu().clone() for name, p in unwrap(model).named_parameters() if p.grad is not None}


def restore_gradients(model: nn.Module, gradients: Mapping[str, torch.Tensor]) -> None:
    """Put `pending_gradients` back, so a resumed run continues the interrupted accumulation exactly."""
    params = dict(unwrap(model).named_parameters())
    for name, grad in gradients.items():
        params[name].grad = grad.to(params[name].device, params[name].dtype).clone()


def _optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float,
    where: str = "",
) -> None:
    """Unscale, clip the gradient norm, step (skipped by the scaler on fp16 overflow), zero the gradients.

    Without a scaler, a non-finite gradient norm (a finite loss can still overflow in backward) is a UserError
    raised before the step, so the weights stay finite; `where` names the position for that message.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip)
        if scaler is None and not torch.isfinite(norm):
            raise UserError(f"non-finite gradient norm ({float(norm)}) {where}: stopped before the weights changed; "
                            "last.pt keeps the last good epoch (try a lower train.lr)")  # fmt: skip
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Optimization:
    """What updates the weights: the optimizer and its schedule, the EMA, the fp16 scaler, gradient clipping."""

    optimizer: torch.optim.Optimizer
    schedule: Schedule
    ema: ModelEMA | None = None
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float = 10.0


@dataclass(frozen=True)
class EpochStart:
    """Where an epoch starts: 0-based `epoch`, `batch` batches of it already done (resume), and `sums`, the loss
    sums of those batches (`LossSums.to_state`), so a resumed epoch reports the same means as an uninterrupted one."""

    epoch: int
    batch: int = 0
    sums: Mapping[str, Any] | None = None


class LossSums:
    """Running sums of the criterion's loss parts over an epoch's batches, whatever their names."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        self.parts: dict[str, float] = dict((state or {}).get("parts", {}))
        self.batches: int = int((state or {}).get("batches", 0))

    def add(self, parts: Mapping[str, torch.Tensor]) -> None:
        values = torch.stack([v.detach().double() for v in parts.values()]).cpu().tolist()  # one sync per step
        for name, value in zip(parts, values, strict=True):
            self.parts[name] = self.parts.get(name, 0.0) + value
        self.batches += 1

    def means(self) -> dict[str, float]:
        return {name: total / max(self.batches, 1) for name, total in self.parts.items()}

    def to_state(self) -> dict[str, Any]:
        return {"parts": dict(self.parts), "batches": self.batches}

    def all_reduce(self) -> None:
        """Sum over processes (every process has the same part names, in the same order)."""
        totals = torch.tensor([*self.parts.values(), float(self.batches)], dtype=torch.float64)
        all_reduce_sum(totals)
        self.parts = dict(zip(self.parts, totals[:-1].tolist(), strict=True))
        self.batches = int(totals[-1])


def _train_step(
    model: nn.Module, criterion: Callable, images: torch.Tensor, targets: torch.Tensor, precision: Precision
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward (under autocast) and the criterion in float32; a family that needs the targets in its forward
    (two-stage) gets them, and its criterion reads the losses from its raw outputs."""
    inputs = precision.to_input(images)
    with precision.autocast():
        outputs = model(inputs, targets) if unwrap(model).head.needs_targets else model(inputs)
    if isinstance(outputs, list | tuple) and all(isinstance(o, torch.Tensor) for o in outputs):
        outputs = [o.float() for o in outputs]
    return criterion(outputs, targets)


def _fall_back(opt: Optimization, state: StepState, precision: Precision, why: str) -> Precision:
    """Leave an overflowing fp16 for bf16 for the rest of the epoch (`detect.precision.leave_fp16`): no scaler from
    here on; `state.fell_back_to_bf16` tells the run to keep bf16 after the epoch. Every DDP rank sees the same sign
    at the same step (the loss flags are all-reduced; the scale follows the all-reduced gradients)."""
    line = leave_fp16(opt.scaler, opt.optimizer, why)
    if is_main_process():
        tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it
    opt.scaler, state.fell_back_to_bf16 = None, True
    return precision.with_bf16()


def _step(model: nn.Module, opt: Optimization, where: str) -> None:
    """The optimizer step (see `_optimizer_step`) and the EMA update after it."""
    _optimizer_step(model, opt.optimizer, opt.scaler, opt.grad_clip, where)
    if opt.ema is not None:
        opt.ema.update(model)


def train_one_epoch(
    model: nn.Module,
    criterion: Callable,
    loader: Any,
    opt: Optimization,
    state: StepState,
    start: EpochStart,
    precision: Precision,
) -> dict[str, float]:
    """One epoch of detection training.

    Args:
        model: the detector (possibly DDP-wrapped); train-mode output = its head's raw outputs.
        criterion: `criterion(raw_outputs, targets) -> (total, parts)`; `total` is what is back-propagated.
        loader: yields (images uint8 [B,3,S,S], targets [N,6], metas); its sampler already skips `start.batch`.
        opt: optimizer, schedule, EMA, scaler, clipping; `state.last_step` is updated in place.
        start: the epoch and the resume position inside it.
        precision: device, autocast and memory layout.

    Returns:
        The mean of every loss part over the epoch's batches (per batch, averaged over processes), "img_per_s" and
        the last lr of each group (`lr/pg0`, ...).

    Raises:
        TrainingInterrupted: Ctrl-C / SIGTERM, between two steps, with the batches of this epoch done and their
            `LossSums` state (under DDP: all ranks' sums, the same on every rank); gradients not yet stepped stay on
            the parameters (`pending_gradients`).
        UserError, RunError: under DDP, a batch that failed to load on any rank, raised on every rank at the same
            step (`group_faults.agree`); a non-finite loss on any rank (`_check_finite`).
    """
    model.train()
    keep_frozen_bn_eval(model)
    epoch, iters_per_epoch, world = start.epoch, start.batch + len(loader), get_world_size()
    # Resumed sums are all ranks' (`TrainingInterrupted`): rank 0 alone carries them on, or the reduction counts
    # them once per rank.
    sums = LossSums(start.sums if get_rank() == 0 else None)
    images_seen, t0 = 0, time.perf_counter()
    # A criterion whose total sums over its batch (YOLO's) is scaled by the world size, so that DDP's gradient
    # average gives the global batch's sum; a mean-reduced one (torchvision's families) is back-propagated as it is.
    sums_batch = getattr(criterion, "reduction", "sum") == "sum"
    bar = tqdm(fetch(loader), total=iters_per_epoch, initial=start.batch, disable=not is_main_process(),
               desc=f"epoch {epoch + 1}/{opt.schedule.epochs}", leave=False)  # fmt: skip
    completed = start.batch  # batches of this epoch whose step (forward, backward, maybe optimizer) is done
    try:
        for batch_index, (batch, failure) in enumerate(bar, start=start.batch):
            iteration = epoch * iters_per_epoch + batch_index
            accumulate = opt.schedule.apply(opt.optimizer, epoch, iteration)
            with deferred_interrupts():  # Ctrl-C / SIGTERM wait for the step to finish: state stays consistent
                agree(failure, f"epoch {epoch + 1}, batch {batch_index + 1}")  # DDP: all ranks go on, or all stop
                images, targets, _ = batch
                targets = targets.to(precision.device)
                total, parts = _train_step(model, criterion, images, targets, precision)
                if not _check_finite(total, parts, epoch, batch_index, iteration, precision.fp16_fallback):
                    precision = _fall_back(opt, state, precision, f"a non-finite loss at iteration {iteration}")
                    total, parts = _train_step(model, criterion, images, targets, precision)  # the batch again
                    _check_finite(total, parts, epoch, batch_index, iteration)
                loss = total * world if sums_batch else total  # DDP averages gradients over processes
                (opt.scaler.scale(loss) if opt.scaler is not None else loss).backward()
                # An epoch ends with a step, so an epoch-boundary checkpoint holds no half-accumulated gradient.
                if iteration - state.last_step >= accumulate or batch_index == iters_per_epoch - 1:
                    _step(model, opt, f"at epoch {epoch + 1}, batch {batch_index + 1} (iteration {iteration})")
                    state.last_step = iteration
                    if precision.fp16_fallback and fp16_overflowing(opt.scaler):
                        precision = _fall_back(opt, state, precision, f"GradScaler scale below 1 at iteration "
                                               f"{iteration}")  # fmt: skip
                sums.add(parts)
                completed = batch_index + 1
            images_seen += images.shape[0]
            rate = images_seen * world / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in sums.means().items()}, "inst": int(targets.shape[0]),
                             "img_s": f"{rate:.1f}"})  # fmt: skip
    except ForcedStop:
        raise  # possibly mid-step: the state is not one to save
    except KeyboardInterrupt as stop:
        # Gradients accumulated since the last optimizer step travel in last.pt (`pending_gradients`).
        origin = stop.origin if isinstance(stop, AgreedInterrupt) else ""
        if origin:  # every rank stopped at this step: last.pt gets the sums of all of them
            sums.all_reduce()
        raise TrainingInterrupted(epoch, completed, sums.to_state(), origin) from None
    finally:
        bar.close()
    sums.all_reduce()
    result = {**sums.means(), "img_per_s": images_seen * world / max(time.perf_counter() - t0, 1e-9)}
    for k, group in enumerate(opt.optimizer.param_groups):
        result[f"lr/pg{k}"] = group["lr"]
    return result
