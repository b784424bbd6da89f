"""Draw a detector's boxes on images: `python tools/predict.py --weights W --source IMG|DIR|GLOB|VIDEO [options]`.

W is a plugdet checkpoint (train_det's best.pt, or tools/import_ultralytics.py's output) or an `.onnx` from
tools/export.py (run by onnxruntime). Writes annotated copies (box, class name, score) and `predictions.json` (per file:
xyxy boxes in original-image pixels, scores, labels, class names) to `--out` (absent or empty, else refused in one line;
default `runs/predict/<run name>`, then `-2`, `-3`, ...: never overwriting). A folder gives its files (`--recursive`:
every file below it); a glob is expanded by Python (`'data/**/*.jpg'` matches any depth; quote it so the shell does
not). Videos (.mp4 .avi .mov .mkv) are read and written frame by frame through OpenCV. Options: `--conf 0.25 --iou 0.7
--max-det 300 --img-size N (default: the training size; a multiple of 32) --square --device auto|cpu|cuda|cuda:K
--precision fp32|bf16|fp16|auto (`--bf16`: bf16) --info`.

Each image is letterboxed to the smallest rectangle whose sides are multiples of the stride, its long side at the
image size, as Ultralytics' predictor does (`--square`: to S x S). A fixed-size ONNX file gets its export size.

Output files are named after the input files (`<name>`, or `<folder>_<name>`, `<folder>_<name>-2`, ... when names
repeat), always directly inside `--out`. An unreadable image (missing, corrupt, truncated) is skipped with a `warning:`
line naming it and listed under "skipped" in the summary; if no input can be read, exit code 2 and no output folder is
left behind (nor after Ctrl-C before the first annotated image). A bad option value (`--conf 2`, `--img-size 100`) is
one line and exit code 2 before anything is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from backbones.checkpoint import atomic_write_bytes
from backbones.errors import UserError
from detect.api import Model, Result, check_settings, load
from detect.cli import IMPORTS_OPTION, PRECISION_CHOICES, exit_process, inference_precision, run_tool
from detect.data.source import read_image_rgb
from detect.inference import VIDEO_SUFFIXES, find_inputs
from detect.rundirs import discarded_on_failure, make_run_dir


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--weights", required=True, help="best.pt / last.pt, an imported Ultralytics .pt, an .onnx")
    parser.add_argument("--source", required=True, help="an image, a folder, a glob ('imgs/**/*.jpg') or a video")
    parser.add_argument("--out", default=None, help="output folder (default runs/predict/<run name>)")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold in [0, 1] (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold in [0, 1] (default 0.7)")
    parser.add_argument("--max-det", type=int, default=300, help="most boxes per image (default 300)")
    parser.add_argument("--img-size", type=int, default=None, help="letterbox long side (default: the training size)")
    parser.add_argument("--square", action="store_true", help="letterbox to S x S instead of the stride rectangle")
    parser.add_argument("--recursive", action="store_true", help="a --source folder's sub-folders too")
    parser.add_argument("--imports", **IMPORTS_OPTION)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None, help="fp32 (default), bf16 autocast "
                        "(fp32 with a warning on CPUs without native bf16), fp16 (CUDA) or auto (the hardware's "
                        "choice)")  # fmt: skip
    parser.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    parser.add_argument("--info", action="store_true", help="print parameters, GFLOPs at the image size and layers")
    return parser.parse_args(argv)


def predict_video(path: Path, out_path: Path, run: Callable[[np.ndarray], Result]) -> list[dict]:
    """Annotate every frame of a video; returns one detections entry per frame."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise UserError(f"cannot read video {path}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    writer, entries, frame_index = None, [], 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        result = run(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        if writer is None:
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            writer = cv2.VideoWriter(str(out_path), fourcc, fps, (frame.shape[1], frame.shape[0]))
        writer.write(cv2.cvtColor(result.plot(), cv2.COLOR_RGB2BGR))
        entries.append({**result.to_json(), "file": str(path), "frame": frame_index})
        frame_index += 1
    capture.release()
    if writer is not None:
        writer.release()
    return entries


def output_name(path: Path, used: set[str]) -> str:
    """A file name for `path`'s annotated copy, unique among `used` (which it joins); never a path with folders.

    `<name>`, else `<parent folder>_<name>`, else `<parent folder>_<stem>-K<suffix>`: a second `x.jpg` never
    overwrites the first, and only the final component of the input path is used, so nothing lands outside `--out`.
    """
    stem, suffix = Path(path.name).stem, Path(path.name).suffix
    candidates = [path.name, f"{path.parent.name}_{path.name}"]
    candidates += (f"{path.parent.name}_{stem}-{k}{suffix}" for k in range(2, len(used) + 3))
    name = next(c for c in candidates if c not in used and c not in ("", ".", "..") and "/" not in c)
    used.add(name)
    return name


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    check_settings(args.conf, args.iou, args.img_size, args.max_det)  # before any work
    files = find_inputs(args.source, args.recursive)
    model: Model = load(
        args.weights,
        imports=args.imports,
        imports_how="--imports MODULE",
        device=args.device,
        precision=inference_precision(args.precision, args.bf16),
    )
    if args.info:
        model.info(args.img_size)

    def run(image: np.ndarray) -> Result:
        return model.predict(image, args.conf, args.iou, args.img_size, args.max_det, rect=not args.square)[0]

    default = Path("runs/predict") / Path(args.weights).resolve().parent.name
    out = make_run_dir(args.out, exact="--out") if args.out else make_run_dir(default)
    with discarded_on_failure(out):  # nothing annotated yet (all unreadable, Ctrl-C): the folder goes again
        predict_files(files, out, run, args.conf)
    return 0


def predict_files(files: list[Path], out: Path, run: Callable[[np.ndarray], Result], conf: float) -> None:
    """Annotate each file into `out`, write predictions.json and print the summary line; unreadable images are
    skipped with a warning, none readable is a `UserError`."""
    entries, used, skipped = [], set(), []
    for path in files:
        name = output_name(path, used)
        if path.suffix.lower() in VIDEO_SUFFIXES:
            entries += predict_video(path, out / (Path(name).stem + ".mp4"), run)
            continue
        try:
            image = read_image_rgb(path)
        except UserError as error:  # one bad file does not stop a folder of thousands
            print(f"warning: skipped {error}", file=sys.stderr)
            skipped.append(str(path))
            continue
        result = run(image)
        cv2.imwrite(str(out / name), cv2.cvtColor(result.plot(), cv2.COLOR_RGB2BGR))
        entries.append({**result.to_json(), "file": str(path)})
    if skipped and len(skipped) == len(files):
        raise UserError(f"none of the {len(files)} input file(s) could be read; the first: {skipped[0]}")
    atomic_write_bytes(json.dumps(entries, indent=1).encode("utf-8"), out / "predictions.json")
    boxes = sum(len(e["detections"]) for e in entries)
    note = f", {len(skipped)} skipped (unreadable)" if skipped else ""
    print(f"predict: {len(files)} file(s){note}, {boxes} boxes at conf {conf} -> {out}")


if __name__ == "__main__":
    exit_process(run_tool(main))
