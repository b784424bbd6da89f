"""Train a detector: `python tools/train_det.py [CONFIG.yaml] [key=value ...] [--debug]`.

With no CONFIG: `configs/det/default.yaml`, the synthetic mini-CUB (bird labels, 256 px, YOLOv8 at scale n) from the
backbone that `tools/train_cls.py` pretrained (runs/cls/default/backbone.pt; `model.backbone_weights=null` for
none). Any registered parts plug in by name: `model.backbone=resnet50 model.neck=yolo11 model.head=yolo11`, and a
part of your own registers in a module named by `imports=[my_parts]`. Writes to a fresh run directory (`output_dir`,
or `output_dir-2`, ...): config.yaml, val_gt.json (COCO ground truth), results.csv (one column per loss part),
curves.png, last.pt, best.pt (best COCO AP), val_predictions.jpg, pr_curve.png, and TensorBoard events when
tensorboard is installed. `train.resume=RUN/last.pt` continues that run exactly. Ctrl-C / SIGTERM saves last.pt.
Under `torchrun --nproc_per_node=N` the processes train with DDP (train.batch_size is the global batch); rank 0
evaluates and writes, and a fault on one rank (a bad sample, a signal, a non-finite loss, a process that died) stops
every rank at the same step with one line from rank 0 naming that rank. Bad input: one line on stderr, exit code 2,
before any work; a full disk or a killed loader worker: one line saying which last.pt survived, exit code 1.
`--print-config` prints the resolved config and exits.
"""

# ruff: noqa: E402  (the imports below come after the light --help answer)
from __future__ import annotations

import json
import logging
import sys

USAGE = ("usage: train_det.py [CONFIG.yaml] [key=value ...] [--print-config] [--debug]   "
         "(e.g. train.epochs=5 model.backbone=resnet50)")  # fmt: skip

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # answered from the schema alone, without torch
    from detect.config_help import tool_help
    from detect.schema import DetConfig

    print(tool_help(__doc__, USAGE, DetConfig))
    sys.exit(0)

import time
from pathlib import Path
from typing import Any

import torch

from backbones.checkpoint import atomic_save
from backbones.errors import UserError
from detect.cli import (
    ForcedStop,
    TrainingInterrupted,
    deferred_interrupts,
    interrupts_for_group,
    run_tool,
    shielded_from_signals,
    signals_received,
)
from detect.config import DetConfig, DetDataConfig, answer_info_flags, check_input_files, load_config
from detect.data.coco import write_coco_json
from detect.eval.analysis import save_analysis
from detect.eval.evaluate import evaluate, nan_to_zero
from detect.eval.viz import plot_curves, plot_pr_curve, save_gt_vs_pred_grid
from detect.models.checkpoint import read_detector_checkpoint
from detect.models.info import format_info, model_info
from detect.plugins import import_plugins
from detect.precision import Precision, choose_bf16
from detect.train.builders import (
    build_det_criterion,
    build_det_datasets,
    build_det_loaders,
    build_det_model,
    build_det_optimizer,
    build_schedule,
    detector_spec,
    restore_training_state,
)
from detect.train.det_run import DetRun
from detect.train.distributed import (
    DistInfo,
    agree,
    cleanup_distributed,
    group_stop_error,
    init_distributed,
    prepare_model,
    unwrap,
)
from detect.train.engine import EpochStart, Optimization, StepState, train_one_epoch
from detect.train.optim import ModelEMA
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

logger = logging.getLogger("plugdet")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "det" / "default.yaml"
FIRST_RUN = ("train without pretrained backbone weights with model.backbone_weights=null, or pretrain them first with "
             "`python tools/train_cls.py` (it writes runs/cls/default/backbone.pt)")  # fmt: skip
MEMORY_ADVICE = "if memory is short, fewer loader processes (train.workers) and data.cache=false use less"


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """An optional config file (the one argument without '=') and key=value overrides."""
    paths = [arg for arg in argv if "=" not in arg]
    if len(paths) > 1 or (paths and paths[0].startswith("-")):
        raise UserError(f"unexpected arguments {' '.join(paths)}; {USAGE}")
    return (paths[0] if paths else None), [arg for arg in argv if "=" in arg]


def first_run_hint() -> str:
    """The ways out when model.backbone_weights names a file that is not there (the default's, on a first run)."""
    demo = Path("runs/demo/cls/backbone.pt")
    return FIRST_RUN + (f"; `make demo` left one at {demo}" if demo.is_file() else "")


def resolve_config(argv: list[str], check_files: bool = True) -> tuple[Any, dict | None]:
    """The config (CONFIG, default configs/det/default.yaml) and, with train.resume, the last.pt whose config is
    the base (CONFIG and overrides on top); the config's plugin modules (`imports`) are imported. The files the
    config names (weights, train.resume) are checked here, before any work (not with `check_files=False`)."""
    path, overrides = parse_args(argv)
    resuming = any(arg.startswith("train.resume=") and arg != "train.resume=null" for arg in overrides)
    if path is None and not resuming and DEFAULT_CONFIG.is_file():
        path = str(DEFAULT_CONFIG)
    cfg, ckpt = load_config(DetConfig, path, overrides), None
    if check_files:
        check_input_files(cfg, ["train.resume"])
    if cfg.train.resume:
        ckpt = read_detector_checkpoint(cfg.train.resume)
        if "train_state" not in ckpt:
            raise UserError(f"{cfg.train.resume} holds no training state (best.pt?): resume from the run's last.pt")
        cfg = load_config(DetConfig, path, overrides, base=ckpt["config"])
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


def setup(cfg: Any, ckpt: dict | None, info: DistInfo) -> DetRun:
    """Check all input (data, model, weights) before the run directory exists (DESIGN §8), then build the run."""
    t = cfg.train
    ensure_synthetic_data(cfg.data.root, cfg.data.format == "cub" and cfg.data.root == DetDataConfig.root, info)
    train_set, val_set = build_det_datasets(cfg)
    num_classes = cfg.model.num_classes or len(train_set.source.class_names)
    if num_classes != len(train_set.source.class_names):
        raise UserError(f"model.num_classes={num_classes} but the data has {len(train_set.source.class_names)} classes")
    model = build_det_model(cfg, num_classes, load_backbone=ckpt is None).to(info.device)
    criterion, optimizer = build_det_criterion(cfg, model), build_det_optimizer(cfg, model)
    ema = ModelEMA(model) if t.ema else None
    scaler = torch.amp.GradScaler("cuda") if info.device.type == "cuda" and t.amp and not t.bf16 else None
    step, position, best, partial_sums = StepState(), (0, 0), {"AP": -1.0, "epoch": 0}, None
    if ckpt is not None:
        position, step.last_step, best, partial_sums = restore_training_state(
            ckpt["train_state"], model, optimizer, ema, scaler, cfg.train.resume
        )
    run_dir = prepare_run(cfg, ckpt is not None, info)
    try:
        if info.is_main:
            ResultsCSV(run_dir / "results.csv").truncate(position[0])
            if not (run_dir / "val_gt.json").exists():
                write_coco_json(val_set.source, run_dir / "val_gt.json")
        model = prepare_model(model, info, t.sync_bn)
        loaders = build_det_loaders(train_set, val_set, cfg, info)
        iters = -(-len(loaders[1].shard(0)) // loaders[0].batch_size)  # batches in a full epoch
        opt = Optimization(optimizer, build_schedule(cfg, iters), ema, scaler, t.grad_clip)
        precision = Precision(info.device, t.amp, choose_bf16(info.device, t.bf16, "train.bf16"), t.channels_last)
        tb = open_tensorboard(run_dir) if info.is_main else None
    except BaseException:
        if info.is_main:
            discard_run_dir(run_dir)
        raise
    return DetRun(cfg, info, model, criterion, opt, precision, train_set, val_set, loaders, run_dir,
                  detector_spec(cfg, num_classes).to_arch(), step, position, partial_sums, best, tb=tb,
                  saved=position if ckpt is not None else None)  # fmt: skip


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
    run.position, run.partial_sums = (epoch + 1, 0), None
    if not run.info.is_main:
        return
    require_run_dir(run.run_dir)
    metrics: dict[str, Any] = {}
    if (epoch + 1) % cfg.eval.interval == 0 or epoch + 1 == t.epochs:
        metrics, predictions, kept = evaluate(run.evaluated, run.loaders[2], run.run_dir / "val_gt.json",
                                    list(run.train_set.source.category_ids), run.precision, cfg.eval.conf,
                                    cfg.eval.iou, cfg.eval.max_det, cfg.eval.backend, keep_images=8,
                                    coco_max_dets=cfg.eval.coco_max_dets)  # fmt: skip
    row = write_row(run, epoch, stats, metrics, time.perf_counter() - start)
    run.summary = {k: metrics[k] for k in ("AP", "AP50", "coco_stats", "per_class_AP") if k in metrics}
    if metrics and row["val/AP"] > run.best["AP"]:
        run.best = {"AP": row["val/AP"], "AP50": row["val/AP50"], "epoch": epoch + 1}
        atomic_save(run.checkpoint(run.summary, epoch + 1, False), run.run_dir / "best.pt")
        save_pictures(run, kept, metrics)
    if metrics and epoch + 1 == t.epochs:  # the analysis pictures of the final model (as val_det draws them)
        gt = json.loads((run.run_dir / "val_gt.json").read_text())
        save_analysis(gt, predictions, metrics, list(run.val_set.source.class_names), run.run_dir)
    atomic_save(run.checkpoint(run.summary, epoch + 1, True), run.run_dir / "last.pt")
    run.saved = run.position
    losses = " ".join(f"{k.removeprefix('train/')} {v:.3f}" for k, v in row.items() if k.startswith("train/"))
    evaluated = f" | AP {row['val/AP']:.4f} AP50 {row['val/AP50']:.4f}" if metrics else ""
    best = f" | best AP {run.best['AP']:.4f} (epoch {run.best['epoch']})" if run.best["epoch"] > 0 else ""
    print(f"epoch {epoch + 1}/{t.epochs}: {losses} | {stats['img_per_s']:.1f} img/s{evaluated}{best} | "
          f"{time.perf_counter() - start:.1f}s", flush=True)  # fmt: skip


def save_interrupted(run: DetRun, at_boundary: bool, origin: str = "") -> None:
    """Rank 0 after Ctrl-C / SIGTERM (under DDP: `origin`, the rank that received which): last.pt at the position
    reached, written whatever further signals arrive."""
    last = run.run_dir / "last.pt"
    with shielded_from_signals():
        atomic_save(run.checkpoint(run.summary if at_boundary else {}, run.position[0], True), last)
        run.saved = run.position
    epoch, batch = run.position
    where = f"after epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
    by = f" by {origin}" if origin else ""
    print(f"\ninterrupted{by}: saved {last} ({where}); continue with train.resume={last}", file=sys.stderr)


def run_epochs(run: DetRun) -> None:
    """The epochs from the resume position: train, then evaluate and write the epoch's files (`end_epoch`)."""
    t, (train_loader, sampler, _) = run.cfg.train, run.loaders
    for epoch in range(run.position[0], t.epochs):
        start = time.perf_counter()
        if epoch >= t.epochs - t.close_mosaic:
            run.train_set.close_mosaic()  # explicit: YOLOv8's last epochs see plain images
        sampler.set_epoch(epoch, run.position[1])
        begin = EpochStart(epoch, run.position[1], run.partial_sums)
        stats = train_one_epoch(run.model, run.criterion, train_loader, run.opt, run.step, begin, run.precision)
        # Evaluation, results.csv and checkpoints of this epoch finish together: a Ctrl-C / SIGTERM
        # waits for last.pt (a second one stops at once), so a resume never misses an epoch's row.
        with deferred_interrupts():
            end_epoch(run, epoch, stats, start)
            agree()  # DDP: a signal held by any rank while rank 0 evaluated stops all of them here
        run.saved = run.position  # rank 0 wrote it (the other ranks passed `agree` after that)


def train(run: DetRun) -> None:
    """`run_epochs`; Ctrl-C / SIGTERM saves last.pt at the exact position reached.

    Under DDP every rank stops at the same step, whichever rank the signal or the fault reached (`agree`), and a rank
    that is gone stops the others with one line naming it (`group_stop_error`); the handlers below run with signals
    still held, so torchrun's SIGTERM to the remaining ranks cannot cut them short.
    """
    with interrupts_for_group(run.info.distributed):
        try:
            run_epochs(run)
        except ForcedStop:
            if run.info.is_main:
                print(f"\nstopped at once by a third signal, possibly in the middle of a step: last.pt was not "
                      f"updated; {survivor_note(run.run_dir, run.saved)}", file=sys.stderr)  # fmt: skip
            raise
        except KeyboardInterrupt as stop:
            if run.position[0] >= run.cfg.train.epochs and not isinstance(stop, TrainingInterrupted):
                return  # the signal came after the last epoch's last.pt: the run is complete, nothing to save again
            if isinstance(stop, TrainingInterrupted):
                run.position, run.partial_sums = (stop.epoch, stop.batch), stop.sums
            if run.info.is_main:
                save_interrupted(run, not isinstance(stop, TrainingInterrupted), getattr(stop, "origin", ""))
            raise
        except Exception as exc:
            note = survivor_note(run.run_dir, run.saved)
            error = group_stop_error(exc, note, MEMORY_ADVICE) or stopped_run_error(
                exc, run.loaders[::2], run.run_dir, run.saved, MEMORY_ADVICE
            )
            if error is None:
                raise
            raise error from exc


def close_run(run: DetRun, stop: BaseException | None = None) -> None:
    """TensorBoard's file and the process group (after a DDP stop, rank 0 ends first: `cleanup_distributed`)."""
    if run.tb is not None:
        run.tb.close()
    cleanup_distributed(stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if answer_info_flags(argv, __doc__, USAGE, DetConfig, lambda rest: resolve_config(rest, check_files=False)[0]):
        return 0
    cfg, ckpt = resolve_config(argv)
    info = init_distributed(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    run = setup(cfg, ckpt, info)
    if info.is_main:  # after every input check: bad input stays one line
        logger.info(format_info(model_info(unwrap(run.model), cfg.data.img_size), "detector"))
    spec = run.arch
    if info.is_main:
        print(f"train_det: {spec['backbone']['name']} + {spec['neck']['name']} neck + {spec['head']['name']} head, "
              f"{spec['num_classes']} classes, {len(run.train_set)} train / {len(run.val_set)} val images at "
              f"{cfg.data.img_size} px, {cfg.train.epochs} epochs on {info.device} x{info.world_size} -> "
              f"{run.run_dir}", flush=True)  # fmt: skip
    try:
        train(run)
    except BaseException as stop:
        close_run(run, stop)
        if info.is_main:
            discard_run_dir(run.run_dir)  # only a new run that never reached a last.pt
        raise
    with shielded_from_signals():  # a signal now only comes after the work: the last lines still print
        close_run(run)
        if info.is_main:
            print(f"done: best AP {run.best['AP']:.4f} AP50 {run.best.get('AP50', 0.0):.4f} at epoch "
                  f"{run.best['epoch']}; weights: {run.run_dir / 'best.pt'}", flush=True)  # fmt: skip
            if signals_received():
                print("(the stop signal came after the last epoch was saved: the run is complete, nothing lost)",
                      file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
