"""Evaluation of any head family: run the model over a loader, ask it for detections, score them with COCO mAP.

`evaluate` asks the detector for detections (`Detector.detect`: its head family's decode and postprocess; for YOLO
NMS at conf 0.001, IoU 0.7, max_det 300, multi-label, the validation setting), maps the boxes back to original-image
pixels (`detect.postprocess.undo_letterbox`, shared by every family) and scores them with pycocotools
(`detect.eval.coco.coco_evaluate`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from detect.eval.coco import coco_evaluate, predictions_to_coco
from detect.postprocess import undo_letterbox
from detect.precision import Precision


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    loader: Any,
    precision: Precision,
    conf: float,
    iou: float,
    max_det: int,
    multi_label: bool = True,
) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]], list[dict[str, torch.Tensor]]]]:
    """Run an eval-mode detector over a loader: yields (images uint8, metas, detections in original-image pixels)."""
    model.eval()
    for images, _, metas in loader:
        inputs = precision.input_for(model, images)  # uint8 as it is for the OpenVINO runner
        with precision.autocast():
            results = model.detect(inputs, conf, iou, max_det, multi_label)
        results = undo_letterbox([{k: v.float() for k, v in r.items()} for r in results], metas)
        yield images, metas, [{k: v.cpu() for k, v in r.items()} for r in results]


def evaluate(
    model: nn.Module,
    loader: Any,
    gt: str | Mapping[str, Any],
    category_ids: Sequence[int],
    precision: Precision,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    backend: str = "pycocotools",
    keep_images: int = 0,
    coco_max_dets: int = 100,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[tuple[Any, ...]]]:
    """COCO evaluation of a detector on a validation loader.

    Args:
        model: the detector (not DDP-wrapped; `detect(images, conf, iou, max_det, multi_label)`).
        loader: validation loader (letterboxed, metas with ratio / pad / orig_size / image_id).
        gt: ground-truth COCO json (path or dict) built from the same data set.
        category_ids: contiguous label -> the data set's category id.
        precision: device, bf16 autocast, channels_last.
        conf, iou, max_det: detection settings (validation: 0.001, 0.7, 300, multi-label).
        backend: "pycocotools" or "faster".
        keep_images: keep this many (image index, detections) pairs for pictures.
        coco_max_dets: COCO's last detection cap per image, maxDets (1, 10, coco_max_dets): 100 is COCO's
            definition; 300 scores every box postprocess keeps (`max_det`), as Ultralytics' own mAP does.

    Returns:
        (metrics from `coco_evaluate` plus "time_per_image_ms", COCO-format predictions, kept pairs).
    """
    predictions: list[dict[str, Any]] = []
    kept: list[tuple[Any, ...]] = []
    start, count = time.perf_counter(), 0
    for _, metas, results in predict_batches(model, loader, precision, conf, iou, max_det, multi_label=True):
        image_ids = [int(meta["image_id"]) for meta in metas]
        predictions += predictions_to_coco(results, image_ids, list(category_ids))
        for meta, result in zip(metas, results, strict=True):
            if len(kept) < keep_images:
                kept.append((meta["index"], result))
        count += len(metas)
    elapsed = time.perf_counter() - start
    metrics = coco_evaluate(gt, predictions, backend=backend, max_dets=(1, 10, coco_max_dets))
    metrics["time_per_image_ms"] = 1000.0 * elapsed / max(count, 1)
    return metrics, predictions, kept


def nan_to_zero(value: float) -> float:
    """COCO returns -1 or NaN where a metric is undefined; curves and best-model choice read 0 instead."""
    return 0.0 if value is None or (isinstance(value, float) and (math.isnan(value) or value < 0)) else float(value)
