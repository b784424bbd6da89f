"""Where a short detection run's seconds go: the phase breakdown of one `tools/train_det.py` process (issue 20).

The short run of issue 20 (bench/RESULTS.md "Whole process vs Ultralytics on a short run"): 240 train images of the
synthetic mini-CUB (bird labels) exported to YOLO txt, yolov8n from scratch, 256 px, batch 16, 3 epochs, 2 torch
threads, 2 loader workers, images cached in RAM, Mosaic on (closed for the last epoch), fp32 channels_last,
validation only after the last epoch. It runs `--runs` times, one after the other, with `PLUGDET_PHASES=1`: the run
prints a `plugdet-phase <unix time> <name>` line at each phase boundary (`detect.train.lifecycle.phase`), and this
script subtracts them from its own launch time and from the moment the process has exited. Reported: the median of
each phase over the runs (and min / max), with what else ran on the machine (load average, busiest processes).

Phases: interpreter + imports (launch -> `train_detector`), config, data scan (sources, image check), model build,
run folder + val_gt.json, loaders (+ the RAM cache), model info (the GFLOPs probe), each epoch (loader start = epoch
start -> first batch, then training), the final evaluation, results row + curves.png, best.pt + pictures, analysis
pictures, last.pt, the end of the run (`done:` line) and the process's exit (workers, threads, interpreter).
`--importtime` also runs `python -X importtime tools/train_det.py ... --print-config` (the tool's imports alone) and
prints the modules that cost most.

Data: `--root` (default data/synth_240) is written by `make_synth_cub(root, 20 species, 24 images each)` when absent
(240 train / 240 test images), then exported like bench_train_vs_ultralytics.py does.

    python bench/bench_phases.py                           # 3 runs, the short run above
    python bench/bench_phases.py --runs 5 --importtime --json runs/bench/phases/after.json
    python bench/bench_phases.py --quick                   # 1 run of 1 epoch on 16 tiny images: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_vs_ultralytics import FAMILIES, OFFLINE_ENV, REPO, prepare_data  # noqa: E402

SETUP = ("imports", "config", "data scan", "model build", "run folder + val_gt.json", "loaders (+ RAM cache)",
         "model info")  # fmt: skip
LABELS = {"imports": "interpreter + imports"}
MARK = re.compile(r"plugdet-phase (\d+\.\d+) (.+)$")  # tqdm may precede it on its line


def fp32_overrides() -> list[str]:
    """fp32 channels_last in whichever keys this checkout's schema has (`train.precision`, or the older
    `train.amp` / `train.bf16`)."""
    import dataclasses

    from detect.config.schema import DetTrainConfig

    names = {f.name for f in dataclasses.fields(DetTrainConfig)}
    precision = ["train.precision=fp32"] if "precision" in names else ["train.amp=false", "train.bf16=false"]
    return [*precision, "train.channels_last=true"]


def busy_processes(limit: int = 5) -> list[str]:
    """The busiest other processes now (ps: %CPU since their start), so a figure says what ran beside it."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    mine = {str(os.getpid())}
    rows = [" ".join(line.split()[:3]) + " " + " ".join(line.split()[3:])[:90] for line in out
            if line.split() and line.split()[0] not in mine and "ps -eo" not in line]  # fmt: skip
    return rows[:limit]


def run_once(args: argparse.Namespace, data_yaml: Path, index: int, work: Path) -> dict[str, Any]:
    """One training process; returns {phase: seconds} in order, with the total wall time and the load around it."""
    out = work / "runs" / f"run{index}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    overrides = ["data.format=yolo", f"data.yaml={data_yaml}", f"data.img_size={args.img_size}",
                 f"train.batch_size={args.batch}", f"train.epochs={args.epochs}", "model.backbone_weights=null",
                 "model.scale=n", *FAMILIES["yolov8"], f"train.threads={args.threads}",
                 f"train.workers={args.workers}", f"train.close_mosaic={args.epochs // 3}", "train.device=cpu",
                 f"eval.interval={args.epochs}", f"seed={args.seed}", f"output_dir={out}", "data.cache=true",
                 *fp32_overrides()]  # fmt: skip
    env = {**OFFLINE_ENV, **os.environ, "OMP_NUM_THREADS": str(args.threads), "PLUGDET_PHASES": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    log = work / "logs" / f"run{index}.log"
    load_before = os.getloadavg()[0]
    launch = time.time()
    with log.open("w") as handle:
        code = subprocess.call([sys.executable, str(REPO / "tools" / "train_det.py"), *overrides], stdout=handle,
                               stderr=subprocess.STDOUT, env=env, cwd=REPO)  # fmt: skip
    end = time.time()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"error: run {index} failed with exit code {code}; log {log}:\n{tail}")
    marks = [(float(m[1]), m[2]) for m in map(MARK.search, log.read_text(errors="replace").splitlines()) if m]
    phases: dict[str, float] = {}
    previous = launch
    for stamp, name in marks:
        if name.endswith(" start"):  # an epoch's start: the time before it is the previous epoch's end of run
            phases[f"{name.removesuffix(' start')} (between epochs)"] = stamp - previous
        elif name.endswith(" first batch"):
            phases[f"{name.removesuffix(' first batch')} loader start"] = stamp - previous
        else:
            phases[LABELS.get(name, name)] = stamp - previous
        previous = stamp
    phases["process exit"] = end - previous
    return {"phases": phases, "total": end - launch, "load": (load_before, os.getloadavg()[0]), "log": str(log)}


def import_times(args: argparse.Namespace, data_yaml: Path, work: Path, top: int = 15) -> list[tuple[str, int, int]]:
    """`python -X importtime tools/train_det.py ... --print-config`: (module, self us, cumulative us) of the modules
    with the largest cumulative time that are not inside another listed one's tree, and the total."""
    env = {**OFFLINE_ENV, **os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-X", "importtime", str(REPO / "tools" / "train_det.py"), "data.format=yolo",
           f"data.yaml={data_yaml}", "model.backbone_weights=null", "--print-config"]  # fmt: skip
    err = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO).stderr
    rows = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((m[4], int(m[1]), int(m[2]), len(m[3])))
    total = sum(r[1] for r in rows)
    wanted = ("torch", "torchvision", "torchvision.ops", "torch._dynamo", "matplotlib", "matplotlib.pyplot",
              "pycocotools", "cv2", "albumentations", "omegaconf", "scipy", "numpy", "tqdm", "PIL", "yaml",
              "transformers", "timm", "detect.eval.evaluate", "detect.eval.viz", "detect.eval.analysis",
              "detect.train.detection", "detect.models.info", "torch.utils.flop_counter",
              "torch.utils.tensorboard", "tensorboard")  # fmt: skip
    picked: dict[str, tuple[str, int, int]] = {}
    for name, own, cum, _ in rows:  # a module imported twice (a submodule's parent first) keeps its larger entry
        if name in wanted and cum > picked.get(name, ("", 0, -1))[2]:
            picked[name] = (name, own, cum)
    ordered = sorted(picked.values(), key=lambda r: -r[2])
    return [*ordered[:top], ("(all imports, self time summed)", total, total)]


def summarise(results: list[dict[str, Any]]) -> list[tuple[str, float, float, float]]:
    """(phase, median, min, max) in the order the phases happened (phases missing from a run count as 0)."""
    order: list[str] = []
    for r in results:
        order += [name for name in r["phases"] if name not in order]
    rows = []
    for name in order:
        values = [r["phases"].get(name, 0.0) for r in results]
        rows.append((name, statistics.median(values), min(values), max(values)))
    totals = [r["total"] for r in results]
    rows.append(("whole process", statistics.median(totals), min(totals), max(totals)))
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_phases.py", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synth_240", help="CUB data (written when absent: 240 + 240 images)")
    parser.add_argument("--work", default="runs/bench/phases", help="export, runs and logs")
    parser.add_argument("--runs", type=int, default=3, help="training processes (the table is their median)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--importtime", action="store_true", help="also list the costliest imports (-X importtime)")
    parser.add_argument("--json", default=None, help="also write every run's phases to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 run of 1 epoch on 16 tiny images")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.epochs, args.batch, args.work = 1, 1, 8, args.work + "-quick"
    args.data_yaml, args.val_images = None, 0  # what bench_train_vs_ultralytics.prepare_data reads
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if not args.quick and not Path(args.root).exists():
        from detect.data.synth import make_synth_cub

        print(f"writing {args.root}: 20 species x 24 images (240 train / 240 test)", flush=True)
        make_synth_cub(args.root, num_species=20, images_per_species=24)
    data_yaml = prepare_data(args, work)
    import torch

    cpu = (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
           f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, {os.cpu_count()} cores")  # fmt: skip
    print(f"phases of tools/train_det.py: {args.epochs} epochs, {args.img_size} px, batch {args.batch}, "
          f"{args.threads} threads, {args.workers} workers, data {data_yaml}; {cpu}", flush=True)  # fmt: skip
    print("beside it at the start (pid %cpu elapsed command):\n  " + "\n  ".join(busy_processes()), flush=True)
    results = []
    for index in range(args.runs):
        result = run_once(args, data_yaml, index, work)
        results.append(result)
        print(f"run {index}: {result['total']:.1f} s, load average {result['load'][0]:.2f} -> "
              f"{result['load'][1]:.2f}", flush=True)  # fmt: skip
    rows = summarise(results)
    print(f"\n| phase | median s | min | max |  (over {len(results)} runs)\n|---|---:|---:|---:|")
    for name, median, low, high in rows:
        print(f"| {name} | {median:.2f} | {low:.2f} | {high:.2f} |")
    imports = import_times(args, data_yaml, work) if args.importtime else []
    if imports:
        print("\n| module (-X importtime, --print-config) | self ms | cumulative ms |\n|---|---:|---:|")
        for name, own, cum in imports:
            print(f"| {name} | {own / 1000:.0f} | {cum / 1000:.0f} |")
    print("beside it at the end:\n  " + "\n  ".join(busy_processes()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "runs": results, "median": rows, "imports": imports},
                                              indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
