"""Pretrain a backbone on CUB classification: `python tools/train_cls.py [CONFIG.yaml] [key=value ...] [--debug]`.

Writes to a fresh run directory (`output_dir`, or `output_dir-2`, ...): config.yaml, results.csv, curves.png,
confusion_matrix.png, per_class_accuracy.csv, last.pt, best.pt (best top-1) and backbone.pt (the best weights'
backbone, ready for `model.backbone_weights=` of the detector). `train.resume=RUN/last.pt` continues that run in its
own directory, exactly. Ctrl-C / SIGTERM saves last.pt first. Bad input: one line on stderr, exit code 2, before any
work; a full disk or a killed loader worker: one line saying which last.pt survived, exit code 1. `--print-config`
prints the resolved config and exits. Under torchrun (`torchrun --nproc_per_node=N tools/train_cls.py ...`) the
processes train with DDP; rank 0 writes, and a fault on one rank (a bad sample, a signal, a non-finite loss, a process
that died) stops every rank at the same step with one line from rank 0 naming that rank.
"""

# ruff: noqa: E402  (the imports below come after the light --help answer)
from __future__ import annotations

import sys

USAGE = ("usage: train_cls.py [CONFIG.yaml] [key=value ...] [--print-config] [--debug]   "
         "(e.g. train.epochs=5 model.backbone=resnet18)")  # fmt: skip

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # answered from the schema alone, without torch
    from detect.config_help import tool_help
    from detect.schema import ClsConfig

    print(tool_help(__doc__, USAGE, ClsConfig))
    sys.exit(0)

import csv
import io
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones.checkpoint import atomic_save, atomic_write_bytes, load_checkpoint, save_backbone
from backbones.errors import UserError
from detect.cli import (
    ForcedStop,
    deferred_interrupts,
    interrupts_for_group,
    run_tool,
    shielded_from_signals,
    signals_received,
)
from detect.config import ClsConfig, ClsDataConfig, answer_info_flags, check_input_files, config_to_dict, load_config
from detect.eval.viz import plot_confusion_matrix, plot_curves
from detect.plugins import import_plugins
from detect.train.classify import (
    ClsEpochStart,
    ClsStepper,
    TrainingInterrupted,
    autocast_dtype,
    build_cls_datasets,
    build_cls_loaders,
    build_cls_model,
    build_lr_schedule,
    evaluate,
    make_checkpoint,
    restore_checkpoint,
    train_one_epoch,
)
from detect.train.distributed import (
    DistInfo,
    agree,
    cleanup_distributed,
    group_stop_error,
    init_distributed,
    prepare_model,
    unwrap,
)
from detect.train.optim import ModelEMA, build_optimizer, build_param_groups
from detect.train.runs import (
    ResultsCSV,
    discard_run_dir,
    ensure_synthetic_data,
    prepare_run,
    require_run_dir,
    stopped_run_error,
    survivor_note,
)
from detect.train.seeding import seed_everything

MEMORY_ADVICE = "if memory is short, fewer loader processes (train.workers) use less"
CURVE_PANELS = [("loss", ["train/loss", "val/loss"]), ("accuracy", ["train/acc", "val/top1", "val/top5"])]


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split argv into an optional config file (the one argument without '=') and key=value overrides."""
    paths = [arg for arg in argv if "=" not in arg]
    if len(paths) > 1:
        raise UserError(f"expected at most one config file, got {', '.join(paths)}; {USAGE}")
    if paths and paths[0].startswith("-"):
        raise UserError(f"unknown option {paths[0]}; {USAGE}")
    return (paths[0] if paths else None), [arg for arg in argv if "=" in arg]


def resolve_config(argv: list[str], check_files: bool = True) -> tuple[Any, dict | None]:
    """The run's config and, with train.resume, the checkpoint (its config is the base, CONFIG and argv on top); the
    config's plugin modules (`imports`, e.g. a backbone of your own) are imported. The files it names are checked
    here, before any work (not with `check_files=False`)."""
    path, overrides = parse_args(argv)
    cfg, ckpt = load_config(ClsConfig, path, overrides), None
    if check_files and cfg.train.resume:
        check_input_files(cfg, ["train.resume"])
    if cfg.train.resume:
        ckpt = load_checkpoint(cfg.train.resume)
        if not isinstance(ckpt.get("config"), dict):
            raise UserError(f"{cfg.train.resume} holds no config; is it a train_cls last.pt?")
        cfg = load_config(ClsConfig, path, overrides, base=ckpt["config"])
    import_plugins(cfg.imports)
    if check_files and ckpt is None:
        check_input_files(cfg, ["model.backbone_weights"])
    return cfg, ckpt


def record_epoch(run_dir: Path, epoch: int, stats: dict, metrics: dict, best: dict, state: dict[str, Any]) -> dict:
    """Rank 0: results.csv row, curves, best.pt / backbone.pt / confusion matrix on improvement, then last.pt."""
    ResultsCSV(run_dir / "results.csv").append(
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
    plot_curves(run_dir / "results.csv", run_dir / "curves.png", CURVE_PANELS)
    if metrics["top1"] > best["top1"]:
        best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch + 1}
        save_best(run_dir, epoch, metrics, state)
    atomic_save(make_checkpoint(**{**state, "best": best}, position=(epoch + 1, 0)), run_dir / "last.pt")
    return best


def save_best(run_dir: Path, epoch: int, metrics: dict, state: dict[str, Any]) -> None:
    """best.pt (the evaluated weights: EMA if on), backbone.pt, confusion_matrix.png, per_class_accuracy.csv."""
    evaluated = state["ema"].ema if state["ema"] is not None else unwrap(state["model"])
    names, config = state["class_names"], state["config"]
    summary = {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"], "epoch": epoch + 1}
    weights = {k: v.detach().cpu() for k, v in evaluated.state_dict().items()}
    atomic_save({"model": weights, "arch": config["model"]["backbone"], "class_names": names,
                 "metrics": {**summary, "per_class_acc": metrics["per_class_acc"]}, "config": config},
                run_dir / "best.pt")  # fmt: skip
    save_backbone(run_dir / "backbone.pt", evaluated.backbone, config["model"]["backbone"], {}, summary, config)
    plot_confusion_matrix(metrics["confusion"], names, run_dir / "confusion_matrix.png")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["label", "class", "accuracy", "support"])
    for label, (name, acc) in enumerate(zip(names, metrics["per_class_acc"], strict=True)):
        writer.writerow([label, name, f"{acc:.4f}", int(metrics["confusion"][label].sum())])
    atomic_write_bytes(buffer.getvalue().encode("utf-8"), run_dir / "per_class_accuracy.csv")


def log_epoch(epoch: int, epochs: int, stats: dict, metrics: dict, best: dict, seconds: float) -> None:
    """One summary line per epoch (the progress bar shows the steps)."""
    print(
        f"epoch {epoch + 1}/{epochs}: train loss {stats['loss']:.4f} acc {stats['acc']:.3f} | val loss "
        f"{metrics['loss']:.4f} top1 {metrics['top1']:.3f} top5 {metrics['top5']:.3f} | best {best['top1']:.3f} "
        f"(epoch {best['epoch']}) | {seconds:.1f}s",
        flush=True,
    )


def save_interrupted(
    run_dir: Path, state: dict[str, Any], position: tuple[int, int], sums: list | None, origin: str = ""
) -> None:
    """Rank 0 after Ctrl-C / SIGTERM (under DDP: `origin`, the rank that received which): last.pt at the position
    reached (written whatever further signals arrive), and how to continue."""
    with shielded_from_signals():
        atomic_save(make_checkpoint(**state, position=position, epoch_sums=sums), run_dir / "last.pt")
    where = f"after epoch {position[0]}" if position[1] == 0 else f"epoch {position[0] + 1}, batch {position[1]}"
    last, by = run_dir / "last.pt", f" by {origin}" if origin else ""
    print(f"\ninterrupted{by}: saved {last} ({where}); continue with train.resume={last}", file=sys.stderr)


def train(cfg: Any, ckpt: dict | None, info: DistInfo) -> int:
    """The run, linearly: seed, data, model, optimizer, (resume), run dir, then the epochs (`run_epochs`)."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(cfg.seed)
    ensure_synthetic_data(cfg.data.root, cfg.data.root == ClsDataConfig.root, info)
    train_set, val_set = build_cls_datasets(cfg)
    model = build_cls_model(cfg, train_set.num_classes, load_weights=ckpt is None).to(info.device)
    optimizer = build_optimizer(t.optimizer, build_param_groups(model, t.weight_decay), t.lr, t.momentum)
    ema = ModelEMA(model) if t.ema else None
    amp_dtype = autocast_dtype(cfg, info.device)
    if t.amp and info.device.type != "cuda" and info.is_main:
        print("warning: train.amp needs CUDA; training in float32 (train.bf16=true autocasts on CPU)", file=sys.stderr)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    position, best, sums = (0, 0), {"top1": -1.0, "top5": 0.0, "epoch": 0}, None
    if ckpt is not None:
        position, best, sums = restore_checkpoint(ckpt, model, optimizer, ema, scaler, t.resume)
    model = prepare_model(model, info, t.sync_bn)
    loaders = build_cls_loaders(train_set, val_set, cfg, info)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    stepper = ClsStepper(optimizer, loss_fn, build_lr_schedule(cfg), ema, scaler, amp_dtype)
    state = {"model": model, "optimizer": optimizer, "ema": ema, "scaler": scaler, "best": best,
             "config": config_to_dict(cfg), "class_names": train_set.class_names}  # fmt: skip
    run_dir = prepare_run(cfg, ckpt is not None, info)
    try:
        if info.is_main:
            ResultsCSV(run_dir / "results.csv").truncate(position[0])
            print(f"train_cls: {cfg.model.backbone}, {len(train_set)} train / {len(val_set)} val images, "
                  f"{train_set.num_classes} classes, {info.device} x{info.world_size} -> {run_dir}")  # fmt: skip
        # DDP: signals wait for all ranks to agree (steps, epochs), through run_epochs' handlers too, so that
        # torchrun's SIGTERM to the remaining ranks cannot cut them short
        with interrupts_for_group(info.distributed):
            best = run_epochs(cfg, info, run_dir, state, stepper, loaders, (position, sums, ckpt is not None))
    except BaseException:
        if info.is_main:
            discard_run_dir(run_dir)  # only a new run that never reached a last.pt
        raise
    with shielded_from_signals():  # a signal now only comes after the work: the last lines still print
        if info.is_main:
            print(f"done: best top-1 {best['top1']:.4f} at epoch {best['epoch']}; backbone: "
                  f"{run_dir / 'backbone.pt'}", flush=True)  # fmt: skip
            if signals_received():
                print("(the stop signal came after the last epoch was saved: the run is complete, nothing lost)",
                      file=sys.stderr)  # fmt: skip
    return 0


def run_epochs(cfg: Any, info: DistInfo, run_dir: Path, state: dict[str, Any], stepper: ClsStepper,
               loaders: tuple, start: tuple[tuple[int, int], list | None, bool]) -> dict:  # fmt: skip
    """The epochs from `start` (position, partial sums, resumed?): train, evaluate, record; returns the best.

    Ctrl-C / SIGTERM save last.pt at the position reached; a full disk or a dead loader worker is a `RunError`
    naming the last.pt that survived. Under DDP every rank stops at the same step, whichever rank the signal or the
    fault reached (`agree`), and a rank that is gone stops the others with one line naming it (`group_stop_error`).
    """
    t, (train_loader, train_sampler, val_loader) = cfg.train, loaders
    (position, sums, resumed), model, ema, best = start, state["model"], state["ema"], state["best"]
    iters = -(-len(train_sampler.shard(0)) // train_loader.batch_size)  # ceil: batches per full epoch
    saved = position if resumed else None
    try:
        with deferred_interrupts():  # Ctrl-C / SIGTERM act at safe points: after a step, a val batch, an epoch
            for epoch in range(position[0], t.epochs):
                begin_time = time.perf_counter()
                train_sampler.set_epoch(epoch, position[1])
                begin = ClsEpochStart(epoch, iters, position[1], sums)
                stats = train_one_epoch(model, train_loader, stepper, info.device, begin, info.is_main)
                position, sums = (epoch, iters), None
                evaluated = ema.ema if ema is not None else model
                metrics = evaluate(evaluated, val_loader, info.device, len(state["class_names"]), t.label_smoothing,
                                   stepper.amp_dtype)  # fmt: skip
                if info.is_main:
                    require_run_dir(run_dir)
                    state["best"] = best = record_epoch(run_dir, epoch, stats, metrics, best, state)
                    log_epoch(epoch, t.epochs, stats, metrics, best, time.perf_counter() - begin_time)
                    saved = (epoch + 1, 0)
                position = (epoch + 1, 0)
                agree()  # a held signal stops here (DDP: on every rank, whichever received it)
                saved = position  # rank 0 wrote it (the other ranks passed `agree` after that)
    except ForcedStop:
        if info.is_main:
            print(f"\nstopped at once by a third signal, possibly in the middle of a step: last.pt was not updated; "
                  f"{survivor_note(run_dir, saved)}", file=sys.stderr)  # fmt: skip
        raise
    except KeyboardInterrupt as stop:
        if position[0] >= t.epochs and not isinstance(stop, TrainingInterrupted):
            return best  # the signal came after the last epoch's last.pt: the run is complete
        if isinstance(stop, TrainingInterrupted):
            position, sums = (stop.epoch, stop.batch), stop.sums
        if info.is_main:
            save_interrupted(run_dir, state, position, sums, getattr(stop, "origin", ""))
        raise
    except Exception as exc:
        error = group_stop_error(exc, survivor_note(run_dir, saved), MEMORY_ADVICE) or stopped_run_error(
            exc, [train_loader, val_loader], run_dir, saved, MEMORY_ADVICE
        )
        if error is None:
            raise
        raise error from exc
    return best


def main(argv: list[str] | None = None) -> int:
    """`tools/train_cls.py [CONFIG] [key=value ...]`; returns the exit code (errors are raised for `run_tool`)."""
    argv = sys.argv[1:] if argv is None else argv
    if answer_info_flags(argv, __doc__, USAGE, ClsConfig, lambda rest: resolve_config(rest, check_files=False)[0]):
        return 0
    cfg, ckpt = resolve_config(argv)
    info = init_distributed(cfg.train.device)
    try:
        code = train(cfg, ckpt, info)
    except BaseException as stop:
        cleanup_distributed(stop)  # after a DDP stop, rank 0 ends first
        raise
    cleanup_distributed()
    return code


if __name__ == "__main__":
    sys.exit(run_tool(main))
