"""The Python API: load a detector file, predict, validate, export, show its info.

    from detect.api import load

    model = load("runs/det/default/best.pt", device="cpu")   # a plugdet .pt, an imported Ultralytics .pt, an .onnx
    results = model.predict("images/", conf=0.25)             # paths, folders, globs, RGB arrays, tensors; batched
    print(results[0].boxes, results[0].class_names)           # boxes [K, 4] xyxy in the original image's pixels
    metrics = model.val()                                     # what tools/val_det.py writes to metrics.json

Colour order: arrays are RGB unless `bgr=True` (pass that for `cv2.imread` results and OpenCV video frames); tensors
are RGB [3, H, W] or [B, 3, H, W], uint8 0-255 or float 0-1 (torchvision's convention). Image files are read for
you. The image size comes from the file (the training size of a checkpoint, the export size of an ONNX file).

The tools are thin callers of this module: `tools/predict.py` of `Model.predict`, `tools/val_det.py` of `validate`,
`tools/export.py` of `Model.export`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.errors import UserError
from detect.data.source import read_image_rgb
from detect.inference import detect_images, detections_to_json, find_inputs, to_rgb_images
from detect.models.info import format_info, model_info
from detect.precision import Precision, choose_bf16

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Result:
    """One image's detections.

    Attributes:
        boxes: [K, 4] xyxy in the original image's pixels (float32, CPU).
        scores: [K] confidences, decreasing.
        labels: [K] contiguous class indices (int64).
        names: every class name of the model (index = label).
        image: the [H, W, 3] uint8 RGB image the boxes belong to.
        path: the file it came from, or None for an array.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    image: np.ndarray = field(repr=False)
    path: str | None = None

    @property
    def class_names(self) -> list[str]:
        """The class name of each detection."""
        return [self.names[int(label)] for label in self.labels]

    def __len__(self) -> int:
        return len(self.scores)

    def plot(self) -> np.ndarray:
        """The image with the boxes, class names and scores drawn: [H, W, 3] uint8 RGB (a new array)."""
        from detect.eval.viz import draw_detections

        return draw_detections(self.image, self.boxes, self.labels, self.scores, self.names)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data: {"file", "detections": [{"box_xyxy", "score", "label", "class"}, ...]}, as
        predict.py's predictions.json holds it."""
        return detections_to_json(self.path, {"boxes": self.boxes, "scores": self.scores, "labels": self.labels},
                                  self.names)  # fmt: skip


def parse_device(device: str | torch.device) -> torch.device:
    """ "auto" (CUDA if present), "cpu", "cuda", "cuda:K" or a torch.device; CUDA without a GPU is a UserError."""
    if isinstance(device, torch.device):
        return device
    from detect.train.distributed import select_device

    return select_device(str(device))


def make_precision(device: torch.device, precision: str, where: str = "precision") -> Precision:
    """The `Precision` of inference: "fp32", "bf16" (autocast; falls back to fp32 with one warning on a CPU without
    native bf16, `detect.precision.choose_bf16`) or "fp16" (CUDA autocast only); channels_last always."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs CUDA (fp16 on a CPU is emulated and slow): use fp32 or bf16")
    bf16 = choose_bf16(device, precision == "bf16", where)
    return Precision(device, amp=device.type == "cuda" and precision in ("fp16", "bf16"), bf16=bf16,
                     channels_last=True)  # fmt: skip


class Model:
    """A loaded detector (torch or onnxruntime) with its class names and image size; see the module docstring.

    Attributes:
        weights: the file it came from.
        runner: the eval-mode `Detector` (fused, channels_last) or an `OnnxDetector`.
        checkpoint: the checkpoint dict (an ONNX file: the metadata it carries, with "config").
        names: class names; img_size: the default letterbox long side; stride: the largest stride.
    """

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "auto", precision: str = "fp32"):
        self.weights = str(weights)
        self.device = parse_device(device)
        self.precision_name = precision
        self.precision = make_precision(self.device, precision)
        if Path(weights).suffix.lower() == ".onnx":
            from detect.interop.export import OnnxDetector

            self.runner: Any = OnnxDetector(weights, self.device)
            meta = self.runner.meta
            self.checkpoint: dict[str, Any] = {**meta, "kind": "onnx"}
            fixed = self.runner.fixed_shape
            self.img_size = max(fixed) if fixed else int(max(meta["img_size"]))
        else:
            from detect.models.checkpoint import detector_from_checkpoint, read_detector_checkpoint

            self.checkpoint = read_detector_checkpoint(weights)
            self.runner = detector_from_checkpoint(self.checkpoint, self.device, fuse=True, channels_last=True,
                                                   where=str(weights))  # fmt: skip
            self.img_size = int((self.checkpoint.get("config") or {}).get("data", {}).get("img_size", 640))
        self.names: list[str] = list(self.checkpoint["class_names"])
        self.stride = int(getattr(self.runner, "input_stride", max(self.runner.strides)))  # sides' multiple

    @property
    def is_onnx(self) -> bool:
        return self.checkpoint.get("kind") == "onnx"

    def predict(
        self,
        source: Any,
        conf: float = 0.25,
        iou: float = 0.7,
        img_size: int | None = None,
        max_det: int = 300,
        batch: int = 8,
        rect: bool = True,
        bgr: bool = False,
        recursive: bool = False,
    ) -> list[Result]:
        """Detect objects in images.

        Args:
            source: a path (image, folder, glob with `**`), a list of paths, an RGB [H, W, 3] uint8 array (BGR with
                `bgr=True`), a [3, H, W] / [B, 3, H, W] RGB tensor (uint8, or float in [0, 1]), or a list of these.
            conf: score threshold in [0, 1]; iou: NMS IoU threshold in [0, 1]; max_det: most boxes per image.
            img_size: letterbox long side, a multiple of the stride (default: the file's).
            batch: most images per forward pass.
            rect: the smallest stride-multiple rectangle (default, as Ultralytics' predictor); False: the square.
            bgr: arrays are BGR (OpenCV order).
            recursive: a folder's sub-folders too.

        Returns:
            One `Result` per image, in input order (folders and globs sorted by path).
        """
        check_settings(conf, iou, img_size, max_det, self.stride)
        images, paths = self._images(source, bgr, recursive)
        fixed = getattr(self.runner, "fixed_shape", None)
        found = detect_images(self.runner, images, img_size or self.img_size, self.precision, conf, iou, max_det,
                              rect, self.stride, fixed, batch)  # fmt: skip
        return [Result(r["boxes"], r["scores"], r["labels"], self.names, image, path)
                for r, image, path in zip(found, images, paths, strict=True)]  # fmt: skip

    def _images(self, source: Any, bgr: bool, recursive: bool) -> tuple[list[np.ndarray], list[str | None]]:
        """Decode paths (RGB) and convert arrays / tensors; returns (images, paths or None)."""
        items = list(source) if isinstance(source, list | tuple) else [source]
        images: list[np.ndarray] = []
        paths: list[str | None] = []
        for item in items:
            if isinstance(item, str | os.PathLike):
                for path in find_inputs(str(item), recursive):
                    images.append(read_image_rgb(path))
                    paths.append(str(path))
            else:
                converted = to_rgb_images(item, bgr)
                images += converted
                paths += [None] * len(converted)
        return images, paths

    def val(self, *overrides: str, out: str | os.PathLike | None = None, rect: bool = True,
            verbose: bool = True) -> dict[str, Any]:  # fmt: skip
        """COCO evaluation on the validation split of the file's data set (or of `overrides`, e.g.
        "data.root=/data/CUB"); writes gt.json, predictions.json, metrics.json and pictures to `out` (default
        runs/val/<name>) and returns the metrics dict metrics.json holds. `rect`: aspect-ratio-grouped batches."""
        return validate(self, list(overrides), out, rect, verbose)

    def export(self, format: str = "onnx", out: str | os.PathLike | None = None, img_size: int | None = None,
               dynamic: bool = False, nms: bool = False, half: bool = False, opset: int = 17, conf: float = 0.25,
               iou: float = 0.7, max_det: int = 300) -> Path:  # fmt: skip
        """Export to ONNX or TorchScript (`detect.interop.export.export_model`); returns the file written
        (default: beside the weights, `.onnx` / `.torchscript`)."""
        from detect.interop.export import export_model
        from detect.models.checkpoint import detector_from_checkpoint

        if self.is_onnx:
            raise UserError(f"{self.weights} is already an export: export from the .pt checkpoint")
        suffix = ".onnx" if format == "onnx" else ".torchscript"
        out = Path(out) if out else Path(self.weights).with_suffix(suffix)
        detector = detector_from_checkpoint(self.checkpoint, "cpu", fuse=True, where=self.weights)
        settings = {"conf": float(conf), "iou": float(iou), "max_det": int(max_det)} if nms else None
        return export_model(detector, self.checkpoint, out, format, img_size or self.img_size, dynamic, settings,
                            half, opset, self.device)  # fmt: skip

    def info(self, img_size: int | tuple[int, int] | None = None, verbose: bool = True) -> dict[str, Any]:
        """Parameters, GFLOPs at `img_size` (default: the file's size, square) and layers; printed with `verbose`."""
        if self.is_onnx:
            raise UserError("model info needs the .pt checkpoint (an ONNX file's graph is not a torch module)")
        from detect.models.checkpoint import detector_from_checkpoint

        detector = detector_from_checkpoint(self.checkpoint, "cpu", where=self.weights)  # unfused: the true counts
        info = model_info(detector, img_size or self.img_size)
        if verbose:
            print(format_info(info, Path(self.weights).name))
        return info


def load(weights: str | os.PathLike, device: str | torch.device = "auto", precision: str = "fp32") -> Model:
    """Load a detector file: a plugdet checkpoint (train_det's best.pt / last.pt, or tools/import_ultralytics.py's
    output; read with weights_only=True) or an `.onnx` from tools/export.py (run by onnxruntime).

    Args:
        weights: the file.
        device: "auto", "cpu", "cuda", "cuda:0", ... or a torch.device.
        precision: "fp32", "bf16" (autocast) or "fp16" (CUDA).
    """
    return Model(weights, device, precision)


def check_settings(conf: float, iou: float, img_size: int | None, max_det: int, stride: int = 32) -> None:
    """Bad prediction settings are one UserError (exit 2 in the tools) before any work."""
    if not (0.0 <= conf <= 1.0) or math.isnan(conf):
        raise UserError(f"--conf {conf}: a score threshold is in [0, 1]")
    if not (0.0 <= iou <= 1.0) or math.isnan(iou):
        raise UserError(f"--iou {iou}: an IoU threshold is in [0, 1]")
    if img_size is not None and (img_size < stride or img_size % stride):
        raise UserError(f"--img-size {img_size}: must be a positive multiple of the stride {stride} (e.g. 640)")
    if max_det < 1:
        raise UserError(f"--max-det {max_det}: must be at least 1")


def data_description(data: Any) -> str:
    """Where the validation data comes from, for banners: the CUB root, the COCO json or the YOLO data.yaml."""
    if data.format == "coco":
        return f"{data.val_json} (coco)"
    if data.format == "yolo":
        return f"{data.yaml} (yolo)"
    return f"{data.root} (cub, {data.labels} labels)"


def validate(
    model: Model, overrides: Sequence[str], out: str | os.PathLike | None, rect: bool = True, verbose: bool = True
) -> dict[str, Any]:
    """What tools/val_det.py does (see its docstring), on a loaded `Model`; returns metrics.json's content."""
    from torch.utils.data import DataLoader

    from detect.config import DetConfig, load_config
    from detect.data.build import build_source
    from detect.data.coco import coco_ground_truth
    from detect.data.detection import DetectionDataset, detection_collate
    from detect.eval.analysis import save_analysis
    from detect.eval.coco import format_table
    from detect.eval.evaluate import evaluate
    from detect.eval.viz import plot_pr_curve, save_gt_vs_pred_grid
    from detect.plugins import import_plugins
    from detect.train.builders import quiet_worker
    from detect.train.runs import make_run_dir

    cfg = load_config(DetConfig, None, list(overrides), base=model.checkpoint.get("config") or {})
    import_plugins(cfg.imports)
    precision = make_precision(model.device, "bf16" if cfg.train.bf16 else model.precision_name, "train.bf16")
    source = build_source(cfg.data, "val")
    if list(source.class_names) != model.names:
        raise UserError(f"{model.weights} was trained on classes {model.names[:5]}..., "
                        f"but {data_description(cfg.data)} has {list(source.class_names)[:5]}...")  # fmt: skip
    fixed = getattr(model.runner, "fixed_shape", None)
    img_size = max(fixed) if fixed else cfg.data.img_size
    dataset = DetectionDataset(source, img_size, False)
    dataset.check_images()  # an unreadable image is reported now, before anything is written
    batch_size = 1 if getattr(model.runner, "fixed_batch", None) == 1 else cfg.train.batch_size * 2
    if fixed is not None:
        dataset.shapes = [tuple(fixed)] * len(dataset)
        batches = [list(range(k, min(k + batch_size, len(dataset)))) for k in range(0, len(dataset), batch_size)]
    elif rect:
        batches = dataset.rect_batches(batch_size, model.stride)
    else:
        batches = [list(range(k, min(k + batch_size, len(dataset)))) for k in range(0, len(dataset), batch_size)]
    workers = cfg.train.workers
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=detection_collate,
                        worker_init_fn=quiet_worker, pin_memory=model.device.type == "cuda")  # fmt: skip
    gt = coco_ground_truth(source)
    out_dir = make_run_dir(out or Path("runs/val") / Path(model.weights).resolve().parent.name)
    metrics, predictions, kept = evaluate(model.runner, loader, gt, list(source.category_ids), precision,
                                          cfg.eval.conf, cfg.eval.iou, cfg.eval.max_det, cfg.eval.backend,
                                          keep_images=8, coco_max_dets=cfg.eval.coco_max_dets)  # fmt: skip
    _write_json(out_dir / "gt.json", gt)
    _write_json(out_dir / "predictions.json", predictions)
    saved = {k: v for k, v in metrics.items() if k != "precision"}
    saved.update(weights=str(model.weights), rect=bool(rect and fixed is None), img_size=img_size)
    _write_json(out_dir / "metrics.json", saved)
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
            layout = f"fixed {fixed[0]}x{fixed[1]} (ONNX)"
        print(f"val_det: {model.weights} on {len(source)} images of {data_description(cfg.data)}, {layout}, conf "
              f"{cfg.eval.conf}, IoU {cfg.eval.iou}, max_det {cfg.eval.max_det}; COCO maxDets {metrics['max_dets']}, "
              f"backend {metrics['backend']}, {metrics['time_per_image_ms']:.1f} ms/image")  # fmt: skip
        print(format_table(metrics, names))
        print(f"results in {out_dir}")
    saved["out"] = str(out_dir)
    return saved


def _plain(value: object) -> object:
    """JSON-safe: NaN (a class without ground truth) becomes null, tuples and numpy numbers plain values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def _write_json(path: Path, data: object) -> None:
    """Write through a temp file and os.replace (never half a file)."""
    import json

    from backbones.checkpoint import atomic_write_bytes

    atomic_write_bytes(json.dumps(_plain(data), indent=1).encode("utf-8"), path)
