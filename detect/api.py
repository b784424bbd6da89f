"""The Python API: pretrain a backbone, train a detector, load a detector file, predict, validate, export.

    from detect.api import load, pretrain, train

    cls_run = pretrain(overrides=["train.epochs=1"])          # = tools/train_cls.py; .dir .best .backbone .metrics
    det_run = train(overrides={"model.backbone_weights": str(cls_run.backbone)})  # = tools/train_det.py
    model = load(det_run.best, device="cpu")                  # a plugdet .pt, an imported Ultralytics .pt, an .onnx
    results = model.predict("images/", conf=0.25)             # paths, folders, globs, RGB arrays, tensors; batched
    print(results[0].boxes, results[0].class_names)           # boxes [K, 4] xyxy in the original image's pixels
    metrics = model.val()                                     # what tools/val_det.py writes to metrics.json
    tuned = model.train(overrides=["train.epochs=5"])         # fine-tunes this model (model.weights=its file)

A checkpoint is data: plugin modules (your own parts) are imported only when you name them, `load(w, imports=[...])`
or `imports=[...]` in the overrides, never because a checkpoint's config lists them.

Colour order: arrays are RGB unless `bgr=True` (pass that for `cv2.imread` results and OpenCV video frames); tensors
are RGB [3, H, W] or [B, 3, H, W], uint8 0-255 or float 0-1 (torchvision's convention). Image files are read for
you. The image size comes from the file (the training size of a checkpoint, the export size of an ONNX file).

The tools are thin callers of the same code: `tools/train_det.py` and `train` of `detect.train.detection`,
`tools/train_cls.py` and `pretrain` of `detect.train.classification`, `tools/predict.py` of `Model.predict`,
`tools/val_det.py` of `Model.val` (`detect.eval.validate`), `tools/export.py` of `Model.export`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.errors import UserError
from detect.data.source import read_image_rgb
from detect.inference import detect_images, detections_to_json, find_inputs, to_rgb_images
from detect.models.info import format_info, model_info
from detect.precision import make_precision


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


class Model:
    """A loaded detector (torch or onnxruntime) with its class names and image size; see the module docstring.

    Attributes:
        weights: the file it came from.
        runner: the eval-mode `Detector` (fused, channels_last) or an `OnnxDetector`.
        checkpoint: the checkpoint dict (an ONNX file: the metadata it carries, with "config").
        names: class names; img_size: the default letterbox long side; stride: the largest stride.
    """

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "auto", precision: str = "fp32",
                 imports: Sequence[str] = (), imports_how: str = "") -> None:  # fmt: skip
        from detect.checkpoints import consent_to_plugins

        self.weights = str(weights)
        self.imports = [str(m) for m in imports]
        self.imports_how = how = imports_how or IMPORTS_HOW
        self.device = parse_device(device)
        self.precision_name = precision
        self.precision = make_precision(self.device, precision)
        kind = exported_kind(weights)
        if kind is not None:
            if kind == "onnx":
                from detect.interop.runners import OnnxDetector

                self.runner: Any = OnnxDetector(weights, self.device)
            else:
                from detect.interop.openvino import OpenVinoDetector

                # OpenVINO runs on the CPU at the precision asked for (bf16 only where native: `make_precision`)
                runs_in = "bf16" if self.precision.bf16 else "fp32"
                self.runner = OpenVinoDetector(weights, self.device, precision=runs_in)
            meta = self.runner.meta
            self.checkpoint: dict[str, Any] = {**meta, "kind": kind}
            consent_to_plugins(self.checkpoint, self.imports, self.weights, how)  # e.g. a data format's
            fixed = self.runner.fixed_shape
            self.img_size = max(fixed) if fixed else int(max(meta["img_size"]))
        else:
            from detect.checkpoints import detector_from_checkpoint, read_detector_checkpoint

            self.checkpoint = read_detector_checkpoint(weights)
            self.runner = detector_from_checkpoint(self.checkpoint, self.device, fuse=True, channels_last=True,
                                                   where=self.weights, imports=self.imports, how=how)  # fmt: skip
            self.img_size = int((self.checkpoint.get("config") or {}).get("data", {}).get("img_size", 640))
        self.names: list[str] = list(self.checkpoint["class_names"])
        self.stride = int(getattr(self.runner, "input_stride", max(self.runner.strides)))  # sides' multiple

    @property
    def is_onnx(self) -> bool:
        """Whether this is an exported file (ONNX or OpenVINO) rather than a torch checkpoint."""
        return self.checkpoint.get("kind") in ("onnx", "openvino")

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
            verbose: bool = True, precision: str | None = None) -> dict[str, Any]:  # fmt: skip
        """COCO evaluation on the validation split of the file's data set (or of `overrides`, e.g.
        "data.root=/data/CUB"); writes gt.json, predictions.json, metrics.json and pictures to `out` (used only if
        absent or empty, else a UserError; default runs/val/<name>, then -2, -3, ...) and returns the metrics dict
        metrics.json holds. `rect`: aspect-ratio-grouped batches. `precision`: auto, fp32, bf16 or fp16 (CUDA); None:
        what the checkpoint trained in on this device (its training loop's AP)."""
        from detect.eval.validate import validate

        return validate(self, list(overrides), out, rect, verbose, precision)

    def export(self, format: str = "onnx", out: str | os.PathLike | None = None, img_size: int | None = None,
               dynamic: bool = True, nms: bool = False, half: bool = False, opset: int = 17, conf: float = 0.25,
               iou: float = 0.7, max_det: int = 300, int8: bool = False, calib: str | None = None,
               calib_limit: int = 300) -> Path:  # fmt: skip
        """Export to ONNX, OpenVINO or TorchScript (`detect.interop.export.export_model`); returns the file (OpenVINO:
        the folder) written, by default beside the weights: `W.onnx`, `W_openvino_model/` (`W_int8_openvino_model/`),
        `W.torchscript`. `dynamic` (default) keeps batch, height and width free, so the exported model letterboxes
        to the .pt's rectangles and predicts what the .pt predicts; `int8` (OpenVINO) quantises with nncf on `calib`
        (a folder, a glob, or "data", the default: the checkpoint's validation images; at most `calib_limit`)."""
        from detect.checkpoints import detector_from_checkpoint
        from detect.interop.export import export_model

        if self.is_onnx:
            raise UserError(f"{self.weights} is already an export: export from the .pt checkpoint")
        if calib is not None and not int8:
            raise UserError(f"--calib {calib} calibrates an INT8 export: add --int8")
        if int8 and format != "openvino":
            raise UserError(f"--int8 quantises an OpenVINO export: --format openvino (not {format})")
        stem = Path(self.weights).with_suffix("")
        default = {"onnx": stem.with_suffix(".onnx"), "torchscript": stem.with_suffix(".torchscript"),
                   "openvino": stem.parent / f"{stem.name}{'_int8' if int8 else ''}_openvino_model"}  # fmt: skip
        out = Path(out) if out else default.get(format, stem.with_suffix(".torchscript"))
        detector = detector_from_checkpoint(self.checkpoint, "cpu", fuse=True, where=self.weights,
                                            imports=self.imports, how=self.imports_how)  # fmt: skip
        settings = {"conf": float(conf), "iou": float(iou), "max_det": int(max_det)} if nms else None
        return export_model(detector, self.checkpoint, out, format, img_size or self.img_size, dynamic, settings,
                            half, opset, self.device, (calib or "data") if int8 else None, calib_limit)  # fmt: skip

    def info(self, img_size: int | tuple[int, int] | None = None, verbose: bool = True) -> dict[str, Any]:
        """Parameters, GFLOPs at `img_size` (default: the file's size, square) and layers; printed with `verbose`."""
        if self.is_onnx:
            raise UserError("model info needs the .pt checkpoint (an ONNX file's graph is not a torch module)")
        from detect.checkpoints import detector_from_checkpoint

        detector = detector_from_checkpoint(
            self.checkpoint, "cpu", where=self.weights, imports=self.imports, how=self.imports_how
        )  # unfused: the true counts
        info = model_info(detector, img_size or self.img_size)
        if verbose:
            print(format_info(info, Path(self.weights).name))
        return info

    def train(self, config: str | os.PathLike | None = None,
              overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainedRun:  # fmt: skip
        """Fine-tune this model: `train` with `model.weights=` this file (same-shape tensors copied) and its plugin
        modules; `config` defaults to the file's own training config (its run folder name included: a fresh
        `output_dir-2`, ... beside it), `overrides` go on top."""
        if self.is_onnx:
            raise UserError(f"{self.weights} is an export: fine-tune from the .pt checkpoint")
        base = {"model.weights": self.weights, "model.backbone_weights": None}
        if self.imports:
            base["imports"] = self.imports
        saved = {**(self.checkpoint.get("config") or {}), "imports": []}  # the user names plugins, never the file
        saved["train"] = {**saved.get("train", {}), "resume": None}
        return train(config, [*_as_overrides(base), *_as_overrides(overrides)], _base=saved if config is None else None)


@dataclass
class TrainedRun:
    """A finished training run (`train`, `pretrain`, `Model.train`).

    Attributes:
        dir: the run folder (absolute); best: its best.pt; last: its last.pt; backbone: backbone.pt (pretraining).
        metrics: best.pt's metrics (detection: AP, AP50, coco_stats, per_class_AP; classification: top1, top5, ...).
    """

    dir: Path
    best: Path
    last: Path
    metrics: dict[str, Any]
    backbone: Path | None = None


IMPORTS_HOW = "load(weights, imports=[MODULE])"


def exported_kind(weights: str | os.PathLike) -> str | None:
    """ "onnx" for an .onnx file, "openvino" for an OpenVINO .xml or a folder (an IR folder), None for a checkpoint."""
    path = Path(weights)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() == ".xml" or (path.is_dir() and any(path.glob("*.xml"))):
        return "openvino"  # any other folder is refused as a checkpoint (one line: it is a folder)
    return None


def _as_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """The tools' `key=value` strings from strings or a mapping of dotted keys (values written as YAML/JSON)."""
    if isinstance(overrides, Mapping):
        return [
            f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in overrides.items()
        ]
    if isinstance(overrides, str):
        raise UserError(f"overrides: a list of key=value strings or a mapping, not the string {overrides!r}")
    return [str(item) for item in overrides]


def train(config: str | os.PathLike | None = None, overrides: Sequence[str] | Mapping[str, Any] = (),
          _base: Mapping[str, Any] | None = None) -> TrainedRun:  # fmt: skip
    """Train a detector: exactly what `tools/train_det.py CONFIG key=value...` runs (same files, same lines).

    Args:
        config: a YAML file (None: configs/det/default.yaml).
        overrides: `key=value` strings (["train.epochs=3"]) or a mapping of dotted keys ({"train.epochs": 3}).
        _base: (`Model.train`) a checkpoint's config under the default config's place.

    Returns:
        The finished run; `.metrics` are best.pt's (with `coco_stats`).

    Raises:
        UserError: bad input (before any work); RunError: the surroundings stopped the run; KeyboardInterrupt: Ctrl-C,
            after last.pt was saved.
    """
    from detect.checkpoints import read_detector_checkpoint
    from detect.train.detection import train_detector

    run = train_detector(str(config) if config is not None else None, _as_overrides(overrides), _base)
    folder = run.run_dir.absolute()
    best = folder / "best.pt"
    metrics = dict(read_detector_checkpoint(best)["metrics"]) if best.is_file() else {}
    return TrainedRun(folder, best, folder / "last.pt", metrics)


def pretrain(config: str | os.PathLike | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainedRun:
    """Pretrain a backbone on CUB classification: exactly what `tools/train_cls.py CONFIG key=value...` runs.

    Returns:
        The finished run; `.backbone` is backbone.pt (for `model.backbone_weights=`), `.metrics` best.pt's.
    """
    from backbones.checkpoint import load_checkpoint
    from detect.train.classification import pretrain_backbone

    run = pretrain_backbone(str(config) if config is not None else None, _as_overrides(overrides))
    folder = run.run_dir.absolute()
    best = folder / "best.pt"
    metrics = dict(load_checkpoint(best)["metrics"]) if best.is_file() else {}
    return TrainedRun(folder, best, folder / "last.pt", metrics, folder / "backbone.pt")


def load(weights: str | os.PathLike, device: str | torch.device = "auto", precision: str = "fp32",
         imports: Sequence[str] = (), imports_how: str = "") -> Model:  # fmt: skip
    """Load a detector file: a plugdet checkpoint (train_det's best.pt / last.pt, or tools/import_ultralytics.py's
    output; read with weights_only=True) or an `.onnx` from tools/export.py (run by onnxruntime).

    Args:
        weights: the file.
        device: "auto", "cpu", "cuda", "cuda:0", ... or a torch.device.
        precision: "fp32" (the default), "bf16" (autocast), "fp16" (CUDA) or "auto" (the hardware's choice, as
            `train.precision=auto`: bf16 on a CPU with native bf16, fp16 on CUDA, else fp32).
        imports: the plugin modules (your own parts) the file needs; a checkpoint naming modules you did not name is
            refused with one line (a checkpoint is data: nothing it names is imported).
        imports_how: how the caller names modules, in that line (the tools: "--imports MODULE"; default the API's).
    """
    return Model(weights, device, precision, imports, imports_how)


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
