"""Inference on images: find the inputs a user names, letterbox them, run a detector in batches, map boxes back.

Used by `tools/predict.py` and the Python API (`detect.api`). Each image is letterboxed to the smallest rectangle
whose sides are multiples of the stride, its long side at the image size (`detect.data.transforms.rect_shape`: what
Ultralytics' predictor does by default), or to the square with `rect=False`, or to a fixed (H, W) for a model that
only takes one size (an ONNX file exported without `--dynamic`). Images of the same canvas run together in batches.
Then the model's family postprocess (prediction defaults: conf 0.25, IoU 0.7, max_det 300) and
`detect.postprocess.undo_letterbox` give boxes in the original image's pixels.

Colour order: every array here is RGB. `to_rgb_images` converts BGR (OpenCV's `cv2.imread`) when told `bgr=True`.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.errors import UserError
from detect.data.transforms import letterbox, rect_shape
from detect.postprocess import undo_letterbox
from detect.precision import Precision

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")


def find_inputs(source: str, recursive: bool = False) -> list[Path]:
    """The image and video files a `--source` names: one file, a folder (its files; with `recursive` every file
    below it), or a glob pattern (`**` matches any depth: `'data/**/*.jpg'`). Sorted by path."""
    path = Path(source)
    suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    if path.is_file():
        files = [path]
    elif path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        files = sorted(p for p in found if p.is_file() and p.suffix.lower() in suffixes)
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True))
        files = [p for p in files if p.is_file() and p.suffix.lower() in suffixes]
    if not files:
        raise UserError(f"no images or videos found at --source {source}")
    return files


def to_rgb_images(images: Any, bgr: bool = False) -> list[np.ndarray]:
    """Arrays or tensors as a list of uint8 [H, W, 3] RGB images.

    Args:
        images: one [H, W, 3] array (uint8), one [3, H, W] or [B, 3, H, W] tensor (uint8 0-255 or float 0-1, RGB:
            torchvision's convention), or a list of those.
        bgr: arrays are BGR (`cv2.imread`, OpenCV video frames): their channels are reversed. Tensors are always RGB.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, list | tuple):
        images = [images]
    out = []
    for image in images:
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise UserError(f"a tensor image must be [3, H, W] (or a [B, 3, H, W] batch), got {tuple(image.shape)}")
            if image.is_floating_point():
                image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
            array = image.detach().cpu().permute(1, 2, 0).numpy()  # [H, W, 3] RGB
        else:
            array = np.asarray(image)
            if array.ndim == 2:
                array = np.repeat(array[..., None], 3, axis=2)
            if array.ndim != 3 or array.shape[2] != 3:
                raise UserError(f"an image array must be [H, W, 3] (or [H, W]), got shape {array.shape}")
            if array.dtype != np.uint8:
                raise UserError(f"an image array must be uint8 (0-255), got {array.dtype}")
            if bgr:
                array = array[..., ::-1]
        out.append(np.ascontiguousarray(array))
    return out


def canvas_shape(
    hw: tuple[int, int], img_size: int, rect: bool, stride: int, fixed: tuple[int, int] | None
) -> tuple[int, int]:
    """The (H, W) an image of size `hw` is letterboxed into: `fixed`, the stride rectangle, or the square."""
    if fixed is not None:
        return fixed
    return rect_shape(hw[0], hw[1], img_size, stride) if rect else (img_size, img_size)


@torch.no_grad()
def detect_images(
    model: Any,
    images: Sequence[np.ndarray],
    img_size: int,
    precision: Precision,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    rect: bool = True,
    stride: int = 32,
    fixed_shape: tuple[int, int] | None = None,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """Detections on RGB images of any sizes, in batches of the same canvas.

    Args:
        model: eval-mode detector, or anything with `detect(float images [B, 3, H, W], conf, iou, max_det)` (the
            ONNX runner of `detect.interop.export`).
        images: [H, W, 3] uint8 RGB each.
        img_size: the long side S after letterboxing (a multiple of `stride`).
        precision: device, autocast and memory layout.
        conf, iou, max_det: postprocess settings.
        rect: smallest stride-multiple rectangle (default) or the S x S square.
        stride: the model's largest stride.
        fixed_shape: (H, W) every image is letterboxed into (a fixed-size exported model).
        batch_size: most images per forward pass.

    Returns:
        Per image (input order) dict(boxes [K, 4] xyxy original pixels, scores [K], labels [K]) on the CPU.
    """
    results: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        shape = canvas_shape(image.shape[:2], img_size, rect, stride, fixed_shape)
        groups.setdefault(shape, []).append(index)
    for shape, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            boxed = [letterbox(images[i], max(shape) if fixed_shape else img_size, shape=shape) for i in chunk]
            batch = torch.from_numpy(np.stack([b[0] for b in boxed])).permute(0, 3, 1, 2)  # [B, 3, H, W], HWC memory
            inputs = precision.input_for(model, batch)  # uint8 as it is for the OpenVINO runner
            with precision.autocast():
                found = model.detect(inputs, conf, iou, max_det)
            found = [{k: v.float() if v.is_floating_point() else v for k, v in r.items()} for r in found]  # bf16 out
            found = undo_letterbox(found, [b[2] for b in boxed])
            for i, result in zip(chunk, found, strict=True):
                results[i] = {k: v.cpu() for k, v in result.items()}
    return results  # type: ignore[return-value]


@torch.no_grad()
def detect_image(
    model: Any,
    image: np.ndarray,
    img_size: int,
    device: torch.device | str,
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    bf16: bool = False,
    rect: bool = True,
) -> dict[str, torch.Tensor]:
    """Detections on one RGB image ([H, W, 3] uint8), letterboxed to its stride rectangle (or the square with
    `rect=False`); `device` is a torch.device or a string ("cpu", "cuda:0").

    Returns:
        dict(boxes [K, 4] xyxy in the image's pixels, scores [K], labels [K]) on the CPU.
    """
    precision = Precision(torch.device(device), bf16=bf16, channels_last=True)
    stride = getattr(model, "input_stride", max(getattr(model, "strides", (32,))))
    return detect_images(model, [image], img_size, precision, conf, iou, max_det, rect, stride)[0]


def detections_to_json(path: Path | str | None, result: dict[str, torch.Tensor], class_names: Sequence[str]) -> dict:
    """One image's detections as plain JSON data (xyxy original pixels)."""
    return {
        "file": None if path is None else str(path),
        "detections": [
            {"box_xyxy": [round(float(v), 2) for v in box], "score": round(float(score), 5), "label": int(label),
             "class": class_names[int(label)]}
            for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                         result["labels"].tolist(), strict=True)
        ],
    }  # fmt: skip
