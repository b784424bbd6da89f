"""Validation of a loaded detector file on its data set: what `tools/val_det.py` and `Model.val` run.

It writes gt.json, predictions.json, metrics.json (the COCO numbers, the weights, the letterbox), pr_curve.png, the
analysis pictures and val_predictions.jpg to a fresh folder, and returns what metrics.json holds. The folder is `out`
when given (absent or empty, else a one-line `UserError`: results never land in a renamed `out-2`), else `runs/val/<run
name>` (numbered `-2`, `-3`, ... when taken); an evaluation that fails or is interrupted removes it. The data set is the
checkpoint's own (its saved config), or another through overrides such as "data.root=/data/CUB".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from backbones.checkpoint import atomic_write_bytes
from backbones.errors import UserError
from detect.config import DetConfig, load_config
from detect.data.build import build_source
from detect.data.coco import coco_ground_truth
from detect.data.detection import DetectionDataset, detection_collate
from detect.data.workers import quiet_worker
from detect.eval.analysis import save_analysis
from detect.eval.coco import format_table
from detect.eval.evaluate import evaluate
from detect.eval.viz import plot_pr_curve, save_gt_vs_pred_grid
from detect.precision import make_precision, trained_precision
from detect.rundirs import discarded_on_failure, make_run_dir


def data_description(data: Any) -> str:
    """Where the validation data comes from, for banners: the CUB root, the COCO json or the YOLO data.yaml."""
    if data.format == "coco":
        return f"{data.val_json} (coco)"
    if data.format == "yolo":
        return f"{data.yaml} (yolo)"
    if data.format == "cub":
        return f"{data.root} (cub, {data.labels} labels)"
    return f"{data.root} ({data.format})"


def _batches(dataset: DetectionDataset, batch_size: int, fixed: tuple[int, int] | None, rect: bool, stride: int
             ) -> list[list[int]]:  # fmt: skip
    """Validation batches: aspect-ratio groups with `rect` (each letterboxed to its smallest canvas), else in order
    (a fixed-shape export: every image to that shape)."""
    if fixed is not None:
        dataset.shapes = [tuple(fixed)] * len(dataset)
    elif rect:
        return dataset.rect_batches(batch_size, stride)
    return [list(range(k, min(k + batch_size, len(dataset)))) for k in range(0, len(dataset), batch_size)]


def validate(
    model: Any,
    overrides: Sequence[str],
    out: str | os.PathLike | None,
    rect: bool = True,
    verbose: bool = True,
    precision: str | None = None,
) -> dict[str, Any]:
    """What tools/val_det.py does (see its docstring), on a loaded `detect.api.Model`; returns metrics.json's content.
    `precision`: fp32, bf16, fp16 (CUDA) or auto; None: what the checkpoint trained in here (`trained_precision`), so
    the AP is the one its training loop measured.

    The plugin modules were named by the user when the model was loaded (`load(w, imports=[...])`); the checkpoint's
    own config never imports any.
    """
    cfg = load_config(DetConfig, None, list(overrides), base=model.checkpoint.get("config") or {})
    asked = precision or trained_precision(cfg.train.precision, model.device)
    precision = make_precision(model.device, asked, "--precision" if precision else "train.precision")
    source = build_source(cfg.data, "val")
    if list(source.class_names) != model.names:
        raise UserError(f"{model.weights} was trained on classes {model.names[:5]}..., "
                        f"but {data_description(cfg.data)} has {list(source.class_names)[:5]}...")  # fmt: skip
    fixed = getattr(model.runner, "fixed_shape", None)
    img_size = max(fixed) if fixed else cfg.data.img_size
    dataset = DetectionDataset(source, img_size, False)
    dataset.check_images()  # an unreadable image is reported now, before anything is written
    batch_size = 1 if getattr(model.runner, "fixed_batch", None) == 1 else cfg.train.batch_size * 2
    loader = DataLoader(dataset, batch_sampler=_batches(dataset, batch_size, fixed, rect, model.stride),
                        num_workers=cfg.train.workers, collate_fn=detection_collate, worker_init_fn=quiet_worker,
                        pin_memory=model.device.type == "cuda")  # fmt: skip
    gt = coco_ground_truth(source)
    if out:  # the user's folder, as named: absent or empty, else refused (never a silent `-2`)
        out_dir = make_run_dir(out, exact="--out / out=")
    else:
        out_dir = make_run_dir(Path("runs/val") / Path(model.weights).resolve().parent.name)
    with discarded_on_failure(out_dir):  # an interrupted or failed evaluation leaves no empty folder
        metrics, predictions, kept = evaluate(model.runner, loader, gt, list(source.category_ids), precision,
                                              cfg.eval.conf, cfg.eval.iou, cfg.eval.max_det, cfg.eval.backend,
                                              keep_images=8, coco_max_dets=cfg.eval.coco_max_dets)  # fmt: skip
    write_json(out_dir / "gt.json", gt)
    write_json(out_dir / "predictions.json", predictions)
    saved = {k: v for k, v in metrics.items() if k != "precision"}
    saved.update(weights=str(model.weights), rect=bool(rect and fixed is None), img_size=img_size)
    write_json(out_dir / "metrics.json", saved)
    names = list(source.class_names)
    plot_pr_curve(metrics["precision"], names, out_dir / "pr_curve.png")
    save_analysis(gt, predictions, metrics, names, out_dir)
    if kept:
        images = [source.load_image(i) for i, _ in kept]
        gts = [source.annotations(i) for i, _ in kept]
        save_gt_vs_pred_grid(images, gts, [d for _, d in kept], names, out_dir / "val_predictions.jpg")
    if verbose:
        layout = f"rect batches to {img_size} px" if rect and fixed is None else f"{img_size} px square"
        if fixed is not None:
            layout = f"fixed {fixed[0]}x{fixed[1]} (exported)"
        print(f"val_det: {model.weights} on {len(source)} images of {data_description(cfg.data)}, {layout}, conf "
              f"{cfg.eval.conf}, IoU {cfg.eval.iou}, max_det {cfg.eval.max_det}; COCO maxDets {metrics['max_dets']}, "
              f"backend {metrics['backend']}, {metrics['time_per_image_ms']:.1f} ms/image")  # fmt: skip
        print(format_table(metrics, names))
        print(f"results in {out_dir}")
    saved["out"] = str(out_dir)
    return saved


def to_json_data(value: object) -> object:
    """JSON-safe: NaN (a class without ground truth) becomes null, tuples and numpy numbers plain values."""
    if isinstance(value, dict):
        return {k: to_json_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_data(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(path: Path, data: object) -> None:
    """Write through a temp file and os.replace (never half a file)."""
    atomic_write_bytes(json.dumps(to_json_data(data), indent=1).encode("utf-8"), path)
