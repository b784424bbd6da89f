"""The Python side of `bench/gpu_check.sh`: environment report, data export, and the figures it collects.

The shell script runs every stage under `timeout` and calls this file between stages; each call appends records to
`<work>/records.jsonl` and rewrites `$OUT/summary.md`, so the summary exists (partial) after every stage, whatever
comes next. Only `env` and `export` import torch or plugdet: the collecting and `summary` subcommands read files
with the standard library alone, so a broken environment still gets its summary written.

    python bench/gpu_check.py env                         # versions, GPU, CPUs -> records (printed too)
    python bench/gpu_check.py export ROOT OUT --val-images N
    python bench/gpu_check.py stage NAME STATUS SECONDS COMMAND
    python bench/gpu_check.py tests LOG CMD [--stage S]   # pytest outcome counts and MEASURED lines
    python bench/gpu_check.py bench JSON COMMAND          # bench_train_vs_ultralytics.py --json
    python bench/gpu_check.py loader JSON COMMAND         # bench_loader.py --json
    python bench/gpu_check.py family NAME RUN_DIR SECONDS COMMAND
    python bench/gpu_check.py data ROOT LOG COMMAND
    python bench/gpu_check.py summary [--print]           # $OUT/summary.md (--print: figures on stdout)
Records live in $GPU_CHECK_WORK (default /tmp/gpu_check); the summary goes to $OUT (default /tmp/gpu_check_out).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"))
OUT = Path(os.environ.get("OUT") or "/tmp/gpu_check_out")
RECORDS = WORK / "records.jsonl"


def record(kind: str, **fields: Any) -> None:
    """Append one record ({"kind": "env" | "stage" | "figure" | "measured", ...}) to records.jsonl."""
    WORK.mkdir(parents=True, exist_ok=True)
    with RECORDS.open("a") as handle:
        handle.write(json.dumps({"kind": kind, **fields}) + "\n")


def figure(stage: str, item: str, name: str, value: Any, command: str, unit: str = "") -> None:
    record("figure", stage=stage, item=item, figure=name, value=value, unit=unit, command=command)


def read_records() -> list[dict[str, Any]]:
    if not RECORDS.is_file():
        return []
    rows = []
    for line in RECORDS.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the others still count
            continue
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Subcommands that import torch / plugdet
# ----------------------------------------------------------------------------------------------------------------------
def cmd_env(args: argparse.Namespace) -> int:
    """Versions of python, torch, torchvision and the carried packages; the GPU; CPUs. Printed and recorded."""
    import importlib
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch
        import torchvision

        info.update(torch=torch.__version__, torchvision=torchvision.__version__, cuda=torch.version.cuda,
                    cuda_available=torch.cuda.is_available(),
                    cpu_capability=torch.backends.cpu.get_cpu_capability())  # fmt: skip
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        sms=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                        bf16=torch.cuda.is_bf16_supported())  # fmt: skip
            with contextlib.suppress(Exception):  # a build without NCCL: the tests say so
                info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as err:  # the report still says what broke
        info["torch_error"] = f"{type(err).__name__}: {err}"
    packages = {}
    for name in ("numpy", "cv2", "omegaconf", "albumentations", "albucore", "pydantic", "pycocotools", "ultralytics",
                 "faster_coco_eval", "onnx", "onnxruntime", "timm", "typing_extensions"):  # fmt: skip
        try:
            module = importlib.import_module(name)
            where = "carried" if "/tmp/site" in str(getattr(module, "__file__", "")) else "machine"
            packages[name] = f"{getattr(module, '__version__', '?')} ({where})"
        except Exception as err:
            packages[name] = f"MISSING: {type(err).__name__}: {str(err)[:120]}"
    info["packages"] = packages
    modules, failed = _import_plugdet()
    info["plugdet_modules"] = f"{modules - len(failed)}/{modules} import"
    if failed:
        info["plugdet_import_errors"] = failed
    record("env", **info)
    print(json.dumps(info, indent=1))
    return 0 if "torch_error" not in info and not failed else 1


def _import_plugdet() -> tuple[int, dict[str, str]]:
    """Import every module of backbones/ and detect/ (finds an API this torch lacks at import time)."""
    import importlib

    repo = Path(__file__).resolve().parents[1]
    names = sorted(".".join(p.relative_to(repo).with_suffix("").parts) for package in ("backbones", "detect")
                   for p in (repo / package).rglob("*.py"))  # fmt: skip
    names = [n.removesuffix(".__init__") for n in names]
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:
            failed[name] = f"{type(err).__name__}: {str(err)[:200]}"
    return len(names), failed


def cmd_export(args: argparse.Namespace) -> int:
    """The CUB data (bird labels) as YOLO txt under OUT (train -> images/train, test -> images/val), and a yaml whose
    val split is --val-images of them (`bench_train_vs_ultralytics.write_val_subset`); prints that yaml's path."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train_vs_ultralytics import write_val_subset

    from detect.data.cub import CubDetection
    from detect.data.yolo_txt import export_yolo

    start = time.perf_counter()
    out, data_yaml = Path(args.out), Path()
    for split, cub_split in (("train", "train"), ("val", "test")):
        data_yaml = export_yolo(CubDetection(args.root, cub_split, labels="bird"), out, split, overwrite=True)
    chosen = write_val_subset(data_yaml.resolve(), args.val_images) if args.val_images else data_yaml.resolve()
    print(f"exported {args.root} to {out} in {time.perf_counter() - start:.1f} s; data yaml {chosen}")
    print(chosen)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Collecting (standard library only)
# ----------------------------------------------------------------------------------------------------------------------
def cmd_stage(args: argparse.Namespace) -> int:
    record("stage", stage=args.name, status=args.status, seconds=float(args.seconds), command=args.command)
    return 0


def cmd_tests(args: argparse.Namespace) -> int:
    """pytest's final counts ("5 passed, 1 failed in 12.3s") and every `MEASURED name k=v ...` line of the log."""
    text = Path(args.log).read_text(errors="replace") if Path(args.log).is_file() else ""
    start = text.rfind(f"] {args.stage} (timeout")  # this stage's part of a log that several stages share:
    if start < 0:
        figure(args.stage, "pytest", "outcome", "not run", args.command)
        return 0
    end = text.find(f"] {args.stage}: ", start)  # from its start line to its status line
    text = text[start : end if end >= 0 else len(text)]
    finals = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s", text, flags=re.M)
    counts = finals[-1] if finals else "no pytest summary line (crashed or stopped)"
    figure(args.stage, "pytest", "outcome", counts, args.command)
    for name, rest in re.findall(r"^MEASURED (\S+) (.*)$", text, flags=re.M):
        record("measured", stage=args.stage, name=name, values=rest.strip())
    for line in re.findall(r"^(?:FAILED|ERROR) .*$", text, flags=re.M):
        record("measured", stage=args.stage, name="failure", values=line[:300])
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Each run of bench_train_vs_ultralytics.py's JSON: training img/s, AP, AP50, wall seconds (or its error)."""
    data = json.loads(Path(args.json).read_text())
    setting = data["setting"]
    where = f"{setting['img_size']} px, batch {setting['batch']}, {setting['epochs']} epochs"
    for run in data["runs"]:
        item = f"{run['run']} (seed {run['seed']}, {where})"
        if "error" in run:
            figure("train_vs_ultralytics", item, "error", run["error"].splitlines()[0][:200], args.command)
            continue
        figure("train_vs_ultralytics", item, "train img/s (median epoch)", round(run["img_s"], 1), args.command)
        figure("train_vs_ultralytics", item, "AP (same evaluator)", round(run["ap"], 4), args.command)
        figure("train_vs_ultralytics", item, "AP50 (same evaluator)", round(run["ap50"], 4), args.command)
        figure("train_vs_ultralytics", item, "wall s (run)", round(run["seconds"], 1), args.command)
    rates = {run["run"]: run["img_s"] for run in data["runs"] if "error" not in run}
    ul = rates.pop("Ultralytics", None)
    for run, rate in rates.items():
        if ul:
            figure("train_vs_ultralytics", run, "img/s vs Ultralytics", f"{rate / ul:.2f}x", args.command)
    return 0


def cmd_loader(args: argparse.Namespace) -> int:
    data = json.loads(Path(args.json).read_text())
    s = data["setting"]
    for row in data["rows"]:
        item = (
            f"{row['images']}, {row['workers']} workers, {s['img_size']} px, batch {s['batch']}, pin {s['pin_memory']}"
        )
        figure("loader", item, "loader img/s", round(row["img_s"], 1), args.command)
    return 0


def cmd_family(args: argparse.Namespace) -> int:
    """A train_det run's results.csv (last row): training img/s, val AP / AP50, epoch seconds; the process's wall."""
    figure("families", args.name, "wall s (process)", round(float(args.seconds), 1), args.command)
    runs = sorted(Path(args.run_dir).parent.glob(Path(args.run_dir).name + "*/results.csv"))
    if not runs:
        figure("families", args.name, "results.csv", "absent (the run failed; see families.log)", args.command)
        return 0
    with runs[-1].open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        figure("families", args.name, "results.csv", "empty", args.command)
        return 0
    last = rows[-1]
    figure("families", args.name, "train img/s", round(float(last["img_per_s"]), 1), args.command)
    for key in ("val/AP", "val/AP50"):
        if last.get(key):
            figure("families", args.name, key, round(float(last[key]), 4), args.command)
    figure("families", args.name, "epoch s (train + eval)", round(float(last["time_s"]), 1), args.command)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Images written, and the generator's own time per image (its "wrote N images ... in S s" line: no start-up)."""
    root = Path(args.root) / "CUB_200_2011"
    images = len((root / "images.txt").read_text().splitlines()) if (root / "images.txt").is_file() else 0
    figure("data", str(args.root), "images generated", images, args.command)
    log = Path(args.log).read_text(errors="replace") if Path(args.log).is_file() else ""
    wrote = re.findall(r"wrote (\d+) images .* in ([\d.]+) s", log)
    if wrote:
        count, seconds = int(wrote[-1][0]), float(wrote[-1][1])
        figure("data", str(args.root), "generation s (one process)", seconds, args.command)
        figure("data", str(args.root), "generation ms / image", round(1000 * seconds / count, 2), args.command)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def cmd_summary(args: argparse.Namespace) -> int:
    """$OUT/summary.md from the records so far: header (GPU, torch, CPUs), stages, figures, measurements."""
    rows = read_records()
    env = next((r for r in reversed(rows) if r["kind"] == "env"), {})
    gpu, torch_version = env.get("gpu", "no GPU seen"), env.get("torch", "?")
    lines = [f"# plugdet GPU check: {gpu}, torch {torch_version}", "",
             f"Command: `{os.environ.get('GPU_CHECK_COMMAND', 'bench/gpu_check.sh')}`; mode "
             f"{os.environ.get('GPU_CHECK_MODE', '?')}; written {time.strftime('%Y-%m-%d %H:%M:%S')} after "
             f"{time.time() - float(os.environ.get('GPU_CHECK_START', time.time())):.0f} s.", ""]  # fmt: skip
    if env:
        keys = ("python", "torch", "torchvision", "cuda", "cudnn", "nccl", "gpu", "gpu_memory_gib", "sms", "cpus",
                "cpu_capability", "plugdet_modules", "torch_error")  # fmt: skip
        lines += ["| " + " | ".join(k for k in keys if k in env) + " |",
                  "|" + "---|" * sum(k in env for k in keys),
                  "| " + " | ".join(_cell(env[k]) for k in keys if k in env) + " |", ""]  # fmt: skip
        lines.append("Packages: " + "; ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()))
        for name, error in env.get("plugdet_import_errors", {}).items():
            lines.append(f"- import {name}: {_cell(error)}")
        lines.append("")
    lines += ["## Stages", "", "| stage | status | seconds | command |", "|---|---|---:|---|"]
    for r in rows:
        if r["kind"] == "stage":
            lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} | `{_cell(r['command'])}` |")
    lines += ["", "## Figures", "", "| stage | item | figure | value | GPU | torch | command |",
              "|---|---|---|---:|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["kind"] == "figure":
            lines.append(f"| {r['stage']} | {_cell(r['item'])} | {r['figure']} | {_cell(r['value'])} | {gpu} | "
                         f"{torch_version} | `{_cell(r['command'])}` |")  # fmt: skip
    measured = [r for r in rows if r["kind"] == "measured"]
    if measured:
        lines += ["", "## Test measurements (tests/test_cuda.py MEASURED lines, failures)", ""]
        lines += [f"- {r['stage']}: {r['name']} {_cell(r['values'])}" for r in measured]
    OUT.mkdir(parents=True, exist_ok=True)
    partial = OUT / ".summary.md.partial"
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, OUT / "summary.md")
    if args.print:  # the figures without their commands: what a 12,000-character output tail can hold
        print(lines[0])
        for r in rows:
            if r["kind"] == "stage":
                print(f"stage {r['stage']}: {r['status']} ({r['seconds']:.0f} s)")
            elif r["kind"] == "figure":
                print(f"{r['stage']} | {r['item']} | {r['figure']} | {r['value']}")
            elif r["kind"] == "measured":
                print(f"{r['stage']} | {r['name']} {r['values']}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    p = sub.add_parser("export")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--val-images", type=int, default=0)
    p = sub.add_parser("stage")
    for name in ("name", "status", "seconds", "command"):
        p.add_argument(name)
    p = sub.add_parser("tests")
    p.add_argument("log")
    p.add_argument("command")
    p.add_argument("--stage", default="tests", help="the stage whose part of the log to read")
    for name in ("bench", "loader"):
        p = sub.add_parser(name)
        p.add_argument("json")
        p.add_argument("command")
    p = sub.add_parser("family")
    for name in ("name", "run_dir", "seconds", "command"):
        p.add_argument(name)
    p = sub.add_parser("data")
    for name in ("root", "log", "command"):
        p.add_argument(name)
    p = sub.add_parser("summary")
    p.add_argument("--print", action="store_true", help="also print the figures, without their commands")
    args = parser.parse_args(argv)
    handler = globals()[f"cmd_{args.cmd}"]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
