"""Evaluate a detector with COCO mAP: `python tools/val_det.py --weights W [--out DIR] [--square] [key=value ...]`.

W is a plugdet checkpoint (train_det's best.pt / last.pt, or tools/import_ultralytics.py's output) or an `.onnx` from
tools/export.py (run by onnxruntime; its metadata holds the checkpoint's config). The data set, image size and NMS
settings come from the file's config; `key=value` overrides any of them (e.g. `data.root=/data/CUB eval.backend=faster
eval.max_det=100`). Validation batches are grouped by aspect ratio, each letterboxed to its smallest stride-multiple
rectangle (`--square`: every image to S x S, as before; a fixed-size ONNX file always gets its export size).
`--precision fp32|bf16|fp16|auto` (`--bf16`: bf16; default: what the checkpoint trained in on this device, so the AP
is the one its training measured). Writes to
DIR (absent or empty, else refused in one line; default `runs/val/<run name>`, then `-2`, `-3`, ...: never overwriting;
an interrupted run leaves no empty DIR): `gt.json` (COCO ground truth built from the data set), `predictions.json` (COCO
results: the data set's own image and category ids, xywh boxes in original-image pixels), `metrics.json` (`coco_stats`,
`AP`, `AP50`, `per_class_AP`, ...), `pr_curve.png`, `val_predictions.jpg`, and the analysis pictures
`confusion_matrix.png`, `confusion_matrix_normalized.png` (background row and column, conf 0.25, IoU 0.45),
`pr_f1_curves.png`, `per_class_ap.png` (two classes or more); prints the 12 COCO numbers and per-class AP. Plugin
modules (your own parts, data formats) are imported only when you name them, `imports=[my_parts]`: a checkpoint whose
config names modules you did not name is refused in one line. Bad input (weights, config, data, an unreadable image) is
one line on stderr and exit code 2, found before DIR exists.
"""

from __future__ import annotations

import argparse
import sys

from backbones.errors import UserError
from detect.api import load
from detect.cli import PRECISION_CHOICES, exit_process, inference_precision, run_tool
from detect.config import named_imports


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="val_det.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--weights", required=True, help="best.pt / last.pt from train_det.py, or an exported .onnx")
    parser.add_argument("--out", default=None, help="output folder (default runs/val/<run name>)")
    parser.add_argument("--square", action="store_true", help="letterbox every image to S x S (no rect batches)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None, help="fp32, bf16, fp16 (CUDA) or "
                        "auto (default: what the checkpoint trained in here, so the AP is its training's)")  # fmt: skip
    parser.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if "=" not in arg]
    if unknown:
        raise UserError(f"unexpected arguments {' '.join(unknown)}; usage: val_det.py --weights W [--out D] "
                        "[--square] [--precision P] [k=v ...]")  # fmt: skip
    return args, rest


def main(argv: list[str] | None = None) -> int:
    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: usage errors exit 2 after one line; --help exits 0
        return int(exc.code or 0)
    device = next((o.split("=", 1)[1] for o in overrides if o.startswith("train.device=")), "auto")
    model = load(
        args.weights, device=device, imports=named_imports(overrides)
    )  # a checkpoint is data: you name plugins
    model.val(
        *overrides,
        out=args.out,
        rect=not args.square,
        precision=inference_precision(args.precision, args.bf16, default=None),
    )
    return 0


if __name__ == "__main__":
    exit_process(run_tool(main))
