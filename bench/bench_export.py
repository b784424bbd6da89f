"""Latency of exported and eager YOLOv8n, side by side with Ultralytics: `python bench/bench_export.py [--runs 10]`.

Rows: plugdet torch fp32 (unfused NCHW), plugdet fused + channels_last (what predict runs), onnxruntime on the
dynamic ONNX export, Ultralytics' own torch model (fused), and Ultralytics' ONNX export when it runs offline. Input
sizes 256 and 640 (square), batch 1 and 8; the model forward only (no letterbox, no NMS); median of `--runs`
interleaved runs after warm-up. Weights: random (latency does not depend on them). Prints the CPU first.

`--predict` instead times end to end through `load(...).predict` (letterbox, inference, NMS, letterbox undo; the
image already decoded) at 640, batch 1, on Ultralytics' bus.jpg (810x1080 -> a 640x480 canvas), for an imported
third-party YOLOv8n (Ultralytics' yolov8n.yaml, seeded random weights, through tools/import_ultralytics.py): torch
fp32 and bf16, onnxruntime, OpenVINO FP32 (f32 hint), OpenVINO at bf16 (its own default on a CPU with native bf16),
OpenVINO INT8 (nncf, calibrated on bus.jpg and zidane.jpg) at the f32 and bf16 hints, then Ultralytics' own
predictor on the same weights (`YOLO(path).predict`): its torch model and its own OpenVINO FP32 and INT8 exports (its
defaults; INT8 calibrated on the same two photos through a local data yaml); median of `--runs` (20) runs after 3
warm-ups, one row after the other. Needs `.[openvino]`.

`--families yolo26 yolo11 yolov8` instead compares families in one run (issue 18): per family (scale `--scale`, 80
classes, Ultralytics' `<family><scale>.yaml` with seeded random weights, imported with `from_ultralytics`) plugdet's
fused channels_last torch model, onnxruntime on its dynamic ONNX export, and Ultralytics' own fused torch model
(`DetectionModel.fuse()`, the forward its predictor runs). Sizes `--sizes` (default 640), batches `--batches`
(default 1), `--runs` (default 20) rounds in which every row runs once (interleaved, so that load from other
processes hits the rows alike), after 3 warm-up rounds; median and min per row and their ratios to the first row
(plugdet's first family, torch). What is timed is each model's whole forward: YOLO26's ends in its top-k decode
(`[B, 300, 6]` final detections, no NMS: on both sides); YOLOv8's and YOLO11's end before NMS (`[B, A, 4 + C]`), as
Ultralytics' published latencies do, so their rows leave out the NMS that YOLO26 does not need.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detect.interop.export import export_model
from detect.interop.runners import OnnxDetector
from detect.interop.ultralytics import from_ultralytics
from detect.precision import cpu_report

PHOTOS = [Path(importlib.util.find_spec("ultralytics").origin).parent / "assets" / name
          for name in ("bus.jpg", "zidane.jpg")]  # fmt: skip


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return 1000 * (time.perf_counter() - start)


def predict_rows(folder: Path) -> dict[str, object]:
    """The end-to-end rows: name -> a loaded `detect.api.Model` (see the module docstring)."""
    import sys

    from ultralytics.nn import tasks

    from detect.api import load
    from detect.cli import run_tool

    torch.manual_seed(0)
    theirs = tasks.DetectionModel("yolov8n.yaml", nc=80, verbose=False).eval()
    theirs.names = {i: f"class{i}" for i in range(80)}
    source, weights = folder / "yolov8n_random.pt", folder / "imported.pt"
    torch.save({"model": theirs.half(), "ema": None, "train_args": {"imgsz": 640}}, source)
    tool = Path(__file__).resolve().parents[1] / "tools" / "import_ultralytics.py"
    spec = importlib.util.spec_from_file_location("import_ultralytics", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.stdout, saved = open(os.devnull, "w"), sys.stdout  # noqa: SIM115  (its summary lines)
    try:
        assert run_tool(module.main, [str(source), "--out", str(weights)]) == 0
    finally:
        sys.stdout = saved
    pt = load(weights, device="cpu")
    onnx_path = pt.export("onnx", folder / "m.onnx")
    fp32 = pt.export("openvino", folder / "fp32_openvino_model")
    int8 = pt.export("openvino", folder / "int8_openvino_model", int8=True, calib=str(PHOTOS[0].parent / "*.jpg"))
    rows = {"torch fp32 (fused, channels_last)": pt, "torch bf16": load(weights, device="cpu", precision="bf16"),
            "onnxruntime": load(onnx_path, device="cpu"), "OpenVINO FP32 (f32 hint)": load(fp32, device="cpu"),
            "OpenVINO FP32 at bf16 hint": load(fp32, device="cpu", precision="bf16"),
            "OpenVINO INT8 (f32 hint)": load(int8, device="cpu"),
            "OpenVINO INT8 (bf16 hint)": load(int8, device="cpu", precision="bf16")}  # fmt: skip
    return rows | ultralytics_rows(source, folder)


class UltralyticsRow:
    """Ultralytics' own predictor on one of its files (`YOLO(path).predict`: its letterbox, inference, NMS), with
    `predict(rgb image)` as the plugdet rows have it; `runner.compiled` is its OpenVINO compiled model, if any."""

    def __init__(self, path: Path) -> None:
        from ultralytics import YOLO

        self.model, self.runner = YOLO(str(path), task="detect"), self

    def predict(self, image):
        boxes = self.model.predict(image[..., ::-1].copy(), imgsz=640, verbose=False)[0].boxes  # it takes BGR
        self.compiled = getattr(self.model.predictor.model, "ov_compiled_model", None)
        return [boxes]


def ultralytics_rows(source: Path, folder: Path) -> dict[str, object]:
    """Ultralytics' predictor on the same weights: its torch model, and its own OpenVINO FP32 and INT8 exports
    (`YOLO.export(format="openvino"[, int8=True])`, its defaults: a static 640x640 input, its own nncf settings),
    calibrated on the same two photos through a local data yaml, so nothing is downloaded."""
    from ultralytics import YOLO
    from ultralytics.utils import torch_utils

    torch_utils.NUM_THREADS = torch.get_num_threads()  # its select_device sets this many (else cores - 1) on CPU
    calib = folder / "calib.yaml"
    calib.write_text(f"path: {PHOTOS[0].parent}\ntrain: .\nval: .\nnames:\n"
                     + "".join(f"  {i}: class{i}\n" for i in range(80)))  # fmt: skip
    fp32 = YOLO(str(source)).export(format="openvino", imgsz=640)
    int8 = YOLO(str(source)).export(format="openvino", imgsz=640, int8=True, data=str(calib))
    return {"Ultralytics torch": UltralyticsRow(source), "Ultralytics OpenVINO FP32": UltralyticsRow(Path(fp32)),
            "Ultralytics OpenVINO INT8": UltralyticsRow(Path(int8))}  # fmt: skip


def bench_predict(runs: int) -> None:
    """End-to-end `predict` latency per row (module docstring), median and best of `runs` after 3 warm-ups."""
    from detect.data.source import read_image_rgb

    image = read_image_rgb(PHOTOS[0])
    rows = predict_rows(Path(tempfile.mkdtemp()))
    times: dict[str, list[float]] = {name: [] for name in rows}
    for name, model in rows.items():  # one row at a time: onnxruntime's and OpenVINO's idle threads spin for a while
        time.sleep(1.0)  # after a run, and would slow whichever row ran next if the rows were interleaved
        for _ in range(3):
            model.predict(image)
        times[name] = [timed(model.predict, image) for _ in range(runs)]
    base = statistics.median(times["torch fp32 (fused, channels_last)"])
    print(f"end to end load(...).predict, {PHOTOS[0].name} {image.shape[1]}x{image.shape[0]} at 640 (640x480 canvas), "
          f"batch 1, {torch.get_num_threads()} threads, median of {runs}:")  # fmt: skip
    for name, model in rows.items():
        found = len(model.predict(image)[0])
        median = statistics.median(times[name])
        compiled = getattr(model.runner, "compiled", None)  # OpenVINO: the precision it really runs in
        ran = f"; ran in {compiled.get_property('INFERENCE_PRECISION_HINT')}" if compiled is not None else ""
        print(f"  {name:<36} {median:7.1f} ms (best {min(times[name]):6.1f}; {median / base:4.2f}x torch fp32; "
              f"{found} detections{ran})")  # fmt: skip


def family_rows(families: list[str], scale: str, threads: int, folder: Path) -> dict[str, object]:
    """The `--families` rows: name -> function(images [B, 3, S, S]) (see the module docstring)."""
    from ultralytics.nn import tasks

    rows: dict[str, object] = {}
    for family in families:
        torch.manual_seed(0)
        theirs = tasks.DetectionModel(f"{family}{scale}.yaml", nc=80, verbose=False).eval()
        fused = from_ultralytics(theirs).eval().fuse().to(memory_format=torch.channels_last)
        ckpt = {"class_names": [str(i) for i in range(80)], "config": {}}
        onnx_path = export_model(from_ultralytics(theirs).eval().fuse(), ckpt, folder / f"{family}.onnx",
                                 img_size=640, dynamic=True)  # fmt: skip
        ort = OnnxDetector(onnx_path, threads=threads)
        theirs_fused = theirs.fuse(verbose=False).eval()
        name = f"{family}{scale}"
        rows[f"plugdet {name} torch (fused, channels_last)"] = lambda x, m=fused: m(
            x.contiguous(memory_format=torch.channels_last)
        )
        rows[f"plugdet {name} onnxruntime"] = lambda x, m=ort: m(x)
        rows[f"Ultralytics {name} torch (fused)"] = lambda x, m=theirs_fused: m(x)
    return rows


@torch.no_grad()
def bench_families(args: argparse.Namespace) -> None:
    """Latency of every `--families` row, interleaved, per size and batch (module docstring)."""
    rows = family_rows(args.families, args.scale, args.threads, Path(tempfile.mkdtemp()))
    first = next(iter(rows))
    print(f"forward latency, {args.threads} threads, median / min of {args.runs} interleaved rounds after 3 warm-ups "
          f"(ms); ratios to {first}")  # fmt: skip
    print(f"{'size':>5} {'batch':>5}  {'row':<48}{'median':>9}{'min':>9}{'median x':>10}{'min x':>8}")
    for size in args.sizes or [640]:
        for batch in args.batches or [1]:
            x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
            times: dict[str, list[float]] = {name: [] for name in rows}
            for round_index in range(3 + args.runs):
                for name, fn in rows.items():
                    spent = timed(fn, x)
                    if round_index >= 3:
                        times[name].append(spent)
            base_median, base_min = statistics.median(times[first]), min(times[first])
            for name, spent in times.items():
                median, fastest = statistics.median(spent), min(spent)
                print(f"{size:>5} {batch:>5}  {name:<48}{median:>9.1f}{fastest:>9.1f}{median / base_median:>9.2f}x"
                      f"{fastest / base_min:>7.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None, help="timed runs per row (default 10, --predict 20)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--predict", action="store_true", help="end to end through load(...).predict (docstring)")
    parser.add_argument(
        "--ultralytics-onnx",
        action="store_true",
        help="also time Ultralytics' own ONNX export "
        "(its exporter may try to pip-install missing packages: only on a machine where that is fine)",
    )
    parser.add_argument("--families", nargs="+", choices=("yolov8", "yolo11", "yolo26"), default=None,
                        help="compare these families' plugdet torch, onnxruntime, Ultralytics torch")  # fmt: skip
    parser.add_argument("--scale", default="n", choices=list("nsmlx"), help="--families: the model scale")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="--families: input sizes (default 640)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="--families: batch sizes (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_report(), f"(mkldnn bf16 supported: {torch.ops.mkldnn._is_mkldnn_bf16_supported()})")
    if (args.sizes or args.batches) and not args.families:
        parser.error("--sizes and --batches go with --families")
    if args.families:
        args.runs = args.runs or 20
        bench_families(args)
        return
    if args.predict:
        bench_predict(args.runs or 20)
        return
    args.runs = args.runs or 10
    from ultralytics.nn import tasks

    torch.manual_seed(0)
    theirs = tasks.DetectionModel("yolov8n.yaml", nc=80, verbose=False).eval()
    plain = from_ultralytics(theirs).eval()
    fused = from_ultralytics(theirs).eval().fuse().to(memory_format=torch.channels_last)
    theirs_fused = tasks.DetectionModel("yolov8n.yaml", nc=80, verbose=False).eval()
    theirs_fused.load_state_dict(theirs.state_dict())
    theirs_fused = theirs_fused.fuse(verbose=False)
    folder = Path(tempfile.mkdtemp())
    ckpt = {"class_names": [str(i) for i in range(80)], "config": {}}
    onnx_path = export_model(from_ultralytics(theirs).eval().fuse(), ckpt, folder / "m.onnx", img_size=640,
                             dynamic=True)  # fmt: skip
    ort = OnnxDetector(onnx_path, threads=args.threads)
    ul_onnx = None
    try:
        if not args.ultralytics_onnx:
            raise RuntimeError("not asked for (--ultralytics-onnx)")
        from ultralytics import YOLO

        yolo = YOLO("yolov8n.yaml")
        yolo.model.load_state_dict(theirs.state_dict())
        ul_path = yolo.export(format="onnx", dynamic=True, simplify=False, verbose=False)
        ul_onnx = __import__("onnxruntime").InferenceSession(ul_path, providers=["CPUExecutionProvider"])
    except Exception as err:  # offline, or an exporter dependency missing
        print(f"Ultralytics ONNX export skipped: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
    rows = {
        "plugdet fp32 NCHW": lambda x: plain(x),
        "plugdet fused channels_last": lambda x: fused(x.contiguous(memory_format=torch.channels_last)),
        "plugdet onnxruntime": lambda x: ort(x),
        "Ultralytics torch (fused)": lambda x: theirs_fused(x),
    }
    if ul_onnx is not None:
        rows["Ultralytics onnxruntime"] = lambda x: ul_onnx.run(None, {ul_onnx.get_inputs()[0].name: x.numpy()})
    print(f"{'size':>5} {'batch':>5}  " + "  ".join(f"{name:>28}" for name in rows))
    with torch.no_grad():
        for size in (256, 640):
            for batch in (1, 8):
                x = torch.rand(batch, 3, size, size)
                times = {name: [] for name in rows}
                for fn in rows.values():
                    fn(x)
                for _ in range(args.runs):
                    for name, fn in rows.items():
                        times[name].append(timed(fn, x))
                print(
                    f"{size:>5} {batch:>5}  " + "  ".join(f"{statistics.median(t):>25.1f} ms" for t in times.values())
                )


if __name__ == "__main__":
    main()
