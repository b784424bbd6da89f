"""Detection training side by side: plugdet `tools/train_det.py` vs Ultralytics YOLOv8n, same images, same epochs.

Both train YOLOv8n (or YOLO11n / YOLO26n, `--family yolo11` / `yolo26`) from scratch (no pretrained weights) on the
synthetic mini-CUB (bird labels) exported to YOLO txt (`detect.data.yolo_txt.export_yolo`), at 256 px, batch 16, lr
0.01 momentum 0.937 with `--optimizer` on both sides: `sgd` (the default of yolov8 and yolo11; Ultralytics'
`optimizer=SGD`) or `musgd` (the default of yolo26; plugdet `train.optimizer=musgd`, Ultralytics `optimizer=MuSGD`,
which its trainer builds from the same lr0 and momentum, Muon on the 2-D / 4-D weights at 0.2 x lr, class branches at
3 x lr). Ultralytics' `optimizer=auto` would pick AdamW for short runs; `--ul-optimizer auto` restores it. The same
close_mosaic, torch threads and loader workers, each in its own subprocess, one run after the other. Reported per
seed:

- img/s: training images per second of each epoch, validation excluded, median over the epochs. plugdet: the
  `img_per_s` column of its results.csv. Ultralytics: the epoch's images over the time between its
  `on_train_epoch_start` and `on_train_epoch_end` callbacks.
- AP, AP50: both final models (EMA weights: our last.pt; Ultralytics' last.pt through
  `detect.interop.ultralytics.from_ultralytics`) scored by the same `detect.eval.evaluate.evaluate` (letterbox, conf
  0.001, IoU 0.7, max_det 300, pycocotools) on the same val split, in fp32. `UL own AP` is Ultralytics' own
  validator on its final weights, for reference.

Threads: Ultralytics sets OMP_NUM_THREADS=1 on import when unset, and on CPU its `select_device` calls
`torch.set_num_threads(NUM_THREADS)` with `NUM_THREADS = min(8, max(1, os.cpu_count() - 1))` (1 on a 2-core
machine); its trainer also forces `workers=0` on CPU. The Ultralytics subprocess therefore gets OMP_NUM_THREADS and
`ultralytics.utils.torch_utils.NUM_THREADS` set to `--threads`, and its loader workers put back to `--ul-workers`
(default: `--workers`) in an `on_pretrain_routine_start` callback; the thread count seen at each epoch is checked.

    python bench/bench_train_vs_ultralytics.py                     # 2 seeds, 3 epochs, 2 threads, 2 workers
    python bench/bench_train_vs_ultralytics.py --epochs 10 --seeds 0 1 2 --variants fp32 bf16
    python bench/bench_train_vs_ultralytics.py --quick             # 1 epoch on 16 tiny images: a smoke run
    python bench/bench_train_vs_ultralytics.py --family yolo26 --variants cl auto   # YOLO26n, MuSGD on both sides

On a GPU (`--device cuda`; bench/gpu_check.sh calls it so): plugdet trains with `--variants amp` (fp16 autocast +
GradScaler, channels_last: configs/det/*_cub.yaml's setting) and Ultralytics with its default `amp=True`. Ultralytics'
own AMP self-check (`check_amp`) would download yolo26n.pt to compare fp32 and fp16 predictions; offline it is
replaced by its answer on a healthy GPU (True), so no download is tried. Where polars is missing (it is not carried
to the GPU machine), Ultralytics' `read_results_csv`, which only fills its checkpoints' "train_results" metadata,
returns {} as its own error path does. Evaluation runs on the same device in fp32.

    python bench/bench_train_vs_ultralytics.py --device cuda --img-size 640 --batch 64 --epochs 3 --seeds 0 \
        --data-root data/synth_4000 --val-images 500 --workers 8 --cache none --eval-backend faster --json out.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": "/tmp/plugdet-yolo-config",
               "MPLCONFIGDIR": "/tmp/plugdet-mpl-config", "PYTHONUNBUFFERED": "1"}  # fmt: skip
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

# plugdet variant -> train_det.py overrides (`auto`: plugdet's default precision, bf16 on a CPU with native bf16,
# fp16 AMP on CUDA, else fp32)
VARIANTS = {
    "fp32": ["train.precision=fp32", "train.channels_last=false"],
    "cl": ["train.precision=fp32", "train.channels_last=true"],
    "bf16": ["train.precision=bf16", "train.channels_last=true"],
    "amp": ["train.precision=fp16", "train.channels_last=true"],
    "auto": ["train.precision=auto", "train.channels_last=true"],
}
VARIANT_LABELS = {
    "fp32": "plugdet fp32 (NCHW)",
    "cl": "plugdet fp32 channels_last",
    "bf16": "plugdet bf16 + channels_last",
    "amp": "plugdet fp16 AMP + channels_last",
    "auto": "plugdet precision=auto + channels_last (default)",
}
DEFAULT_VARIANTS = {"cpu": ["fp32", "cl", "bf16"], "cuda": ["amp"]}
UL = "Ultralytics"  # the run label; `--family` says which model (yolov8n, yolo11n or yolo26n)
# --family -> plugdet model overrides of the same model as Ultralytics' <family>n.yaml
FAMILIES = {"yolov8": ["model.backbone=cspdarknet_n", "model.neck=yolov8", "model.head=yolov8"],
            "yolo11": ["model.backbone=csp11_n", "model.neck=yolo11", "model.head=yolo11"],
            "yolo26": ["model.backbone=csp26_n", "model.neck=yolo26", "model.head=yolo26"]}  # fmt: skip
DEFAULT_OPTIMIZER = {"yolov8": "sgd", "yolo11": "sgd", "yolo26": "musgd"}  # --optimizer when not given
UL_OPTIMIZERS = {"sgd": "SGD", "musgd": "MuSGD"}  # --optimizer -> Ultralytics' `optimizer=` name


# ----------------------------------------------------------------------------------------------------------------------
# The Ultralytics subprocess (`bench_train_vs_ultralytics.py _ultralytics SPEC.json`)
# ----------------------------------------------------------------------------------------------------------------------
def ultralytics_worker(spec_path: str) -> int:
    """Train Ultralytics' YOLOv8n / YOLO11n / YOLO26n as the spec says; epoch timings, threads, the optimizer it
    built, its own metrics -> spec["out"]."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import ultralytics.engine.trainer as ul_trainer
    import ultralytics.utils.torch_utils as ul_torch_utils
    from ultralytics import YOLO

    ul_torch_utils.NUM_THREADS = spec["threads"]  # what its select_device passes to torch.set_num_threads on CPU
    # Its AMP self-check downloads yolo26n.pt; offline, the answer it gives on a healthy GPU (see the docstring)
    ul_trainer.check_amp = lambda model: True
    try:  # polars (54 MB of wheel) is not carried to the GPU machine; Ultralytics reads results.csv with it only
        import polars  # noqa: F401  (for the "train_results" metadata of its checkpoints)
    except ImportError:  # what its own read_results_csv returns when that read fails
        ul_trainer.BaseTrainer.read_results_csv = lambda self: {}
    record: dict[str, Any] = {"epochs": [], "threads": [], "workers": None, "images": None, "own": {},
                              "optimizer": None}  # fmt: skip
    clock: dict[str, float] = {}

    def restore_workers(trainer: Any) -> None:  # runs after the trainer forced workers=0 on CPU
        trainer.args.workers = spec["workers"]

    def epoch_start(trainer: Any) -> None:
        record["threads"].append(torch.get_num_threads())
        record["optimizer"] = type(trainer.optimizer).__name__
        clock["start"] = time.perf_counter()

    def epoch_end(trainer: Any) -> None:
        record["epochs"].append(time.perf_counter() - clock["start"])
        record["images"] = len(trainer.train_loader.dataset)
        record["workers"] = trainer.train_loader.num_workers

    def train_end(trainer: Any) -> None:
        record["own"] = {k: float(v) for k, v in (trainer.metrics or {}).items() if isinstance(v, int | float)}

    model = YOLO(f"{spec['family']}n.yaml")
    for event, fn in (("on_pretrain_routine_start", restore_workers), ("on_train_epoch_start", epoch_start),
                      ("on_train_epoch_end", epoch_end), ("on_train_end", train_end)):  # fmt: skip
        model.add_callback(event, fn)
    model.train(data=spec["data"], imgsz=spec["imgsz"], batch=spec["batch"], epochs=spec["epochs"],
                device=spec["device"], workers=spec["workers"], seed=spec["seed"], optimizer=spec["optimizer"],
                cache="ram" if spec["cache"] else False, close_mosaic=spec["close_mosaic"], plots=False,
                amp=spec["amp"], val=False, project=spec["project"],
                name=spec["name"], exist_ok=True, verbose=False, pretrained=False)  # fmt: skip
    Path(spec["out"]).write_text(json.dumps(record))
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------------
def run_logged(cmd: list[str], threads: int, log: Path, timeout: float | None = None) -> float:
    """Run a subprocess offline with OMP_NUM_THREADS=threads, output to `log`; returns its wall seconds."""
    env = {**OFFLINE_ENV, **os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    with log.open("w") as handle:
        try:
            code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... ran past --run-timeout {timeout} s; log {log}") from None
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed with exit code {code}; log {log}:\n{tail}")
    return time.perf_counter() - start


def run_ultralytics(args: argparse.Namespace, data_yaml: Path, seed: int, work: Path) -> dict[str, Any]:
    """Ultralytics training run of one seed; returns img/s (median epoch), its last.pt and its own metrics."""
    project, name = work / "ultralytics", f"seed{seed}"
    shutil.rmtree(project / name, ignore_errors=True)
    spec = {"family": args.family, "data": str(data_yaml), "imgsz": args.img_size, "batch": args.batch,
            "epochs": args.epochs, "threads": args.threads, "workers": args.ul_workers, "seed": seed,
            "optimizer": args.ul_optimizer, "device": "0" if args.device == "cuda" else "cpu",
            "amp": args.device == "cuda", "cache": args.ul_cache == "ram",
            "close_mosaic": args.close_mosaic, "project": str(project.resolve()), "name": name,
            "out": str((work / f"ul_seed{seed}.json").resolve())}  # fmt: skip
    spec_path = work / f"ul_seed{seed}_spec.json"
    spec_path.write_text(json.dumps(spec))
    seconds = run_logged([sys.executable, str(Path(__file__).resolve()), "_ultralytics", str(spec_path)],
                         args.threads, work / "logs" / f"ul_seed{seed}.log", args.run_timeout)  # fmt: skip
    record = json.loads(Path(spec["out"]).read_text())
    rates = [record["images"] / t for t in record["epochs"]]
    own = record["own"]
    return {"img_s": statistics.median(rates), "weights": project / name / "weights" / "last.pt", "seconds": seconds,
            "threads": sorted(set(record["threads"])), "workers": record["workers"], "optimizer": record["optimizer"],
            "own_ap": own.get("metrics/mAP50-95(B)"), "own_ap50": own.get("metrics/mAP50(B)")}  # fmt: skip


def run_plugdet(args: argparse.Namespace, data_yaml: Path, seed: int, variant: str, work: Path) -> dict[str, Any]:
    """plugdet training run of one seed and variant; returns img/s (median epoch of results.csv) and its last.pt."""
    out = work / "plugdet" / f"seed{seed}-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = ["data.format=yolo", f"data.yaml={data_yaml}", f"data.img_size={args.img_size}",
                 f"train.batch_size={args.batch}", f"train.epochs={args.epochs}", "model.backbone_weights=null",
                 "model.scale=n", *FAMILIES[args.family], f"train.threads={args.threads}",
                 f"train.workers={args.workers}", f"train.close_mosaic={args.close_mosaic}",
                 f"train.device={args.device}", f"eval.interval={args.epochs}", f"eval.backend={args.eval_backend}",
                 f"seed={seed}", f"output_dir={out}", f"train.optimizer={args.optimizer}",
                 f"data.cache={args.cache == 'ram'}", *VARIANTS[variant]]  # fmt: skip
    seconds = run_logged([sys.executable, str(REPO / "tools" / "train_det.py"), *overrides], args.threads,
                         work / "logs" / f"plugdet_seed{seed}_{variant}.log", args.run_timeout)  # fmt: skip
    with (out / "results.csv").open() as handle:
        rates = [float(row["img_per_s"]) for row in csv.DictReader(handle)]
    return {"img_s": statistics.median(rates), "weights": out / "last.pt", "seconds": seconds,
            "threads": [args.threads], "workers": args.workers, "own_ap": None, "own_ap50": None,
            "optimizer": args.optimizer}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Data and evaluation (in this process)
# ----------------------------------------------------------------------------------------------------------------------
def write_val_subset(data_yaml: Path, count: int) -> Path:
    """A data yaml beside `data_yaml` whose val split is `count` of its val images, evenly spaced over the sorted
    list (so every species folder is represented), listed in `val_<count>.txt`; training images unchanged.

    Why: evaluation at conf 0.001 scores up to 300 boxes per image; on a GPU it, not training, is what a short run
    spends most of its time on, and a few hundred images give AP to the precision a 3-epoch run has anyway.
    """
    import yaml

    data = yaml.safe_load(data_yaml.read_text())
    root = Path(data["path"])
    images = sorted(p for p in (root / data["val"]).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if count >= len(images):
        return data_yaml
    step = len(images) / count
    chosen = [images[int(k * step)] for k in range(count)]  # [count] evenly spaced
    listing = root / f"val_{count}.txt"
    listing.write_text("".join(f"./{p.relative_to(root).as_posix()}\n" for p in chosen))
    subset = data_yaml.with_name(f"data_val{count}.yaml")
    subset.write_text(yaml.safe_dump({**data, "val": listing.name}, sort_keys=False))
    return subset.resolve()


def prepare_data(args: argparse.Namespace, work: Path) -> Path:
    """The CUB data (bird labels) exported to YOLO txt under `work/data` (or `--data-yaml` as it is); --quick first
    writes a tiny synthetic set; `--val-images N` then evaluates on N of the val images."""
    from detect.data.cub import CubDetection
    from detect.data.synth import make_synth_cub, synth_cub_exists
    from detect.data.yolo_txt import export_yolo

    if args.data_yaml:
        data_yaml = Path(args.data_yaml).resolve()
        if not data_yaml.is_file():
            raise SystemExit(f"error: --data-yaml {data_yaml} not found")
    else:
        root = Path(args.root)
        if args.quick:
            root = work / "synth_quick"
            if not synth_cub_exists(root):
                make_synth_cub(root, num_species=2, images_per_species=16, width_range=(160, 200),
                               height_range=(120, 160), overwrite=True)  # fmt: skip
        elif not root.exists():
            raise SystemExit(f"error: {root} not found; write it with `python tools/make_synth_cub.py`")
        out = work / "data"
        data_yaml = Path()
        for split, cub_split in (("train", "train"), ("val", "test")):
            data_yaml = export_yolo(CubDetection(root, cub_split, labels="bird"), out, split, overwrite=True)
        for cache in (out / "labels").glob("*.cache"):  # Ultralytics' label cache of an earlier export
            cache.unlink()
    return write_val_subset(data_yaml.resolve(), args.val_images) if args.val_images else data_yaml.resolve()


class Evaluator:
    """The one evaluation of every model: `detect.eval.evaluate.evaluate` on the val split of the exported data,
    on `--device`, in fp32.

    The val loader has no worker processes by default (`--eval-workers`): on CPU this process has run torch ops
    (OpenMP threads) before it would fork them, and evaluation time is not what this bench measures.
    """

    def __init__(self, args: argparse.Namespace, data_yaml: Path, work: Path) -> None:
        import torch

        from detect.config import DetConfig, load_config
        from detect.data.build import build_source
        from detect.data.coco import write_coco_json
        from detect.data.detection import DetectionDataset
        from detect.train.builders import build_det_loaders
        from detect.train.distributed import DistInfo

        torch.set_num_threads(args.threads)
        overrides = ["data.format=yolo", f"data.yaml={data_yaml}", f"data.img_size={args.img_size}",
                     f"train.batch_size={args.batch}", f"train.workers={args.eval_workers}"]  # fmt: skip
        cfg = load_config(DetConfig, None, overrides)
        self.source = build_source(cfg.data, "val")
        self.device, self.backend = torch.device(args.device), args.eval_backend
        dataset = DetectionDataset(self.source, args.img_size, False)
        info = DistInfo(rank=0, local_rank=0, world_size=1, device=self.device)
        _, _, self.loader = build_det_loaders(dataset, dataset, cfg, info)
        self.gt = write_coco_json(self.source, work / "val_gt.json")

    def __call__(self, run: str, weights: Path) -> tuple[float, float]:
        """(AP, AP50) of a plugdet last.pt, or of an Ultralytics last.pt when `run` is Ultralytics'."""
        from detect.checkpoints import load_detector
        from detect.eval.evaluate import evaluate, nan_to_zero
        from detect.interop.ultralytics import from_ultralytics
        from detect.precision import Precision

        model = from_ultralytics(weights) if run == UL else load_detector(weights)[0]
        precision = Precision(self.device)
        metrics, _, _ = evaluate(model.float().to(self.device).eval(), self.loader, self.gt,
                                 list(self.source.category_ids), precision, conf=0.001, iou=0.7, max_det=300,
                                 backend=self.backend)  # fmt: skip
        return nan_to_zero(metrics["AP"]), nan_to_zero(metrics["AP50"])


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def _spread(values: list[float], digits: int) -> str:
    """Mean ± sample standard deviation (just the mean for one value)."""
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def print_tables(results: dict[tuple[int, str], dict[str, Any]], seeds: list[int], runs: list[str]) -> None:
    """Per-seed rows and a mean ± sd summary per run, as markdown (ratios only when Ultralytics ran); a run that
    failed is one row saying so, and is left out of the summary."""

    def ratio(seed: int, run: str) -> float | None:
        ref = results.get((seed, UL))
        return results[(seed, run)]["img_s"] / ref["img_s"] if ref and "error" not in ref else None

    print("\n| seed | run | img/s (median epoch) | vs Ultralytics | AP | AP50 | UL own AP / AP50 | threads | workers "
          "| wall s |\n|---|---|---:|---:|---:|---:|---:|---|---:|---:|")  # fmt: skip
    for seed in seeds:
        for run in runs:
            r = results.get((seed, run), {"error": "not run"})
            if "error" in r:
                print(f"| {seed} | {run} | failed: {r['error'].splitlines()[0][:100]} | | | | | | | |")
                continue
            x = ratio(seed, run)
            own = "-" if r["own_ap"] is None else f"{r['own_ap']:.4f} / {r['own_ap50']:.4f}"
            print(f"| {seed} | {run} | {r['img_s']:.1f} | {'-' if x is None else f'{x:.2f}x'} | {r['ap']:.4f} | "
                  f"{r['ap50']:.4f} | {own} | {','.join(map(str, r['threads']))} | {r['workers']} | "
                  f"{r['seconds']:.0f} |")  # fmt: skip
    print(f"\nover seeds {' '.join(map(str, seeds))} (mean ± sd):\n\n| run | img/s | vs Ultralytics | AP | AP50 |")
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        done = [seed for seed in seeds if "error" not in results.get((seed, run), {"error": "not run"})]
        if not done:
            continue
        rows = [results[(seed, run)] for seed in done]
        ratios = [ratio(seed, run) for seed in done]
        shown = "-" if None in ratios else f"{_spread(ratios, 2)}x"
        print(f"| {run} | {_spread([r['img_s'] for r in rows], 1)} | {shown} | "
              f"{_spread([r['ap'] for r in rows], 4)} | {_spread([r['ap50'] for r in rows], 4)} |")  # fmt: skip


def write_json(results: dict[tuple[int, str], dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """The results so far as JSON (one record per seed and run; a failed run has "error"), rewritten after each
    run, so a bench stopped by a timeout still leaves the runs it finished."""
    import torch

    rows = [{"seed": seed, "run": run, **{k: str(v) if isinstance(v, Path) else v for k, v in r.items()}}
            for (seed, run), r in results.items()]  # fmt: skip
    setting = {"family": args.family, "optimizer": args.optimizer, "ul_optimizer": args.ul_optimizer,
               "device": args.device, "img_size": args.img_size, "batch": args.batch,
               "epochs": args.epochs, "workers": args.workers, "ul_workers": args.ul_workers, "cache": args.cache,
               "ul_cache": args.ul_cache, "val_images": args.val_images, "eval_backend": args.eval_backend,
               "torch": torch.__version__}  # fmt: skip
    path.write_text(json.dumps({"setting": setting, "runs": rows}, indent=1))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_train_vs_ultralytics.py", description=__doc__.splitlines()[0])
    parser.add_argument("--root", "--data-root", dest="root", default="data/synth_cub",
                        help="CUB data (folder holding CUB_200_2011), exported to YOLO txt under --work")  # fmt: skip
    parser.add_argument("--data-yaml", default=None, help="an existing YOLO txt export to train on (no export)")
    parser.add_argument("--work", default="runs/bench/train_vs_ultralytics", help="exports, runs and logs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--close-mosaic", type=int, default=None, help="last epochs without Mosaic (default E // 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides train")
    parser.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                        help="plugdet variants (default: fp32 cl bf16 on CPU, amp on CUDA)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    parser.add_argument("--workers", type=int, default=2, help="plugdet loader workers")
    parser.add_argument("--ul-workers", type=int, default=None, help="Ultralytics loader workers (default --workers; "
                        "0 = what its trainer forces on CPU)")  # fmt: skip
    parser.add_argument("--cache", choices=("none", "ram"), default="ram", help="plugdet images: decoded from disk "
                        "every time, or once into RAM (data.cache=true, as configs/det/default.yaml)")  # fmt: skip
    parser.add_argument("--ul-cache", choices=("none", "ram"), default=None, help="Ultralytics images (default "
                        "--cache; none = its default cache=False, ram = cache='ram')")  # fmt: skip
    parser.add_argument("--optimizer", choices=list(UL_OPTIMIZERS), default=None, help="both sides' optimizer "
                        "(default: musgd for yolo26, sgd for yolov8 and yolo11)")  # fmt: skip
    parser.add_argument("--ul-optimizer", default=None, help="Ultralytics optimizer apart (default: --optimizer's "
                        "name, SGD or MuSGD; auto = its own default)")  # fmt: skip
    parser.add_argument("--no-ultralytics", action="store_true", help="plugdet runs only (no ratio column)")
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before a training run is stopped")
    parser.add_argument("--family", choices=list(FAMILIES), default="yolov8", help="the model both sides train (n)")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--val-images", type=int, default=0, help="evaluate on this many val images (0: all)")
    parser.add_argument("--eval-backend", choices=("pycocotools", "faster"), default="pycocotools",
                        help="COCO evaluation of every model (faster-coco-eval gives the same 12 numbers)")  # fmt: skip
    parser.add_argument("--eval-workers", type=int, default=0, help="loader workers of this process's evaluation")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (after each run)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch on 16 tiny images, seed 0, batch 8")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.batch, args.work = 1, [0], 8, args.work + "-quick"
    args.variants = DEFAULT_VARIANTS[args.device] if args.variants is None else args.variants
    args.optimizer = args.optimizer or DEFAULT_OPTIMIZER[args.family]
    args.ul_optimizer = args.ul_optimizer or UL_OPTIMIZERS[args.optimizer]
    args.close_mosaic = args.epochs // 3 if args.close_mosaic is None else args.close_mosaic
    args.ul_workers = args.workers if args.ul_workers is None else args.ul_workers
    args.ul_cache = args.cache if args.ul_cache is None else args.ul_cache
    return args


def run_all(
    args: argparse.Namespace, data_yaml: Path, work: Path, runs: list[str], evaluator: Evaluator
) -> dict[tuple[int, str], dict[str, Any]]:
    """Every (seed, run) in order, each trained in a subprocess then evaluated here; a run that fails or runs past
    --run-timeout is recorded with its error (its log's tail) and the next one goes on."""
    results: dict[tuple[int, str], dict[str, Any]] = {}
    for seed in args.seeds:
        for run in runs:
            try:
                if run == UL:
                    result = run_ultralytics(args, data_yaml, seed, work)
                else:
                    variant = next(k for k, label in VARIANT_LABELS.items() if label == run)
                    result = run_plugdet(args, data_yaml, seed, variant, work)
                result["ap"], result["ap50"] = evaluator(run, result["weights"])
            except Exception as err:  # the run failed, or its files or its evaluation did: recorded, the next goes on
                print(f"error: seed {seed} {run}: {err}", file=sys.stderr, flush=True)
                results[(seed, run)] = {"error": str(err)}
            else:
                results[(seed, run)] = result
                print(f"seed {seed} {run}: {result['img_s']:.1f} img/s, AP {result['ap']:.4f}, AP50 "
                      f"{result['ap50']:.4f} ({result['seconds']:.0f} s)", flush=True)  # fmt: skip
            if args.json:
                write_json(results, args, Path(args.json))
    return results


def main(argv: list[str]) -> int:
    if argv[:1] == ["_ultralytics"]:
        return ultralytics_worker(argv[1])
    args = parse_args(argv)
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    data_yaml = prepare_data(args, work)
    runs = ([] if args.no_ultralytics else [UL]) + [VARIANT_LABELS[v] for v in args.variants]
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if args.device == "cuda" and torch.cuda.is_available() else ""
    print(f"train vs Ultralytics: {args.family}n, optimizer plugdet {args.optimizer} / Ultralytics "
          f"{args.ul_optimizer}, data {data_yaml}, {args.epochs} epochs "
          f"(close_mosaic {args.close_mosaic}), "
          f"{args.img_size} px, batch {args.batch}, on {args.device}{gpu}, {args.threads} threads, workers plugdet "
          f"{args.workers} / Ultralytics {args.ul_workers}, image cache plugdet {args.cache} / Ultralytics "
          f"{args.ul_cache}, seeds {args.seeds}; logs in {work / 'logs'}; torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}",
          flush=True)  # fmt: skip
    evaluator = Evaluator(args, data_yaml, work)
    results = run_all(args, data_yaml, work, runs, evaluator)
    print_tables(results, args.seeds, runs)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
