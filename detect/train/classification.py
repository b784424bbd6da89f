"""A backbone pretraining run on CUB classification: config -> checked input -> built run -> epochs -> files.

`pretrain_backbone(config, overrides)` is what `tools/train_cls.py CONFIG key=value...` and `detect.api.pretrain` run.
It writes to a fresh run directory (`output_dir`, or `output_dir-2`, ...): config.yaml, results.csv, curves.png,
confusion_matrix.png, per_class_accuracy.csv, last.pt, best.pt (best top-1) and backbone.pt (the best weights'
backbone, ready for `model.backbone_weights=` of the detector). The epochs, interrupts and failures are
`detect.train.lifecycle`'s, as for detection; the step, loops and builders are `detect.train.classify`'s.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.checkpoint import atomic_save, atomic_write_bytes, load_checkpoint, save_backbone
from backbones.errors import UserError
from detect.checkpoints import consent_to_plugins
from detect.config import ClsConfig, ClsDataConfig, check_input_files, config_to_dict, load_config
from detect.eval.viz import plot_confusion_matrix, plot_curves
from detect.plugins import import_plugins
from detect.precision import may_fall_back
from detect.rundirs import discard_run_dir, require_run_dir
from detect.train.classify import (
    ClsEpochStart,
    ClsStepper,
    autocast_dtype,
    build_cls_datasets,
    build_cls_loaders,
    build_cls_model,
    build_lr_schedule,
    evaluate,
    train_one_epoch,
)
from detect.train.distributed import DistInfo, prepare_model, unwrap
from detect.train.failures import memory_advice
from detect.train.group_faults import setup_step
from detect.train.lifecycle import execute, start
from detect.train.optim import ModelEMA, build_optimizer, build_param_groups
from detect.train.runs import ResultsCSV, ensure_synthetic_data, prepare_run
from detect.train.state import ResumeState

CURVE_PANELS = [("loss", ["train/loss", "val/loss"]), ("accuracy", ["train/acc", "val/top1", "val/top5"])]


def resolve_cls_config(
    path: str | None, overrides: Sequence[str], check_files: bool = True
) -> tuple[Any, dict[str, Any] | None]:
    """The run's config and, with train.resume, the checkpoint (its config is the base, CONFIG and overrides on
    top); the config's plugin modules (`imports`, e.g. a backbone of your own) are imported, a resumed run's only
    as the user names them again (a checkpoint is data). The files it names are checked here, before any work."""
    cfg, ckpt = load_config(ClsConfig, path, list(overrides)), None
    if check_files and cfg.train.resume:
        check_input_files(cfg, ["train.resume"])
    named = list(cfg.imports)  # the user's own (CONFIG, overrides), not the checkpoint's
    if cfg.train.resume:
        ckpt = load_checkpoint(cfg.train.resume)
        if not isinstance(ckpt.get("config"), dict):
            raise UserError(f"{cfg.train.resume} holds no config; is it a train_cls last.pt?")
        cfg = load_config(ClsConfig, path, list(overrides), base=ckpt["config"])
        consent_to_plugins(ckpt, named, cfg.train.resume, "imports=[MODULE]")  # imports `named`
    else:
        import_plugins(named)
    if check_files and ckpt is None:
        check_input_files(cfg, ["model.backbone_weights"])
    return cfg, ckpt


@dataclass
class ClsRun:
    """Everything one pretraining run holds between epochs (built by `build_cls_run`, run by `lifecycle.execute`)."""

    cfg: Any
    info: DistInfo
    stepper: ClsStepper
    loaders: tuple[Any, Any, Any]  # train loader, train sampler, val loader
    class_names: list[str]
    run_dir: Path
    state: ResumeState
    saved: tuple[int, int] | None = None
    memory_advice: str = memory_advice()

    @property
    def epochs(self) -> int:
        return int(self.cfg.train.epochs)

    @property
    def evaluated(self) -> nn.Module:
        """The weights evaluated and saved: the EMA when on, else the model, never the DDP wrapper."""
        return self.state.ema.ema if self.state.ema is not None else unwrap(self.state.model)

    def last_checkpoint(self, at_boundary: bool) -> dict[str, Any]:
        config = config_to_dict(self.cfg)
        return {**self.state.to_dict(), "config": config, "arch": config["model"]["backbone"],
                "class_names": list(self.class_names)}  # fmt: skip

    def train_epoch(self, epoch: int) -> dict[str, float]:
        train_loader, sampler, _ = self.loaders
        iters = -(-len(sampler.shard(0)) // train_loader.batch_size)  # ceil: batches per full epoch
        sampler.set_epoch(epoch, self.state.position[1])
        begin = ClsEpochStart(epoch, iters, self.state.position[1], self.state.sums)
        try:
            stats = train_one_epoch(self.state.model, train_loader, self.stepper, self.info.device, begin,
                                    self.info.is_main)  # fmt: skip
        finally:  # an interrupted epoch's last.pt, too, says what it ran in
            self.keep_bf16_fallback()
        self.state.position, self.state.sums = (epoch, iters), None  # trained, not evaluated yet
        return stats

    def keep_bf16_fallback(self) -> None:
        """After an epoch in which fp16 overflowed and the step switched to bf16 (`ClsStepper.fall_back`, which
        also evaluates in bf16 from then on): the config its checkpoints carry says `train.precision=bf16`, and
        there is no scaler state to save, so a resume runs what it trained in."""
        if self.stepper.fell_back_to_bf16:
            self.cfg.train.precision, self.state.scaler = "bf16", None

    def end_epoch(self, epoch: int, stats: dict[str, float], start: float) -> None:
        """Evaluate (Ctrl-C acts between val batches), then rank 0 records the epoch."""
        t = self.cfg.train
        metrics = evaluate(self.evaluated, self.loaders[2], self.info.device, len(self.class_names),
                           t.label_smoothing, self.stepper.amp_dtype)  # fmt: skip
        self.state.position = (epoch + 1, 0)
        if self.info.is_main:
            require_run_dir(self.run_dir)
            record_epoch(self, epoch, stats, metrics)
            best = self.state.best
            print(f"epoch {epoch + 1}/{t.epochs}: train loss {stats['loss']:.4f} acc {stats['acc']:.3f} | val loss "
                  f"{metrics['loss']:.4f} top1 {metrics['top1']:.3f} top5 {metrics['top5']:.3f} | best "
                  f"{best['top1']:.3f} (epoch {best['epoch']}) | {time.perf_counter() - start:.1f}s",
                  flush=True)  # fmt: skip

    def watched_loaders(self) -> list[Any]:
        return [self.loaders[0], self.loaders[2]]

    def done_line(self) -> str:
        best = self.state.best
        return f"done: best top-1 {best['top1']:.4f} at epoch {best['epoch']}; backbone: {self.run_dir / 'backbone.pt'}"

    def close(self) -> None:
        pass


def record_epoch(run: ClsRun, epoch: int, stats: dict, metrics: dict) -> None:
    """Rank 0: results.csv row, curves, best.pt / backbone.pt / confusion matrix on improvement, then last.pt."""
    ResultsCSV(run.run_dir / "results.csv").append(
        {
            "epoch": epoch + 1,
            "lr": stats["lr"],
            "train/loss": stats["loss"],
            "train/acc": stats["acc"],
            "val/loss": metrics["loss"],
            "val/top1": metrics["top1"],
            "val/top5": metrics["top5"],
            "val/mean_class_acc": float(torch.tensor(metrics["per_class_acc"]).nanmean()),
            "img_s": stats["img_s"],
        }
    )
    plot_curves(run.run_dir / "results.csv", run.run_dir / "curves.png", CURVE_PANELS)
    if metrics["top1"] > run.state.best["top1"]:
        run.state.best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch + 1}
        save_best(run, epoch, metrics)
    atomic_save(run.last_checkpoint(True), run.run_dir / "last.pt")
    run.saved = run.state.position


def save_best(run: ClsRun, epoch: int, metrics: dict) -> None:
    """best.pt (the evaluated weights: EMA if on), backbone.pt, confusion_matrix.png, per_class_accuracy.csv."""
    evaluated, names, config = run.evaluated, run.class_names, config_to_dict(run.cfg)
    summary = {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"], "epoch": epoch + 1}
    weights = {k: v.detach().cpu() for k, v in evaluated.state_dict().items()}
    atomic_save({"model": weights, "arch": config["model"]["backbone"], "class_names": names,
                 "metrics": {**summary, "per_class_acc": metrics["per_class_acc"]}, "config": config},
                run.run_dir / "best.pt")  # fmt: skip
    save_backbone(run.run_dir / "backbone.pt", evaluated.backbone, config["model"]["backbone"], {}, summary, config)
    plot_confusion_matrix(metrics["confusion"], names, run.run_dir / "confusion_matrix.png")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["label", "class", "accuracy", "support"])
    for label, (name, acc) in enumerate(zip(names, metrics["per_class_acc"], strict=True)):
        writer.writerow([label, name, f"{acc:.4f}", int(metrics["confusion"][label].sum())])
    atomic_write_bytes(buffer.getvalue().encode("utf-8"), run.run_dir / "per_class_accuracy.csv")


def build_cls_run(cfg: Any, ckpt: dict | None, info: DistInfo) -> ClsRun:
    """Data, model, optimizer, (resume), then the run directory: bad input is found before it exists. Under DDP each
    step is a `setup_step`: a fault on any rank stops every rank with one line from rank 0 naming the rank."""
    t = cfg.train
    ensure_synthetic_data(cfg.data.root, cfg.data.root == ClsDataConfig.root, info)
    with setup_step("building the datasets"):
        train_set, val_set = build_cls_datasets(cfg)
    with setup_step("building the model"):
        model = build_cls_model(cfg, train_set.num_classes, load_weights=ckpt is None).to(info.device)
        optimizer = build_optimizer(t.optimizer, build_param_groups(model, t.weight_decay), t.lr, t.momentum)
        ema = ModelEMA(model) if t.ema else None
        amp_dtype, precision_note = autocast_dtype(cfg, info.device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        state = ResumeState(model=model, optimizer=optimizer, ema=ema, scaler=scaler,
                            best={"top1": -1.0, "top5": 0.0, "epoch": 0})  # fmt: skip
        if ckpt is not None:
            state.restore(ckpt, t.resume)
    with setup_step("building the loaders"):
        loaders = build_cls_loaders(train_set, val_set, cfg, info)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        fallback = may_fall_back(t.precision, "fp16" if amp_dtype == torch.float16 else "", info.device)
        stepper = ClsStepper(optimizer, loss_fn, build_lr_schedule(cfg), ema, scaler, amp_dtype, fallback)
    with setup_step("wrapping the model in DistributedDataParallel"):
        state.model = prepare_model(model, info, t.sync_bn)
    run_dir = prepare_run(cfg, ckpt is not None, info)
    try:
        if info.is_main:
            ResultsCSV(run_dir / "results.csv").truncate(state.position[0])
            print(f"train_cls: {cfg.model.backbone}, {len(train_set)} train / {len(val_set)} val images, "
                  f"{train_set.num_classes} classes, {info.device} x{info.world_size} -> {run_dir}")  # fmt: skip
            print(precision_note, flush=True)
    except BaseException:
        if info.is_main:
            discard_run_dir(run_dir)
        raise
    return ClsRun(cfg, info, stepper, loaders, list(train_set.class_names), run_dir, state,
                  saved=state.position if ckpt is not None else None)  # fmt: skip


def pretrain_backbone(config: str | None = None, overrides: Sequence[str] = ()) -> ClsRun:
    """Resolve the config, build the run and train it to its end (`lifecycle.execute`); returns the finished run.

    Args:
        config: a YAML file (None: the schema's defaults, the synthetic mini-CUB; or the resumed run's config).
        overrides: `key=value` strings, as on the tool's command line.
    """
    cfg, ckpt = resolve_cls_config(config, overrides)
    run = start(cfg, ckpt, build_cls_run)
    execute(run)
    return run
