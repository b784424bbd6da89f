"""Latency of exported and eager YOLOv8n, side by side with Ultralytics: `python bench/bench_export.py [--runs 10]`.

Rows: plugdet torch fp32 (unfused NCHW), plugdet fused + channels_last (what predict runs), onnxruntime on the
dynamic ONNX export, Ultralytics' own torch model (fused), and Ultralytics' ONNX export when it runs offline. Input
sizes 256 and 640 (square), batch 1 and 8; the model forward only (no letterbox, no NMS); median of `--runs`
interleaved runs after warm-up. Weights: random (latency does not depend on them). Prints the CPU first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detect.interop.export import OnnxDetector, export_model
from detect.interop.ultralytics import from_ultralytics
from detect.precision import cpu_report


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ultralytics-onnx",
        action="store_true",
        help="also time Ultralytics' own ONNX export "
        "(its exporter may try to pip-install missing packages: only on a machine where that is fine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_report())
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
