"""val_det's batches in every runtime: `python bench/bench_val_runtimes.py --weights W [--runs 3]`.

Exports the checkpoint W with the defaults a user gets (`Model.export()`: dynamic ONNX; `format="openvino"`: FP32;
`int8=True`: nncf INT8 calibrated on the checkpoint's validation images), then validates the .pt and each export on
the checkpoint's own validation split as `tools/val_det.py` does (`Model.val`: rect batches of 2 x train.batch_size,
letterbox, conf 0.001, IoU 0.7, max_det 300, pycocotools), the rows interleaved `--runs` times after one warm-up
round. Reported per runtime: val_det's own `time_per_image_ms` (the inference loop: loader, forward, postprocess; COCO
scoring excluded), median over the runs, its ratio to the .pt's, and AP / AP50 (equal between runs: evaluation is
deterministic). The .pt runs in fp32 unless `--pt-precision` says otherwise. Prints the CPU first. Needs
`.[openvino]` for the OpenVINO rows (left out with a line when missing).

    python bench/bench_val_runtimes.py --weights runs/det/default/best.pt --runs 3
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
from pathlib import Path

import torch

from detect.api import load
from detect.precision import cpu_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a detection checkpoint (.pt) whose data set is on disk")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pt-precision", default="fp32", choices=("fp32", "bf16", "auto"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"val_det runtimes: {args.weights}, {args.threads} threads; {cpu_report()}")
    work = Path(tempfile.mkdtemp(prefix="bench_val_runtimes-"))
    model = load(args.weights, device="cpu")
    rows: dict[str, str] = {f"torch {args.pt_precision} (.pt)": str(args.weights)}
    rows["onnxruntime (default export)"] = str(model.export(out=work / "model.onnx"))
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"):
        rows["OpenVINO FP32"] = str(model.export("openvino", out=work / "ov_fp32"))
        rows["OpenVINO INT8 (nncf)"] = str(model.export("openvino", out=work / "ov_int8", int8=True))
    else:
        print("OpenVINO rows left out: pip install -e '.[openvino]'")
    times: dict[str, list[float]] = {name: [] for name in rows}
    scores: dict[str, tuple[float, float]] = {}
    for run in range(-1, args.runs):  # run -1: a warm-up round, not counted
        for row, (name, path) in enumerate(rows.items()):
            runner = load(path, device="cpu")
            precision = args.pt_precision if path.endswith(".pt") else None
            metrics = runner.val(out=work / f"val{run + 1}-row{row}", verbose=False, precision=precision)
            if run < 0:
                continue
            times[name].append(metrics["time_per_image_ms"])
            scores[name] = (metrics["AP"], metrics["AP50"])
            print(f"run {run + 1}: {name}: {metrics['time_per_image_ms']:.1f} ms/image, AP {metrics['AP']:.4f}")
    base = statistics.median(next(iter(times.values())))
    print("\n| runtime | ms / image (median) | vs the .pt | AP | AP50 |\n|---|---:|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / base:.2f}x | {scores[name][0]:.4f} | {scores[name][1]:.4f} |")
    print(f"\nexports and val folders in {work}")


if __name__ == "__main__":
    main()
