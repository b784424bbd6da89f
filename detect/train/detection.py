"""A detection training run: config -> checked input -> built run -> epochs (`detect.train.lifecycle`) -> files.

`train_detector(config, overrides)` is what `tools/train_det.py CONFIG key=value...` and `detect.api.train` run. It
writes to a fresh run directory (`output_dir`, or `output_dir-2`, ...): config.yaml, val_gt.json (COCO ground truth),
results.csv (one column per loss part), curves.png, last.pt, best.pt (best COCO AP), val_predictions.jpg,
pr_curve.png, the analysis pictures of the final model, and TensorBoard events when tensorboard is installed.
Every input (config, files, data, model, weights) is checked before the run directory exists (DESIGN §8).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backbones.checkpoint import atomic_save
from backbones.errors import UserError
from detect.checkpoints import consent_to_plugins, detector_checkpoint, read_detector_checkpoint
from detect.config import DetConfig, DetDataConfig, check_input_files, config_to_dict, load_config
from detect.data.coco import write_coco_json
from detect.eval.analysis import save_analysis
from detect.eval.evaluate import evaluate, nan_to_zero
from detect.eval.viz import plot_curves, plot_pr_curve, save_gt_vs_pred_grid
from detect.losses.yolo import LEGACY_PART_ORDER
from detect.models.info import format_info, model_info
from detect.plugins import import_plugins
from detect.precision import Precision, training_precision
from detect.rundirs import discard_run_dir, require_run_dir
from detect.train.builders import (
    build_det_criterion,
    build_det_datasets,
    build_det_loaders,
    build_det_model,
    build_det_optimizer,
    build_schedule,
    detector_spec,
)
from detect.train.distributed import DistInfo, prepare_model, unwrap
from detect.train.engine import EpochStart, Optimization, train_one_epoch
from detect.train.failures import memory_advice
from detect.train.group_faults import setup_step
from detect.train.lifecycle import execute, mark_first_batch, phase, start
from detect.train.optim import ModelEMA
from detect.train.runs import ResultsCSV, ensure_synthetic_data, prepare_run
from detect.train.state import ResumeState

logger = logging.getLogger("plugdet")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "det" / "default.yaml"
FIRST_RUN = ("train without pretrained backbone weights with model.backbone_weights=null, or pretrain them first with "
             "`python tools/train_cls.py` (it writes runs/cls/default/backbone.pt)")  # fmt: skip


def first_run_hint() -> str:
    """The ways out when model.backbone_weights names a file that is not there (the default's, on a first run)."""
    demo = Path("runs/demo/cls/backbone.pt")
    return FIRST_RUN + (f"; `make demo` left one at {demo}" if demo.is_file() else "")


def resolve_det_config(
    path: str | None, overrides: Sequence[str], check_files: bool = True, base: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, Any] | None]:
    """The config (CONFIG, default configs/det/default.yaml) and, with train.resume, the last.pt whose config is the
    base (CONFIG and overrides on top); the plugin modules the user named (`imports`) are imported. A resumed run's
    plugins must be named again (a checkpoint is data, `detect.checkpoints.consent_to_plugins`). The files the config
    names (weights, train.resume) are checked here, before any work (not with `check_files=False`). `base`: a config
    (a checkpoint's, for fine-tuning it) in the default config's place."""
    overrides = list(overrides)
    resuming = any(arg.startswith("train.resume=") and arg != "train.resume=null" for arg in overrides)
    if path is None and base is None and not resuming and DEFAULT_CONFIG.is_file():
        path = str(DEFAULT_CONFIG)
    cfg, ckpt = load_config(DetConfig, path, overrides, base=dict(base) if base else None), None
    if check_files:
        check_input_files(cfg, ["train.resume"])
    if cfg.train.resume:
        ckpt = read_detector_checkpoint(cfg.train.resume)
        if "train_state" not in ckpt:
            raise UserError(f"{cfg.train.resume} holds no training state (best.pt?): resume from the run's last.pt")
        named = list(cfg.imports)  # the user's own (CONFIG, overrides), not the checkpoint's
        cfg = load_config(DetConfig, path, overrides, base=ckpt["config"])
        consent_to_plugins(ckpt, named, cfg.train.resume, "imports=[MODULE]")  # imports `named`
    else:
        import_plugins(cfg.imports)
    if check_files and ckpt is None:  # a resume loads no initial weights
        hints = {"model.backbone_weights": first_run_hint()}
        check_input_files(cfg, ["model.backbone_weights", "model.weights"], hints)
    return cfg, ckpt


def open_tensorboard(run_dir: Path) -> Any:
    """A SummaryWriter when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir))


def read_loss_sums(saved: Any) -> dict[str, Any] | None:
    """An interrupted epoch's saved loss sums as a `LossSums` state; the YOLOv8 list [box, cls, dfl, batches] of a
    last.pt written before the parts were named is read as those names."""
    if isinstance(saved, list | tuple):
        return {"parts": dict(zip(LEGACY_PART_ORDER, saved[:-1], strict=True)), "batches": int(saved[-1])}
    return saved


@dataclass
class DetRun:
    """Everything one detection run holds between epochs (built by `build_det_run`, run by `lifecycle.execute`)."""

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
    state: ResumeState
    summary: dict = field(default_factory=dict)  # COCO numbers of the last evaluation, stored with the checkpoint
    saved: tuple[int, int] | None = None  # the position last.pt holds (None: no last.pt yet)
    tb: Any = None
    memory_advice: str = memory_advice(cache=True)
    precision_note: str = ""  # "precision: bf16 (auto: ...)": what train.precision chose here, and why

    @property
    def epochs(self) -> int:
        return int(self.cfg.train.epochs)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights evaluated and saved: the EMA when on, else the model, never the DDP wrapper."""
        return self.opt.ema.ema if self.opt.ema is not None else unwrap(self.model)

    def checkpoint(self, metrics: dict, epoch: int, with_state: bool) -> dict:
        source = self.train_set.source
        return detector_checkpoint(self.evaluated, self.arch, list(source.class_names), list(source.category_ids),
                                   config_to_dict(self.cfg), metrics, epoch,
                                   self.state.to_dict() if with_state else None)  # fmt: skip

    def last_checkpoint(self, at_boundary: bool) -> dict:
        return self.checkpoint(self.summary if at_boundary else {}, self.state.position[0], True)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        t, (train_loader, sampler, _) = self.cfg.train, self.loaders
        if epoch >= t.epochs - t.close_mosaic:
            self.train_set.close_mosaic()  # explicit: YOLOv8's last epochs see plain images
        sampler.set_epoch(epoch, self.state.position[1])
        if hasattr(self.criterion, "set_epoch"):  # a loss whose weights change over training (YOLO26's o2m / o2o)
            self.criterion.set_epoch(epoch, t.epochs)
        begin = EpochStart(epoch, self.state.position[1], self.state.sums)
        phase(f"epoch {epoch + 1} start")
        loader = mark_first_batch(train_loader, f"epoch {epoch + 1} first batch")
        try:
            stats = train_one_epoch(self.model, self.criterion, loader, self.opt, self.state, begin, self.precision)
        finally:  # an interrupted epoch's last.pt, too, says what it ran in
            self.keep_bf16_fallback()
        phase(f"epoch {epoch + 1} trained")
        return stats

    def keep_bf16_fallback(self) -> None:
        """After an epoch in which fp16 overflowed and the loop switched to bf16 (`engine._fall_back`): bf16 for the
        rest of the run, its evaluation, and in the config its checkpoints carry (`train.precision=bf16`: a resume
        and val_det run what it trained in)."""
        if self.state.fell_back_to_bf16 and not self.precision.bf16:
            self.precision = self.precision.with_bf16()
            self.opt.scaler = self.state.scaler = None
            self.cfg.train.precision = "bf16"

    def end_epoch(self, epoch: int, stats: dict[str, float], start: float) -> None:
        end_epoch(self, epoch, stats, start)

    def watched_loaders(self) -> list[Any]:
        return [self.loaders[0], self.loaders[2]]

    def done_line(self) -> str:
        best = self.state.best
        return (f"done: best AP {best['AP']:.4f} AP50 {best.get('AP50', 0.0):.4f} at epoch {best['epoch']}; "
                f"weights: {self.run_dir / 'best.pt'}")  # fmt: skip

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def build_det_run(cfg: Any, ckpt: dict | None, info: DistInfo) -> DetRun:
    """Check all input (data, model, weights) before the run directory exists (DESIGN §8), then build the run.

    Under DDP each step is a `setup_step`: a fault on any rank stops every rank at that step's end, with one line from
    rank 0 naming the rank and the step, before anyone waits in a collective for the rank that stopped."""
    t = cfg.train
    ensure_synthetic_data(cfg.data.root, cfg.data.format == "cub" and cfg.data.root == DetDataConfig.root, info)
    with setup_step("building the datasets"):
        train_set, val_set = build_det_datasets(cfg)
        num_classes = cfg.model.num_classes or len(train_set.source.class_names)
        if num_classes != len(train_set.source.class_names):
            raise UserError(f"model.num_classes={num_classes} but the data has {len(train_set.source.class_names)} "
                            "classes")  # fmt: skip
    phase("data scan")
    with setup_step("building the model"):
        model = build_det_model(cfg, num_classes, load_backbone=ckpt is None).to(info.device)
        criterion, optimizer = build_det_criterion(cfg, model), build_det_optimizer(cfg, model)
        ema = ModelEMA(model) if t.ema else None
        precision, precision_note = training_precision(info.device, t.precision, t.channels_last)
        scaler = torch.amp.GradScaler("cuda") if precision.amp and not precision.bf16 else None  # fp16 only
        state = ResumeState(model=model, optimizer=optimizer, ema=ema, scaler=scaler, best={"AP": -1.0, "epoch": 0},
                            keep_gradients=True)  # fmt: skip
        if ckpt is not None:
            state.restore(ckpt["train_state"], cfg.train.resume)
            state.sums = read_loss_sums(state.sums)
    phase("model build")
    run_dir = prepare_run(cfg, ckpt is not None, info)
    try:
        with setup_step("writing val_gt.json", alone=True):
            if info.is_main:
                ResultsCSV(run_dir / "results.csv").truncate(state.position[0])
                if not (run_dir / "val_gt.json").exists():
                    write_coco_json(val_set.source, run_dir / "val_gt.json")
        phase("run folder + val_gt.json")
        with setup_step("building the loaders"):
            loaders = build_det_loaders(train_set, val_set, cfg, info)
            iters = -(-len(loaders[1].shard(0)) // loaders[0].batch_size)  # batches in a full epoch
            opt = Optimization(optimizer, build_schedule(cfg, iters), ema, scaler, t.grad_clip)
            tb = open_tensorboard(run_dir) if info.is_main else None
        phase("loaders (+ RAM cache)")
        with setup_step("wrapping the model in DistributedDataParallel"):
            model = prepare_model(model, info, t.sync_bn)
    except BaseException:
        if info.is_main:
            discard_run_dir(run_dir)
        raise
    return DetRun(cfg, info, model, criterion, opt, precision, train_set, val_set, loaders, run_dir,
                  detector_spec(cfg, num_classes).to_arch(), state, tb=tb,
                  saved=state.position if ckpt is not None else None, precision_note=precision_note)  # fmt: skip


def save_pictures(run: DetRun, kept: list, metrics: dict) -> None:
    """val_predictions.jpg (ground truth beside prediction) and pr_curve.png of an evaluation."""
    names, source = list(run.val_set.source.class_names), run.val_set.source
    if kept:
        images = [source.load_image(index) for index, _ in kept]
        gts = [source.annotations(index) for index, _ in kept]
        save_gt_vs_pred_grid(images, gts, [det for _, det in kept], names, run.run_dir / "val_predictions.jpg")
    plot_pr_curve(metrics["precision"], names, run.run_dir / "pr_curve.png")


def write_row(run: DetRun, epoch: int, stats: dict, metrics: dict, seconds: float) -> dict:
    """The epoch's results.csv row (a `train/<part>` column per loss part), curves.png and TensorBoard scalars."""
    parts = [k for k in stats if k != "img_per_s" and not k.startswith("lr/")]
    row = {"epoch": epoch + 1, **{f"train/{k}": stats[k] for k in parts},
           "val/AP": nan_to_zero(metrics["AP"]) if metrics else "",
           "val/AP50": nan_to_zero(metrics["AP50"]) if metrics else "", "img_per_s": stats["img_per_s"],
           **{k: v for k, v in stats.items() if k.startswith("lr/")}, "time_s": seconds}  # fmt: skip
    ResultsCSV(run.run_dir / "results.csv").append(row)
    panels = [
        ("loss", [f"train/{k}" for k in parts]),
        ("lr", ["lr/pg0", "lr/pg2"]),
        ("COCO AP", ["val/AP", "val/AP50"]),
    ]
    plot_curves(run.run_dir / "results.csv", run.run_dir / "curves.png", panels)
    if run.tb is not None:
        for key, value in row.items():
            if key != "epoch" and value != "":
                run.tb.add_scalar(key, value, epoch + 1)
    return row


def end_epoch(run: DetRun, epoch: int, stats: dict, start: float) -> None:
    """Evaluate (every eval.interval epochs and after the last), write the row, best.pt and last.pt, print a line."""
    cfg, t = run.cfg, run.cfg.train
    run.state.position, run.state.sums = (epoch + 1, 0), None
    if not run.info.is_main:
        return
    require_run_dir(run.run_dir)
    metrics: dict[str, Any] = {}
    if (epoch + 1) % cfg.eval.interval == 0 or epoch + 1 == t.epochs:
        metrics, predictions, kept = evaluate(run.evaluated, run.loaders[2], run.run_dir / "val_gt.json",
                                    list(run.train_set.source.category_ids), run.precision, cfg.eval.conf,
                                    cfg.eval.iou, cfg.eval.max_det, cfg.eval.backend, keep_images=8,
                                    coco_max_dets=cfg.eval.coco_max_dets)  # fmt: skip
        phase(f"epoch {epoch + 1} evaluation")
    row = write_row(run, epoch, stats, metrics, time.perf_counter() - start)
    phase(f"epoch {epoch + 1} results row + curves")
    run.summary = {k: metrics[k] for k in ("AP", "AP50", "coco_stats", "per_class_AP") if k in metrics}
    best = run.state.best
    if metrics and row["val/AP"] > best["AP"]:
        run.state.best = best = {"AP": row["val/AP"], "AP50": row["val/AP50"], "epoch": epoch + 1}
        atomic_save(run.checkpoint(run.summary, epoch + 1, False), run.run_dir / "best.pt")
        save_pictures(run, kept, metrics)
        phase(f"epoch {epoch + 1} best.pt + pictures")
    if metrics and epoch + 1 == t.epochs:  # the analysis pictures of the final model (as val_det draws them)
        gt = json.loads((run.run_dir / "val_gt.json").read_text())
        save_analysis(gt, predictions, metrics, list(run.val_set.source.class_names), run.run_dir)
        phase(f"epoch {epoch + 1} analysis pictures")
    atomic_save(run.checkpoint(run.summary, epoch + 1, True), run.run_dir / "last.pt")
    phase(f"epoch {epoch + 1} last.pt")
    run.saved = run.state.position
    losses = " ".join(f"{k.removeprefix('train/')} {v:.3f}" for k, v in row.items() if k.startswith("train/"))
    evaluated = f" | AP {row['val/AP']:.4f} AP50 {row['val/AP50']:.4f}" if metrics else ""
    shown = f" | best AP {best['AP']:.4f} (epoch {best['epoch']})" if best["epoch"] > 0 else ""
    print(f"epoch {epoch + 1}/{t.epochs}: {losses} | {stats['img_per_s']:.1f} img/s{evaluated}{shown} | "
          f"{time.perf_counter() - start:.1f}s", flush=True)  # fmt: skip


def train_detector(
    config: str | None = None, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None
) -> DetRun:
    """Resolve the config, build the run and train it to its end (`lifecycle.execute`); returns the finished run.

    Args:
        config: a YAML file (None: configs/det/default.yaml, or the resumed run's own config).
        overrides: `key=value` strings, as on the tool's command line.
        base: a config in the default config's place (`detect.api.Model.train`: the checkpoint's own).

    Raises:
        UserError: bad input, before any work; RunError: the surroundings stopped the run (one line, with the
            last.pt that survived); KeyboardInterrupt: Ctrl-C / SIGTERM, after last.pt was saved.
    """
    phase("imports")
    cfg, ckpt = resolve_det_config(config, overrides, base=base)
    phase("config")
    run = start(cfg, ckpt, build_det_run)
    info = run.info
    if info.is_main:  # after every input check: bad input stays one line
        logger.info(format_info(model_info(unwrap(run.model), cfg.data.img_size), "detector"))
        phase("model info")
        spec = run.arch
        print(f"train_det: {spec['backbone']['name']} + {spec['neck']['name']} neck + {spec['head']['name']} head, "
              f"{spec['num_classes']} classes, {len(run.train_set)} train / {len(run.val_set)} val images at "
              f"{cfg.data.img_size} px, {cfg.train.epochs} epochs on {info.device} x{info.world_size} -> "
              f"{run.run_dir}", flush=True)  # fmt: skip
        print(run.precision_note, flush=True)
    execute(run)
    phase("done")
    return run
