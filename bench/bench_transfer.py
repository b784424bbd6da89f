"""What CUB pretraining is worth for detection: one backbone under one head, scratch vs pretrained, N seeds.

A thin call of the sweep (`tools/sweep.py`, `detect.sweep`): this script writes a one-backbone, one-head sweep
config (`--work/sweep_config.yaml`: init scratch and pretrained, `--seeds`, `--cls-epochs` of train_cls, `--epochs`
of train_det, evaluation at the last epoch only) and runs the sweep on it, which pretrains the backbone once
(tools/train_cls.py), trains every cell (tools/train_det.py) and writes sweep.md: AP and AP50 (pycocotools, final
epoch, EMA weights) as mean ± sd over seeds and the AP gained from pretraining, paired by seed. Re-running continues
where it stopped (finished cells are skipped). `key=value` arguments go to every train_det run.

    python bench/bench_transfer.py                                    # cspdarknet_n + yolov8, 1 seed: ~10 min
    python bench/bench_transfer.py --seeds 0 1 2 --epochs 30 data.labels=species
    python bench/bench_transfer.py --backbone csp11_n --head yolo11   # the YOLO11 neck comes with the yolo11 head
    python bench/bench_transfer.py --quick                            # smoke run: tiny data, 1 + 1 epoch
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": "/tmp/plugdet-yolo-config",
               "MPLCONFIGDIR": "/tmp/plugdet-mpl-config", "PYTHONUNBUFFERED": "1"}  # fmt: skip
NECKS = {"yolo11": "yolo11"}  # heads that come with their own neck (otherwise the det config's)


def sweep_config(args: argparse.Namespace) -> dict:
    """The one-backbone, one-head sweep config this bench runs."""
    neck = [f"model.neck={NECKS[args.head]}"] if args.head in NECKS else []
    det = [f"train.epochs={args.epochs}", f"eval.interval={args.epochs}", f"train.workers={args.workers}"]
    if args.close_mosaic is not None:
        det.append(f"train.close_mosaic={args.close_mosaic}")
    cls = [f"train.epochs={args.cls_epochs}", f"train.workers={args.workers}"]
    config = {"backbones": [args.backbone], "heads": {args.head: {"config": args.det_config, "overrides": neck}},
              "init": ["scratch", "pretrained"], "seeds": list(args.seeds), "threads": args.threads,
              "cls": {"overrides": cls}, "det": {"overrides": det + list(args.overrides)},
              "output_dir": args.work}  # fmt: skip
    if args.root:
        config["data_root"] = args.root
    return config


def quick_config(args: argparse.Namespace) -> dict:
    """configs/sweep/tiny.yaml's schedules on generated tiny data, for this bench's backbone and head."""
    from detect.data.synth import make_synth_cub, synth_cub_exists

    root = Path(args.work) / "synth_quick"
    if not synth_cub_exists(root):
        make_synth_cub(root, num_species=4, images_per_species=8, width_range=(96, 128), height_range=(72, 96),
                       overwrite=True)  # fmt: skip
    tiny = yaml.safe_load((REPO / "configs" / "sweep" / "tiny.yaml").read_text())
    config = sweep_config(args)
    config.update(data_root=str(root), cls=tiny["cls"], measure=tiny["measure"])
    config["det"] = {"overrides": tiny["det"]["overrides"] + list(args.overrides)}
    return config


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_transfer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="cspdarknet_n", help="a registered backbone name")
    parser.add_argument("--head", default="yolov8", help="a registered head family")
    parser.add_argument("--det-config", default="configs/det/default.yaml", help="train_det CONFIG of every cell")
    parser.add_argument("--root", default=None, help="data root of every run (default: the configs' data/synth_cub)")
    parser.add_argument("--epochs", type=int, default=10, help="detection epochs of every cell")
    parser.add_argument("--cls-epochs", type=int, default=12, help="classification epochs of the pretraining")
    parser.add_argument("--close-mosaic", type=int, default=None, help="default: the det config's (5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="runs/bench/transfer", help="the sweep's output_dir")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 cls + 1 det epoch")
    parser.add_argument("overrides", nargs="*", help="key=value for every train_det run")
    args = parser.parse_args(argv)
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        parser.error(f"expected key=value overrides, got {' '.join(bad)}")
    if args.quick:
        args.seeds, args.work = [0], args.work + "-quick"
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    config = quick_config(args) if args.quick else sweep_config(args)
    path = Path(args.work) / "sweep_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**OFFLINE_ENV, **os.environ}
    return subprocess.call([sys.executable, str(REPO / "tools" / "sweep.py"), str(path)], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
