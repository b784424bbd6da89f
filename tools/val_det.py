"""Evaluate a detector with COCO mAP: `python tools/val_det.py --weights W [--out DIR] [key=value ...] [--debug]`.

The data set, image size and NMS settings come from the checkpoint's config; `key=value` overrides any of them
(e.g. `data.root=/data/CUB eval.backend=faster eval.max_det=100`). Writes to DIR (default `runs/val/<run name>`,
never overwriting): `gt.json` (COCO ground truth built from the data set), `predictions.json` (COCO results: the
data set's own image and category ids, xywh boxes in original-image pixels), `metrics.json` (`coco_stats`, `AP`,
`AP50`, `per_class_AP`, ...), `pr_curve.png`, `val_predictions.jpg`; prints the 12 COCO numbers and per-class AP.
Bad input (weights, config, data, an unreadable image) is one line on stderr and exit code 2, found before DIR exists.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from backbones.checkpoint import atomic_write_bytes
from backbones.errors import UserError
from detect.cli import run_tool
from detect.config import DetConfig, load_config
from detect.data.build import build_source
from detect.data.coco import coco_ground_truth
from detect.data.detection import DetectionDataset
from detect.eval.coco import format_table
from detect.eval.evaluate import evaluate
from detect.eval.viz import plot_pr_curve, save_gt_vs_pred_grid
from detect.models.checkpoint import detector_from_checkpoint, read_detector_checkpoint
from detect.plugins import import_plugins
from detect.precision import Precision
from detect.train.builders import build_det_loaders
from detect.train.distributed import DistInfo, select_device
from detect.train.runs import make_run_dir


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="val_det.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--weights", required=True, help="best.pt / last.pt from train_det.py")
    parser.add_argument("--out", default=None, help="output folder (default runs/val/<run name>)")
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if "=" not in arg]
    if unknown:
        raise UserError(f"unexpected arguments {' '.join(unknown)}; usage: val_det.py --weights W [--out D] [k=v ...]")
    return args, rest


def plain(value: object) -> object:
    """JSON-safe: NaN (a class without ground truth) becomes null, tuples and numpy numbers plain values."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(path: Path, data: object) -> None:
    """Write through a temp file and os.replace (never half a file)."""
    atomic_write_bytes(json.dumps(plain(data), indent=1).encode("utf-8"), path)


def main(argv: list[str] | None = None) -> int:
    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: usage errors exit 2 after one line; --help exits 0
        return int(exc.code or 0)
    device = select_device(next((o.split("=", 1)[1] for o in overrides if o.startswith("train.device=")), "auto"))
    ckpt = read_detector_checkpoint(args.weights)
    cfg = load_config(DetConfig, None, overrides, base=ckpt["config"])
    import_plugins(cfg.imports)  # the checkpoint's plugins and any the overrides add, before the model is built
    model = detector_from_checkpoint(ckpt, device, fuse=True, channels_last=True, where=args.weights)
    source = build_source(cfg.data, "val")
    if list(source.class_names) != list(ckpt["class_names"]):
        raise UserError(f"{args.weights} was trained on classes {ckpt['class_names'][:5]}..., "
                        f"but {cfg.data.root} has {list(source.class_names)[:5]}...")  # fmt: skip
    dataset = DetectionDataset(source, cfg.data.img_size, False)
    dataset.check_images()  # an unreadable image is reported now, before anything is written
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    _, _, loader = build_det_loaders(dataset, dataset, cfg, info)
    gt = coco_ground_truth(source)
    out = make_run_dir(args.out or Path("runs/val") / Path(args.weights).resolve().parent.name)
    precision = Precision(device, bf16=cfg.train.bf16, channels_last=True)
    metrics, predictions, kept = evaluate(model, loader, gt, list(source.category_ids), precision,
                                          cfg.eval.conf, cfg.eval.iou, cfg.eval.max_det, cfg.eval.backend,
                                          keep_images=8, coco_max_dets=cfg.eval.coco_max_dets)  # fmt: skip
    write_json(out / "gt.json", gt)
    write_json(out / "predictions.json", predictions)
    saved = {k: v for k, v in metrics.items() if k != "precision"}
    saved["weights"] = str(args.weights)
    write_json(out / "metrics.json", saved)
    plot_pr_curve(metrics["precision"], list(source.class_names), out / "pr_curve.png")
    if kept:
        images = [source.load_image(i) for i, _ in kept]
        gts = [source.annotations(i) for i, _ in kept]
        save_gt_vs_pred_grid(images, gts, [d for _, d in kept], list(source.class_names), out / "val_predictions.jpg")
    print(f"val_det: {args.weights} on {len(source)} images of {cfg.data.root} ({cfg.data.format}, "
          f"{cfg.data.img_size} px, conf {cfg.eval.conf}, IoU {cfg.eval.iou}, max_det {cfg.eval.max_det}; "
          f"COCO maxDets {metrics['max_dets']}, backend {metrics['backend']}, "
          f"{metrics['time_per_image_ms']:.1f} ms/image)")  # fmt: skip
    print(format_table(metrics, list(source.class_names)))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
