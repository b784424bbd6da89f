"""Train a YOLOv8-style detector: `python tools/train_det.py [CONFIG.yaml] [key=value ...] [--debug]`.

With no CONFIG: `configs/det/default.yaml`, the synthetic mini-CUB (bird labels, 256 px, scale n) from the backbone
that `tools/train_cls.py` pretrained (runs/cls/default/backbone.pt; `model.backbone_weights=null` for none).
Writes to a fresh run directory (`output_dir`, or `output_dir-2`, ...): config.yaml, val_gt.json (COCO ground truth),
results.csv, curves.png, last.pt, best.pt (best COCO AP), val_predictions.jpg, pr_curve.png, and TensorBoard events
when tensorboard is installed. `train.resume=RUN/last.pt` continues that run exactly. Ctrl-C / SIGTERM saves last.pt.
Under `torchrun --nproc_per_node=N` the processes train with DDP (train.batch_size is the global batch); rank 0
evaluates and writes. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from backbones.checkpoint import atomic_save
from backbones.errors import UserError
from detect.classify import TrainingInterrupted
from detect.cli import deferred_interrupts, run_tool
from detect.config import DetConfig, DetDataConfig, config_to_dict, load_config
from detect.data.coco import write_coco_json
from detect.distributed import (
    cleanup_distributed,
    init_distributed,
    prepare_model,
    unwrap,
)
from detect.engine import StepState, evaluate, nan_to_zero, train_one_epoch
from detect.optim import ModelEMA
from detect.runs import ResultsCSV, ensure_synthetic_data, prepare_run
from detect.seeding import seed_everything
from detect.training import (
    build_det_criterion,
    build_det_datasets,
    build_det_loaders,
    build_det_model,
    build_det_optimizer,
    build_schedule,
    detector_arch,
    restore_training_state,
    training_state,
)
from detect.viz import plot_curves, plot_pr_curve, save_gt_vs_pred_grid
from detect.weights import detector_checkpoint, read_detector_checkpoint

USAGE = "usage: train_det.py [CONFIG.yaml] [key=value ...] [--debug]   (e.g. train.epochs=5 model.backbone=resnet50)"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "det" / "default.yaml"
CURVE_PANELS = [("loss", ["train/box", "train/cls", "train/dfl"]), ("lr", ["lr/pg0", "lr/pg2"]),
                ("COCO AP", ["val/AP", "val/AP50"])]  # fmt: skip


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """An optional config file (the one argument without '=') and key=value overrides."""
    paths = [arg for arg in argv if "=" not in arg]
    if len(paths) > 1 or (paths and paths[0].startswith("-")):
        raise UserError(f"unexpected arguments {' '.join(paths)}; {USAGE}")
    return (paths[0] if paths else None), [arg for arg in argv if "=" in arg]


def resolve_config(argv: list[str]) -> tuple[Any, dict | None]:
    """The config (CONFIG, default configs/det/default.yaml) and, with train.resume, the last.pt whose config is
    the base (CONFIG and overrides on top)."""
    path, overrides = parse_args(argv)
    resuming = any(arg.startswith("train.resume=") and arg != "train.resume=null" for arg in overrides)
    if path is None and not resuming and DEFAULT_CONFIG.is_file():
        path = str(DEFAULT_CONFIG)
    cfg = load_config(DetConfig, path, overrides)
    if not cfg.train.resume:
        return cfg, None
    ckpt = read_detector_checkpoint(cfg.train.resume)
    if "train_state" not in ckpt:
        raise UserError(f"{cfg.train.resume} holds no training state (best.pt?): resume from the run's last.pt")
    return load_config(DetConfig, path, overrides, base=ckpt["config"]), ckpt


def open_tensorboard(run_dir: Path) -> Any:
    """A SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir))


def save_pictures(run_dir: Path, val_set: Any, kept: list, metrics: dict, class_names: list[str]) -> None:
    """val_predictions.jpg (ground truth beside prediction) and pr_curve.png of an evaluation."""
    if kept:
        source = val_set.source
        images = [source.load_image(index) for index, _ in kept]
        gts = [source.annotations(index) for index, _ in kept]
        save_gt_vs_pred_grid(images, gts, [det for _, det in kept], class_names, run_dir / "val_predictions.jpg")
    plot_pr_curve(metrics["precision"], class_names, run_dir / "pr_curve.png")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip().splitlines()[0] + "\n" + USAGE)
        return 0
    cfg, ckpt = resolve_config(argv)
    info = init_distributed(cfg.train.device)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_everything(cfg.seed)
    ensure_synthetic_data(cfg.data.root, cfg.data.format == "cub" and cfg.data.root == DetDataConfig.root, info)
    # Everything the user gave is checked (data, model, weights) before the run directory exists (DESIGN §8).
    train_set, val_set = build_det_datasets(cfg)
    source = train_set.source
    num_classes = cfg.model.num_classes or len(source.class_names)
    if num_classes != len(source.class_names):
        raise UserError(f"model.num_classes={num_classes} but the data has {len(source.class_names)} classes")
    model = build_det_model(cfg, num_classes, load_backbone=ckpt is None).to(info.device)
    criterion = build_det_criterion(cfg, model)
    optimizer = build_det_optimizer(cfg, model)
    ema = ModelEMA(model) if t.ema else None
    scaler = torch.amp.GradScaler("cuda") if info.device.type == "cuda" and t.amp and not t.bf16 else None
    position, step, best, partial_sums = (0, 0), StepState(), {"AP": -1.0, "epoch": 0}, None
    if ckpt is not None:
        position, step.last_step, best, partial_sums = restore_training_state(
            ckpt["train_state"], model, optimizer, ema, scaler, cfg.train.resume
        )
    run_dir = prepare_run(cfg, ckpt is not None, info)
    gt_path = run_dir / "val_gt.json"
    if info.is_main:
        ResultsCSV(run_dir / "results.csv").truncate(position[0])
        if not gt_path.exists():
            write_coco_json(val_set.source, gt_path)
    model = prepare_model(model, info, t.sync_bn)
    train_loader, sampler, val_loader = build_det_loaders(train_set, val_set, cfg, info)
    iters = -(-len(sampler.shard(0)) // train_loader.batch_size)  # batches in a full epoch
    schedule = build_schedule(cfg, iters)
    arch, config = detector_arch(cfg, num_classes), config_to_dict(cfg)
    names, cat_ids = list(source.class_names), list(source.category_ids)
    tb = open_tensorboard(run_dir) if info.is_main else None

    def checkpoint(metrics: dict, epoch: int, with_state: bool) -> dict:
        evaluated = ema.ema if ema is not None else unwrap(model)  # never the DDP wrapper
        state = training_state(model, optimizer, ema, scaler, position, step.last_step, best, partial_sums)
        state = state if with_state else None
        return detector_checkpoint(evaluated, arch, names, cat_ids, config, metrics, epoch, state)

    if info.is_main:
        print(f"train_det: scale {cfg.model.scale}, backbone {cfg.model.backbone or 'cspdarknet_' + cfg.model.scale}, "
              f"{num_classes} classes, {len(train_set)} train / {len(val_set)} val images at {cfg.data.img_size} px, "
              f"{t.epochs} epochs on {info.device} x{info.world_size} -> {run_dir}", flush=True)  # fmt: skip
    summary: dict[str, Any] = {}  # COCO numbers of the last evaluation, stored with the checkpoint
    try:
        for epoch in range(position[0], t.epochs):
            start = time.perf_counter()
            if epoch >= t.epochs - t.close_mosaic:
                train_set.close_mosaic()  # explicit: YOLOv8's last epochs see plain images
            sampler.set_epoch(epoch, position[1])
            stats = train_one_epoch(model, criterion, train_loader, optimizer, ema, schedule, step, epoch, info.device,
                                    position[1], t.amp, t.bf16, t.channels_last, scaler, t.grad_clip,
                                    partial_sums)  # fmt: skip
            # Evaluation, results.csv and checkpoints of this epoch finish together: a Ctrl-C / SIGTERM
            # waits for last.pt (a second one stops at once), so a resume never misses an epoch's row.
            with deferred_interrupts():
                position, partial_sums = (epoch + 1, 0), None
                last = epoch + 1 == t.epochs
                metrics: dict[str, Any] = {}
                if info.is_main and ((epoch + 1) % cfg.eval.interval == 0 or last):
                    evaluated = ema.ema if ema is not None else unwrap(model)  # never the DDP wrapper
                    metrics, _, kept = evaluate(evaluated, val_loader, gt_path, cat_ids, info.device, cfg.eval.conf,
                                                cfg.eval.iou, cfg.eval.max_det, cfg.eval.backend, t.bf16,
                                                t.channels_last, keep_images=8,
                                                coco_max_dets=cfg.eval.coco_max_dets)  # fmt: skip
                if info.is_main:
                    ap = nan_to_zero(metrics.get("AP", -1.0))
                    ap50 = nan_to_zero(metrics.get("AP50")) if metrics else ""
                    row = {"epoch": epoch + 1, **{f"train/{k}": stats[k] for k in ("box", "cls", "dfl")},
                           "val/AP": ap if metrics else "", "val/AP50": ap50, "img_per_s": stats["img_per_s"],
                           **{k: v for k, v in stats.items() if k.startswith("lr/")},
                           "time_s": time.perf_counter() - start}  # fmt: skip
                    ResultsCSV(run_dir / "results.csv").append(row)
                    plot_curves(run_dir / "results.csv", run_dir / "curves.png", CURVE_PANELS)
                    if tb is not None:
                        for key, value in row.items():
                            if key != "epoch" and value != "":
                                tb.add_scalar(key, value, epoch + 1)
                    summary = {k: metrics[k] for k in ("AP", "AP50", "coco_stats", "per_class_AP") if k in metrics}
                    if metrics and ap > best["AP"]:
                        best = {"AP": ap, "AP50": nan_to_zero(metrics["AP50"]), "epoch": epoch + 1}
                        atomic_save(checkpoint(summary, epoch + 1, False), run_dir / "best.pt")
                        save_pictures(run_dir, val_set, kept, metrics, names)
                    atomic_save(checkpoint(summary, epoch + 1, True), run_dir / "last.pt")
                    print(f"epoch {epoch + 1}/{t.epochs}: box {stats['box']:.3f} cls {stats['cls']:.3f} dfl "
                          f"{stats['dfl']:.3f} | {stats['img_per_s']:.1f} img/s"
                          + (f" | AP {ap:.4f} AP50 {nan_to_zero(metrics['AP50']):.4f}" if metrics else "")
                          + f" | best AP {best['AP']:.4f} (epoch {best['epoch']}) | {time.perf_counter() - start:.1f}s",
                          flush=True)  # fmt: skip
    except KeyboardInterrupt as stop:
        if isinstance(stop, TrainingInterrupted):
            position, partial_sums = (stop.epoch, stop.batch), stop.sums
        if info.is_main:
            at_boundary = not isinstance(stop, TrainingInterrupted)
            atomic_save(checkpoint(summary if at_boundary else {}, position[0], True), run_dir / "last.pt")
            print(f"\ninterrupted: saved {run_dir / 'last.pt'} (epoch {position[0] + 1}, batch {position[1]}); "
                  f"continue with train.resume={run_dir / 'last.pt'}", file=sys.stderr)  # fmt: skip
        raise
    finally:
        if tb is not None:
            tb.close()
        cleanup_distributed()
    if info.is_main:
        print(f"done: best AP {best['AP']:.4f} AP50 {best.get('AP50', 0.0):.4f} at epoch {best['epoch']}; "
              f"weights: {run_dir / 'best.pt'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
