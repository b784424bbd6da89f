"""What CUB pretraining is worth for detection: COCO AP at equal detection epochs, by backbone initialisation.

Variants, each a `tools/train_det.py` subprocess run one after the other with the same data, epochs and seed:

- `scratch`: `model.backbone_weights=null` (random initialisation).
- `pretrained`: the backbone that `tools/train_cls.py` pretrained on CUB (`--backbone`, default
  runs/cls/default/backbone.pt; `--pretrain` trains it here first with train_cls's defaults).
- `pretrained-long`: the same recipe pretrained for twice the epochs (`--long-backbone PATH`, or `--pretrain-long`:
  train_cls here with the first backbone's own config and `train.epochs=2N`). A backbone.pt holds the weights of
  the best val top-1 epoch, which the table shows beside the run's epochs.

The detector's backbone architecture is read from the backbone checkpoint (`arch`). AP and AP50 are those of the
final epoch (EMA weights; pycocotools, conf 0.001, IoU 0.7, max_det 300) from each run's results.csv, so every
variant is scored at the same epoch by the same evaluation. `key=value` arguments go to every train_det run.

    python tools/train_cls.py && python bench/bench_transfer.py --pretrain-long   # ~25 min on 2 cores
    python bench/bench_transfer.py --epochs 30 --seeds 0 1 2 data.labels=species
    python bench/bench_transfer.py --quick        # smoke run: tiny data, 1 + 2 cls epochs, 1 det epoch
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from backbones.errors import UserError

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": "/tmp/plugdet-yolo-config",
               "MPLCONFIGDIR": "/tmp/plugdet-mpl-config", "PYTHONUNBUFFERED": "1"}  # fmt: skip
QUICK_CLS = ["data.img_size=64", "data.resize_size=72", "train.batch_size=8", "train.warmup_epochs=0.5"]
QUICK_DET = ["train.batch_size=8", "data.img_size=128"]


def run_logged(cmd: list[str], threads: int, log: Path) -> float:
    """Run a tool subprocess offline with OMP_NUM_THREADS=threads, output to `log`; returns its wall seconds."""
    env = {**OFFLINE_ENV, **os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed with exit code {code}; log {log}:\n{tail}")
    return time.perf_counter() - start


def backbone_info(path: Path) -> dict[str, Any]:
    """arch, classification epochs and top-1 of a train_cls backbone.pt."""
    from backbones.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if "arch" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise RuntimeError(f"{path} is not a backbone.pt from tools/train_cls.py")
    metrics = ckpt.get("metrics") or {}
    return {"arch": ckpt["arch"], "config": ckpt["config"], "cls_epochs": ckpt["config"]["train"]["epochs"],
            "best_epoch": metrics.get("epoch"), "top1": metrics.get("top1")}  # fmt: skip


def pretrain(args: argparse.Namespace, out: Path, overrides: list[str], config: dict | None = None) -> Path:
    """Run tools/train_cls.py into a fresh `out` (with `config` as its CONFIG file); returns out/backbone.pt."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "tools" / "train_cls.py")]
    if config is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        config_path = out.parent / f"{out.name}_config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd.append(str(config_path))
    cmd += [*overrides, f"output_dir={out}", f"train.threads={args.threads}", f"train.workers={args.workers}",
            "train.resume=null"]  # fmt: skip
    seconds = run_logged(cmd, args.threads, Path(args.work) / "logs" / f"{out.name}.log")
    print(f"pretrained {out / 'backbone.pt'} in {seconds:.0f} s", flush=True)
    return out / "backbone.pt"


def prepare_backbones(args: argparse.Namespace, root: Path) -> dict[str, Path | None]:
    """variant -> backbone weights (None = scratch), pretraining here when asked."""
    work = Path(args.work)
    quick = [f"data.root={root}", *QUICK_CLS, "train.epochs=1"] if args.quick else []
    base = Path(args.backbone)
    if args.pretrain or args.quick:
        base = pretrain(args, work / "cls_base", quick)
    elif not base.is_file():
        raise RuntimeError(f"{base} not found: run `python tools/train_cls.py` first, pass --backbone, or --pretrain")
    backbones: dict[str, Path | None] = {"scratch": None, "pretrained": base}
    if args.long_backbone:
        backbones["pretrained-long"] = Path(args.long_backbone)
    elif args.pretrain_long or args.quick:
        info = backbone_info(base)
        epochs = args.long_epochs or 2 * info["cls_epochs"]
        backbones["pretrained-long"] = pretrain(args, work / "cls_long", [f"train.epochs={epochs}"], info["config"])
    return backbones


def train_detector(args: argparse.Namespace, root: Path, variant: str, weights: Path | None, seed: int,
                   arch: str) -> dict[str, Any]:  # fmt: skip
    """One train_det run; returns the final epoch's AP / AP50, the best AP and the wall time."""
    out = Path(args.work) / "det" / f"{variant}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"data.root={root}", f"train.epochs={args.epochs}", f"model.backbone={arch}",
                 f"model.backbone_weights={weights if weights is not None else 'null'}", f"seed={seed}",
                 f"train.threads={args.threads}", f"train.workers={args.workers}", f"output_dir={out}",
                 f"eval.interval={args.eval_interval or args.epochs}"]  # fmt: skip
    if args.close_mosaic is not None:
        overrides.append(f"train.close_mosaic={args.close_mosaic}")
    overrides += (QUICK_DET if args.quick else []) + args.overrides
    cmd = [sys.executable, str(REPO / "tools" / "train_det.py"), *overrides]
    seconds = run_logged(cmd, args.threads, Path(args.work) / "logs" / f"det_{variant}_seed{seed}.log")
    with (out / "results.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["val/AP"] != ""]
    last = rows[-1]
    return {"ap": float(last["val/AP"]), "ap50": float(last["val/AP50"]), "epoch": int(last["epoch"]),
            "best_ap": max(float(row["val/AP"]) for row in rows), "seconds": seconds}  # fmt: skip


def _spread(values: list[float]) -> str:
    """Mean ± sample standard deviation (just the mean for one value)."""
    mean = statistics.fmean(values)
    return f"{mean:.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def print_tables(results: dict[tuple[str, int], dict[str, Any]], infos: dict[str, dict | None], seeds: list[int],
                 epochs: int) -> None:  # fmt: skip
    """Per-run rows, then mean ± sd per variant with the gain over scratch, as markdown."""
    print(f"\nAP of the final epoch ({epochs} detection epochs), pycocotools on the val split\n")
    print(
        "| variant | backbone weights | cls epochs (backbone.pt's) | cls top-1 | seed | AP | AP50 | best AP | wall s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (variant, seed), r in results.items():
        info = infos[variant]
        name = "-" if info is None else info["path"]
        cls_epochs = "-" if info is None else f"{info['cls_epochs']} (best {info['best_epoch']})"
        top1 = "-" if info is None or info["top1"] is None else f"{info['top1']:.3f}"
        print(f"| {variant} | {name} | {cls_epochs} | {top1} | {seed} | {r['ap']:.4f} | {r['ap50']:.4f} | "
              f"{r['best_ap']:.4f} | {r['seconds']:.0f} |")  # fmt: skip
    print(f"\nover seeds {' '.join(map(str, seeds))} (mean ± sd):\n")
    print("| variant | AP | AP50 | AP gain over scratch |\n|---|---:|---:|---:|")
    scratch = [results[("scratch", seed)]["ap"] for seed in seeds]
    for variant in infos:
        aps = [results[(variant, seed)]["ap"] for seed in seeds]
        ap50s = [results[(variant, seed)]["ap50"] for seed in seeds]
        gain = [a - b for a, b in zip(aps, scratch, strict=True)]
        shown = "-" if variant == "scratch" else f"{statistics.fmean(gain):+.4f}"
        print(f"| {variant} | {_spread(aps)} | {_spread(ap50s)} | {shown} |")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_transfer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="runs/cls/default/backbone.pt", help="train_cls backbone.pt")
    parser.add_argument("--pretrain", action="store_true", help="pretrain --backbone here first (train_cls defaults)")
    parser.add_argument("--long-backbone", default=None, help="backbone.pt pretrained for longer")
    parser.add_argument("--pretrain-long", action="store_true", help="pretrain the long backbone here (2x epochs)")
    parser.add_argument("--long-epochs", type=int, default=None, help="cls epochs of --pretrain-long (default 2N)")
    parser.add_argument("--root", default="data/synth_cub", help="CUB data for detection (folder of CUB_200_2011)")
    parser.add_argument("--epochs", type=int, default=10, help="detection epochs of every variant")
    parser.add_argument("--close-mosaic", type=int, default=None, help="default: the det config's (5)")
    parser.add_argument("--eval-interval", type=int, default=None, help="evaluate every k epochs (default: last)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="runs/bench/transfer", help="runs and logs")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 + 2 cls epochs, 1 det epoch")
    parser.add_argument("overrides", nargs="*", help="key=value for every train_det run")
    args = parser.parse_args(argv)
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        parser.error(f"expected key=value overrides, got {' '.join(bad)}")
    if args.quick:
        args.epochs, args.seeds, args.work, args.long_epochs = 1, [0], args.work + "-quick", 2
    return args


def main(argv: list[str]) -> int:
    from detect.precision import cpu_report

    print(cpu_report(), flush=True)
    args = parse_args(argv)
    root = Path(args.root)
    if args.quick:
        from detect.data.synth import make_synth_cub, synth_cub_exists

        root = Path(args.work) / "synth_quick"
        if not synth_cub_exists(root):
            make_synth_cub(root, num_species=4, images_per_species=8, width_range=(96, 128),
                           height_range=(72, 96), overwrite=True)  # fmt: skip
    try:
        backbones = prepare_backbones(args, root)
        infos = {k: None if p is None else {**backbone_info(p), "path": str(p)} for k, p in backbones.items()}
        arch = infos["pretrained"]["arch"]
        if any(info is not None and info["arch"] != arch for info in infos.values()):
            raise RuntimeError(f"the backbones differ in architecture: {[i['arch'] for i in infos.values() if i]}")
        print(f"transfer: {args.epochs} detection epochs on {root}, backbone {arch}, seeds {args.seeds}, "
              f"variants {', '.join(backbones)}; logs in {Path(args.work) / 'logs'}", flush=True)  # fmt: skip
        results = {}
        for seed in args.seeds:
            for variant, weights in backbones.items():
                results[(variant, seed)] = r = train_detector(args, root, variant, weights, seed, arch)
                print(
                    f"seed {seed} {variant}: AP {r['ap']:.4f} AP50 {r['ap50']:.4f} ({r['seconds']:.0f} s)", flush=True
                )
    except (RuntimeError, UserError) as err:  # a failed run: its log's tail, no traceback of this driver
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_tables(results, infos, args.seeds, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
