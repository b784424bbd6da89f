"""Export a detector: `python tools/export.py --weights W [--format onnx|openvino|torchscript] [--out F] [options]`.

W is a plugdet checkpoint (train_det's best.pt, or tools/import_ultralytics.py's output). Options:

- `--format` (default onnx): onnx (onnxruntime), openvino (an IR folder, `W_openvino_model/`) or torchscript;
- `--int8 [--calib SOURCE] [--calib-limit 300]` (openvino): nncf post-training INT8, calibrated on SOURCE: a folder,
  a glob, or `data` (the default: the checkpoint's own validation images), letterboxed as inference letterboxes;
- `--img-size N` (default: the training size) or `--img-size H W`: the export size, multiples of the stride;
- dynamic batch, height and width by default, so predict / val_det / the API letterbox to the smallest rectangle
  and give the .pt's results; `--fixed`: batch 1 at the export size (the runner says so in one line at load);
- `--nms [--conf 0.25 --iou 0.7 --max-det 300]`: the graph ends in NMS (detections [K, 7] rows image, x1, y1, x2,
  y2, score, label) instead of the decoded `preds [B, A, 4 + C]`;
- `--half` (or `--precision fp16`; `auto`: fp16 with `--device cuda`): fp16 weights and input, for CUDA (`--device
  cuda`); `--opset 17` (or newer);
- `--info`: print parameters, GFLOPs at the export size and layers (and export nothing unless --format is given).

The export carries class names, image size and the checkpoint's config, so `predict.py`, `val_det.py` and
`detect.api.load` run an `.onnx` (onnxruntime) or an OpenVINO folder like the checkpoint. Data-set conversion to
COCO json / YOLO txt is `tools/convert_data.py`. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backbones.errors import UserError
from detect.api import check_settings, load
from detect.cli import IMPORTS_OPTION, PRECISION_CHOICES, exit_process, run_tool
from detect.interop.export import FORMATS


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--weights", required=True, help="a plugdet detector checkpoint (.pt)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="onnx (default), openvino or torchscript")
    parser.add_argument("--out", default=None, help="the file (openvino: folder) to write (default: beside W)")
    parser.add_argument("--int8", action="store_true", help="openvino: nncf post-training INT8")
    parser.add_argument("--calib", default=None, help="--int8 calibration images: folder, glob or data (default)")
    parser.add_argument("--calib-limit", type=int, default=300, help="most calibration images (default 300)")
    parser.add_argument("--img-size", type=int, nargs="+", default=None, help="N, or H W (default: training size)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width (the default)")
    shape.add_argument("--fixed", action="store_true", help="batch 1 at the export size")
    parser.add_argument("--nms", action="store_true", help="end the graph in NMS")
    parser.add_argument("--conf", type=float, default=0.25, help="--nms score threshold (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.7, help="--nms IoU threshold (default 0.7)")
    parser.add_argument("--max-det", type=int, default=300, help="--nms most detections per image (default 300)")
    parser.add_argument("--half", action="store_true", help="fp16 (CUDA); the same as --precision fp16")
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=None,
        help="fp32 (default), fp16 (CUDA), "
        "auto (fp16 with --device cuda, else fp32); bf16 is a run-time choice (predict --precision)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    parser.add_argument("--imports", **IMPORTS_OPTION)
    parser.add_argument("--device", default="cpu", help="where the trace runs: cpu, cuda or cuda:K")
    parser.add_argument("--info", action="store_true", help="print parameters, GFLOPs and layers")
    return parser.parse_args(argv)


def export_half(precision: str | None, half: bool, device: str) -> bool:
    """Whether the file is fp16: `--half` or `--precision fp16`, or `--precision auto` on CUDA. bf16 is refused: ONNX
    Runtime's CPU kernels have no bf16, and OpenVINO picks bf16 at run time from an fp32 file (predict --precision)."""
    if precision == "bf16":
        raise UserError("--precision bf16 is not an export precision: export fp32 and run it with predict / val_det "
                        "--precision bf16 (OpenVINO runs bf16 where the CPU has it)")  # fmt: skip
    if half and precision not in (None, "fp16"):
        raise UserError(f"--half and --precision {precision} disagree: give one of them")
    return half or precision == "fp16" or (precision == "auto" and device == "cuda")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.calib_limit < 1:
        raise UserError(f"--calib-limit {args.calib_limit}: must be at least 1")
    size = args.img_size
    if size is not None and len(size) not in (1, 2):
        raise UserError(f"--img-size takes N or H W, got {len(size)} numbers")
    for side in size or []:
        check_settings(args.conf, args.iou, side, args.max_det)
    check_settings(args.conf, args.iou, None, args.max_det)
    if Path(args.weights).suffix.lower() in (".onnx", ".xml") or Path(args.weights).is_dir():
        raise UserError(f"{args.weights} is already an export: give the .pt checkpoint")
    model = load(args.weights, imports=args.imports, imports_how="--imports MODULE", device=args.device)
    img_size = None if size is None else (size[0] if len(size) == 1 else (size[0], size[1]))
    if args.info:
        model.info(img_size)
    if args.format is None and args.info:
        return 0
    fmt = args.format or "onnx"
    half = export_half(args.precision, args.half, model.device.type)
    path = model.export(fmt, args.out, img_size, not args.fixed, args.nms, half, args.opset, args.conf, args.iou,
                        args.max_det, args.int8, args.calib, args.calib_limit)  # fmt: skip
    shape = f"batch 1, {img_size or model.img_size} px" if args.fixed else "dynamic batch x height x width"
    if args.int8:
        shape += f", INT8 calibrated on {args.calib or 'data'}"
    extra = f", NMS inside (conf {args.conf}, IoU {args.iou}, max_det {args.max_det})" if args.nms else ""
    print(f"export: {args.weights} -> {path} ({fmt}, {shape}{extra}{', fp16' if half else ''}; "
          f"{len(model.names)} classes)")  # fmt: skip
    return 0


if __name__ == "__main__":
    exit_process(run_tool(main))
