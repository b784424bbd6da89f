"""Inference on image files: find the inputs a user names, run a detector on one image, annotate it.

Used by `tools/predict.py`. An image goes through the same letterbox as validation, the model, and `postprocess`
(prediction defaults: conf 0.25, IoU 0.7, max_det 300), and comes back as boxes in the original image's pixels.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backbones.errors import UserError
from detect.data.transforms import letterbox
from detect.postprocess import undo_letterbox
from detect.precision import Precision

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")


def find_inputs(source: str) -> list[Path]:
    """The image and video files a `--source` names: one file, a folder (not recursive) or a glob pattern."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True))
        files = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES]
    if not files:
        raise UserError(f"no images or videos found at --source {source}")
    return files


@torch.no_grad()
def detect_image(
    model: nn.Module,
    image: np.ndarray,
    img_size: int,
    device: torch.device | str,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    bf16: bool = False,
) -> dict[str, torch.Tensor]:
    """Detections on one RGB image.

    Args:
        model: an eval-mode detector (`Detector.detect`).
        image: [H, W, 3] uint8 RGB.
        img_size: letterbox side (the training size).
        device, conf, iou, max_det, bf16: inference settings.

    Returns:
        dict(boxes [K, 4] xyxy in the image's pixels, scores [K], labels [K]) on the CPU.
    """
    boxed, _, meta = letterbox(image, img_size)
    batch = torch.from_numpy(np.ascontiguousarray(boxed)).permute(2, 0, 1)[None]  # [1, 3, S, S], HWC memory
    precision = Precision(torch.device(device), bf16=bf16, channels_last=True)
    with precision.autocast():
        results = model.detect(precision.to_input(batch), conf, iou, max_det)
    result = undo_letterbox([{k: v.float() for k, v in r.items()} for r in results], [meta])[0]
    return {k: v.cpu() for k, v in result.items()}


def detections_to_json(path: Path, result: dict[str, torch.Tensor], class_names: Sequence[str]) -> dict:
    """One image's detections as plain JSON data (xyxy original pixels)."""
    return {
        "file": str(path),
        "detections": [
            {"box_xyxy": [round(float(v), 2) for v in box], "score": round(float(score), 5), "label": int(label),
             "class": class_names[int(label)]}
            for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                         result["labels"].tolist(), strict=True)
        ],
    }  # fmt: skip
