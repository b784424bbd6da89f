"""Backbone pretraining on CUB classification: builders, the step, `train_one_epoch` and `evaluate`.

Plain functions under the linear run of `detect.train.classification` (STYLE 8). Only the `build_*` functions read
the config; the loops take plain arguments.

A run is repeatable and resumable to the bit on CPU: the sample order is a function of (seed, epoch) (`EpochSampler`),
each image's augmentation of (seed, epoch, index) (`SeededSamples`), and every training step runs with Ctrl-C / SIGTERM
held back (`deferred_interrupts`), so an interrupt leaves model, optimizer, EMA and RNG in a consistent state that
`detect.train.state.ResumeState` captures together with the position (epoch, batches done).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from backbones import build_backbone
from backbones.classifier import Classifier
from backbones.errors import UserError
from backbones.freeze import freeze_stages, keep_frozen_bn_eval
from detect.data.cls_transforms import build_cls_transforms, seed_transform
from detect.data.cub import CubClassification
from detect.precision import choose_precision, fp16_overflowing, leave_fp16
from detect.train.distributed import DistInfo, all_reduce_sum, fetch, get_rank, get_world_size, is_main_process
from detect.train.group_faults import agree
from detect.train.optim import ModelEMA, lr_at
from detect.train.seeding import DistributedEpochSampler
from detect.train.signals import AgreedInterrupt, ForcedStop, TrainingInterrupted, check_interrupt, deferred_interrupts


class SeededSamples(Dataset):
    """A dataset indexed by `(index, epoch)` whose transform is reseeded from (seed, epoch, index) for every sample.

    Args:
        dataset: a dataset with an albumentations `transform` attribute (e.g. `CubClassification`).
        seed: the run's seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed % 2**32

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int] | int) -> Any:
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            seed_transform(transform, (self.seed, epoch, index))
        try:
            return self.dataset[index]
        except UserError:
            raise
        except Exception as exc:  # a loader worker's re-raised error keeps the note (`failures.loader_failure`)
            exc.add_note(f"(sample index {index})")
            raise


# ----------------------------------------------------------------------------------------------------------------------
# Builders (read the config)
# ----------------------------------------------------------------------------------------------------------------------
def build_cls_datasets(cfg: DictConfig) -> tuple[CubClassification, CubClassification]:
    """CUB train and test splits with the training and validation transforms of `cfg.data`."""
    data = cfg.data
    train_tf = build_cls_transforms(True, data.img_size, data.resize_size, data.random_resized_crop)
    val_tf = build_cls_transforms(False, data.img_size, data.resize_size)
    train_set = CubClassification(data.root, "train", train_tf)
    val_set = CubClassification(data.root, "test", val_tf)
    return train_set, val_set


def build_cls_loaders(
    train_set: Dataset, val_set: Dataset, cfg: DictConfig, info: DistInfo
) -> tuple[DataLoader, DistributedEpochSampler, DataLoader]:
    """Loaders over this process's shards: train (shuffled per epoch, `(index, epoch)` samples) and val (in order).

    `cfg.train.batch_size` is the total batch over all processes and must divide by the world size.
    """
    total, world = cfg.train.batch_size, info.world_size
    if total % world:
        raise UserError(f"train.batch_size={total} must be a multiple of the number of processes ({world})")
    batch = total // world
    train_sampler = DistributedEpochSampler(len(train_set), world, info.rank, cfg.seed, True, batch, True)
    val_sampler = DistributedEpochSampler(len(val_set), world, info.rank, cfg.seed, False, batch, False)
    workers = cfg.train.workers
    common = {
        "batch_size": batch,
        "num_workers": workers,
        "pin_memory": info.device.type == "cuda",
        "persistent_workers": workers > 0,
        "generator": torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched by the loaders
    }
    train_loader = DataLoader(SeededSamples(train_set, cfg.seed), sampler=train_sampler, **common)
    val_loader = DataLoader(SeededSamples(val_set, cfg.seed), sampler=val_sampler, **common)
    return train_loader, train_sampler, val_loader


def build_cls_model(cfg: DictConfig, num_classes: int, load_weights: bool = True) -> Classifier:
    """`Classifier(build_backbone(...))` with optional backbone weights and the finetune mode of `cfg.train`.

    finetune: "all" trains everything; "freeze" freezes the first `train.freeze_stages` stages (-1 = the whole
    backbone; frozen BatchNorm stays in eval mode); "classifier" trains only the linear head. `load_weights=False`
    skips `model.backbone_weights` (a resume overwrites every weight anyway).
    """
    weights = cfg.model.backbone_weights if load_weights else None
    kwargs = {"weights": weights} if weights else {}
    backbone = build_backbone(cfg.model.backbone, **kwargs)
    model = Classifier(backbone, num_classes, dropout=cfg.model.dropout)
    mode, stages = cfg.train.finetune, cfg.train.freeze_stages
    if mode == "freeze":
        if stages == 0:
            raise UserError("train.finetune=freeze needs train.freeze_stages=K (K >= 1, or -1 for the whole backbone)")
        freeze_stages(model.backbone, stages)
    elif mode == "classifier":
        freeze_stages(model.backbone, -1)
    elif stages != 0:
        raise UserError(f"train.freeze_stages={stages} only applies with train.finetune=freeze (got {mode})")
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_lr_schedule(cfg: DictConfig) -> Callable[[float], float]:
    """Learning rate as a function of the fractional epoch, from `cfg.train` (see `detect.train.optim.lr_at`)."""
    t = cfg.train
    return functools.partial(
        lr_at,
        base_lr=t.lr,
        schedule=t.scheduler,
        epochs=t.epochs,
        warmup_epochs=t.warmup_epochs,
        warmup_start=t.warmup_start,
        lrf=t.lrf,
        milestones=tuple(t.milestones),
        step_size=t.step_size,
        gamma=t.gamma,
    )


def autocast_dtype(cfg: DictConfig, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype `train.precision` chooses here (`detect.precision.choose_precision`; None: fp32) and the
    log line saying what and why."""
    name, why = choose_precision(cfg.train.precision, device, pretraining=True)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name), f"precision: {name} ({why})"


def finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (one tiny all-reduce under DDP), so that all ranks decide alike."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0], dtype=torch.float64)
    if get_world_size() > 1:
        all_reduce_sum(bad)
    return float(bad) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Loops (plain arguments)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ClsStepper:
    """What one classification step needs besides the batch: the optimizer and criterion, the lr at a fractional
    epoch, the EMA, the fp16 scaler and the autocast dtype (None: fp32). `fp16_fallback`: `auto` chose fp16 on a GPU
    with bf16, so an overflowing fp16 is left for bf16 (`detect.precision.leave_fp16`; `fell_back_to_bf16` then says
    so to the run)."""

    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    lr_fn: Callable[[float], float]
    ema: ModelEMA | None = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    fp16_fallback: bool = False
    fell_back_to_bf16: bool = False

    def forward(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(loss in fp32, logits [B, C]) under the autocast dtype."""
        with torch.autocast(images.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = model(images)  # [B, C]
            return self.loss_fn(logits.float(), labels), logits

    def step(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, where: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward, optimizer step, EMA update; returns (loss, logits [B, C]) detached. A non-finite loss
        is a UserError raised before it touches the weights (`where` names the position); under a fp16 that may
        fall back, it leaves fp16 for bf16 and runs the batch again (every DDP rank alike: the flag is all-reduced)."""
        loss, logits = self.forward(model, images, labels)
        if self.fp16_fallback and not finite_on_every_rank(loss):
            self.fall_back(f"a non-finite loss {where}")
            loss, logits = self.forward(model, images, labels)
        if not torch.isfinite(loss):
            raise UserError(f"non-finite training loss ({loss.item()}) {where}: lower train.lr or set "
                            "train.precision=fp32; last.pt keeps the last good state")  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(model)
        if self.fp16_fallback and fp16_overflowing(self.scaler):
            self.fall_back(f"GradScaler scale below 1 {where}")
        return loss.detach(), logits.detach()

    def fall_back(self, why: str) -> None:
        """bf16 and no scaler from the next forward on (`detect.precision.leave_fp16`)."""
        line = leave_fp16(self.scaler, self.optimizer, why)
        if is_main_process():
            tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it
        self.scaler, self.amp_dtype, self.fp16_fallback, self.fell_back_to_bf16 = None, torch.bfloat16, False, True

    def set_lr(self, fractional_epoch: float) -> float:
        lr = self.lr_fn(fractional_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


@dataclass(frozen=True)
class ClsEpochStart:
    """Where a classification epoch starts: 0-based `epoch` of `iters_per_epoch` batches, `batch` of them done
    (resume) and `sums` [loss * n, correct, n] of those (from `TrainingInterrupted.sums`)."""

    epoch: int
    iters_per_epoch: int
    batch: int = 0
    sums: list[float] | None = None


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    stepper: ClsStepper,
    device: torch.device,
    start: ClsEpochStart,
    show_progress: bool = True,
) -> dict[str, float]:
    """One epoch of supervised training, from batch `start.batch` (the loader must already skip the earlier ones).

    Args:
        model: the classifier (or its DDP wrapper); frozen BatchNorm is kept in eval mode.
        loader: yields `(images [B, 3, S, S] float, labels [B] int64)`.
        stepper: the step (optimizer, criterion, lr per fractional epoch, EMA, scaler, autocast).
        device: where the model lives.
        start: the epoch and the resume position inside it.
        show_progress: tqdm bar (loss, accuracy, img/s, ETA).

    Returns:
        {"loss", "acc", "lr" (of the last step)} over the epoch's batches of all processes, and "img_s" (this call).

    Raises:
        TrainingInterrupted: Ctrl-C / SIGTERM, after the step in progress, with the position reached (under DDP every
            rank stops at the same step, whichever received it, and the sums are all ranks').
        UserError: a non-finite loss (names epoch and step); the weights are left as they were before that step.
            Under DDP also a batch that failed to load on any rank, raised on every rank (`group_faults.agree`).
    """
    model.train()
    keep_frozen_bn_eval(model)
    epoch, iters = start.epoch, start.iters_per_epoch
    # resumed sums are all ranks': rank 0 alone carries them on, or the reduction counts them once per rank
    resumed = start.sums if start.sums and get_rank() == 0 else [0.0, 0.0, 0.0]
    sums = torch.tensor(resumed, dtype=torch.float64)  # loss * n, correct, n
    done, seen, t0 = start.batch, 0, time.perf_counter()
    lr = stepper.lr_fn(epoch + max(start.batch - 1, 0) / iters)
    bar = tqdm(total=iters, initial=start.batch, desc=f"epoch {epoch + 1}", disable=not show_progress)
    try:
        for batch_index, (batch, failure) in enumerate(fetch(loader), start=start.batch):
            # a signal held back while the batch loaded stops before the step; under DDP every rank goes on or stops
            agree(failure, f"epoch {epoch + 1}, batch {batch_index + 1}")
            images, labels = batch
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            lr = stepper.set_lr(epoch + batch_index / iters)
            with deferred_interrupts():
                loss, logits = stepper.step(model, images, labels, f"at epoch {epoch + 1}, step {batch_index + 1}")
                n, correct = labels.numel(), (logits.argmax(1) == labels).sum().item()
                sums += torch.tensor([loss.item() * n, correct, n], dtype=torch.float64)
                done, seen = batch_index + 1, seen + n
            img_s = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{sums[1] / sums[2]:.3f}", img_s=f"{img_s:.1f}")
            bar.update(1)
    except (TrainingInterrupted, ForcedStop):
        raise  # ForcedStop: possibly mid-step, the state is not one to save
    except KeyboardInterrupt as stop:
        origin = stop.origin if isinstance(stop, AgreedInterrupt) else ""
        if origin:  # every rank stopped at this step: last.pt gets the sums of all of them
            all_reduce_sum(sums)
        raise TrainingInterrupted(epoch, done, sums.tolist(), origin) from None
    finally:
        bar.close()
    img_s = seen / max(time.perf_counter() - t0, 1e-9)
    all_reduce_sum(sums)
    n = max(sums[2].item(), 1.0)
    return {"loss": sums[0].item() / n, "acc": sums[1].item() / n, "img_s": img_s, "lr": lr}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    label_smoothing: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Classification metrics over the loader (summed over processes under DDP).

    Args:
        model: classifier returning logits [B, C].
        loader: `(images [B, 3, S, S], labels [B])`; under DDP each process holds a disjoint shard.
        device: where the model lives.
        num_classes: C.
        label_smoothing: of the reported cross-entropy (as in training).
        amp_dtype: autocast dtype or None.
        show_progress: tqdm bar.

    Returns:
        {"top1", "top5" (top-min(5, C)), "loss", "per_class_acc" (list of C floats, nan for a class without
        samples), "confusion" (int64 numpy [C, C], rows = true class, columns = prediction), "num_samples"}.
    """
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-k correct, n
    k = min(5, num_classes)
    for images, labels in tqdm(loader, desc="val", leave=False, disable=not show_progress):
        check_interrupt()
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()  # [B, C]
        loss = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)
        topk = logits.topk(k, dim=1).indices  # [B, k]
        correct = (topk == labels[:, None]).any(1).sum()
        sums += torch.tensor([loss.item(), correct.item(), labels.numel()], dtype=torch.float64, device=device)
        confusion += torch.bincount(labels * num_classes + topk[:, 0], minlength=num_classes * num_classes)
    all_reduce_sum(confusion)
    all_reduce_sum(sums)
    matrix = confusion.view(num_classes, num_classes).cpu().numpy()  # [C, C]
    n = max(sums[2].item(), 1.0)
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(matrix) / np.maximum(support, 1), math.nan)
    return {
        "top1": float(np.trace(matrix)) / n,
        "top5": sums[1].item() / n,
        "loss": sums[0].item() / n,
        "per_class_acc": [float(v) for v in per_class],
        "confusion": matrix,
        "num_samples": int(sums[2].item()),
    }
