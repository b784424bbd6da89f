"""Draw a detector's boxes on images: `python tools/predict.py --weights W --source IMG|DIR|GLOB [options]`.

Writes annotated copies (box, class name, score) and `predictions.json` (per file: xyxy boxes in original-image
pixels, scores, labels, class names) to `--out` (default `runs/predict/<run name>`, never overwriting). Videos
(.mp4 .avi .mov .mkv) are read and written frame by frame through OpenCV. Options: `--conf 0.25 --iou 0.7
--max-det 300 --img-size N (default: the training size) --device auto|cpu|cuda --bf16`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2

from detect.cli import run_tool
from detect.data.source import read_image_rgb
from detect.distributed import select_device
from detect.inference import VIDEO_SUFFIXES, detect_image, detections_to_json, find_inputs
from detect.runs import make_run_dir
from detect.viz import draw_detections
from detect.weights import load_detector


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--weights", required=True, help="best.pt / last.pt from train_det.py")
    parser.add_argument("--source", required=True, help="an image, a folder, a glob ('imgs/*.jpg') or a video")
    parser.add_argument("--out", default=None, help="output folder (default runs/predict/<run name>)")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    parser.add_argument("--max-det", type=int, default=300, help="most boxes per image (default 300)")
    parser.add_argument("--img-size", type=int, default=None, help="letterbox side (default: the training size)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on recent CPUs)")
    return parser.parse_args(argv)


def predict_video(path: Path, out_path: Path, run: callable, names: list[str]) -> list[dict]:
    """Annotate every frame of a video; returns one detections entry per frame."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        from backbones.errors import UserError

        raise UserError(f"cannot read video {path}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    writer, entries, frame_index = None, [], 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        result = run(rgb)
        drawn = draw_detections(rgb, result["boxes"], result["labels"], result["scores"], names)
        if writer is None:
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            writer = cv2.VideoWriter(str(out_path), fourcc, fps, (rgb.shape[1], rgb.shape[0]))
        writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        entries.append({**detections_to_json(path, result, names), "frame": frame_index})
        frame_index += 1
    capture.release()
    if writer is not None:
        writer.release()
    return entries


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    files = find_inputs(args.source)
    device = select_device(args.device)
    model, ckpt = load_detector(args.weights, device, fuse=True, channels_last=True)
    names = list(ckpt["class_names"])
    img_size = args.img_size or int(ckpt["config"]["data"]["img_size"])
    out = make_run_dir(args.out or Path("runs/predict") / Path(args.weights).resolve().parent.name)

    def run(image):
        return detect_image(model, image, img_size, device, args.conf, args.iou, args.max_det, args.bf16)

    entries, used = [], set()
    for path in files:
        name = path.name if path.name not in used else f"{path.parent.name}_{path.name}"
        used.add(name)
        if path.suffix.lower() in VIDEO_SUFFIXES:
            entries += predict_video(path, out / (Path(name).stem + ".mp4"), run, names)
            continue
        image = read_image_rgb(path)
        result = run(image)
        drawn = draw_detections(image, result["boxes"], result["labels"], result["scores"], names)
        cv2.imwrite(str(out / name), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        entries.append(detections_to_json(path, result, names))
    (out / "predictions.json").write_text(json.dumps(entries, indent=1))
    boxes = sum(len(e["detections"]) for e in entries)
    print(f"predict: {len(files)} file(s), {boxes} boxes at conf {args.conf} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
