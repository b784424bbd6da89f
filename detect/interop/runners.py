"""The runners of exported files: what predict, val_det and the API use for an `.onnx` (onnxruntime; here) and an
OpenVINO model (`detect.interop.openvino.OpenVinoDetector`). Both share `ExportedDetector`: batching, the fixed or
dynamic letterbox, and turning the file's output into detections (NMS over the dense `[B, A, 4 + C]`, thresholding
an end-to-end file's rows, or the in-graph NMS's `[K, 7]`). What the files hold is `detect.interop.export`'s.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.errors import UserError
from detect.postprocess import postprocess

META_KEY = "plugdet"  # the metadata key every exported file carries (ONNX metadata, OpenVINO rt_info, TorchScript)


class ExportedDetector:
    """What the runners of exported files share (`OnnxDetector`, `detect.interop.openvino.OpenVinoDetector`): the
    `detect` interface of `Detector` (so `evaluate`, the API and predict run them unchanged) over `run`, one inference
    on float images [B, 3, H, W]. A subclass sets `meta`, `fixed_batch`, `fixed_shape`, `input_dtype` and `path`."""

    meta: dict[str, Any]
    fixed_batch: int | None
    fixed_shape: tuple[int, int] | None
    input_dtype: type
    path: Path
    takes_uint8: bool = False  # `detect` takes the letterbox's uint8 batch as it is (the file scales it to [0, 1])

    def run(self, chunk: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_array(self, images: torch.Tensor) -> np.ndarray:
        """The file's input array for images [B, 3, H, W]: float in [0, 1] as `input_dtype`."""
        return images.detach().float().cpu().numpy().astype(self.input_dtype, copy=False)

    def note_fixed_shape(self) -> None:
        """A fixed-size file letterboxes every image to its size where the .pt (and a dynamic export) takes the
        smallest stride rectangle: one line on stderr says so at load, since boxes and scores then differ a little."""
        if self.fixed_shape is not None:
            h, w = self.fixed_shape
            print(f"note: {self.path} takes a fixed {h}x{w} input: images are letterboxed to {h}x{w}, not to the "
                  "smallest rectangle as the .pt does, so boxes and scores differ slightly from the .pt's (export "
                  "without --fixed for the .pt's results)", file=sys.stderr)  # fmt: skip

    def eval(self) -> ExportedDetector:
        return self

    def forward_numpy(self, images: np.ndarray) -> np.ndarray:
        """The file's raw output for an input array from `to_array` (a fixed-batch file runs in chunks)."""
        step = self.fixed_batch or len(images)
        outs = []
        for start in range(0, len(images), step):
            out = self.run(np.ascontiguousarray(images[start : start + step]))
            if self.meta.get("nms"):
                out = out.copy()
                out[:, 0] += start
            outs.append(out)
        return np.concatenate(outs, axis=0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.forward_numpy(self.to_array(images))).float()

    def detect(
        self, images: torch.Tensor, conf: float, iou: float, max_det: int, multi_label: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image in input pixels, as `Detector.detect`. A file with NMS inside applies its own
        thresholds (fixed at export); `conf` and `max_det` then only filter further."""
        out = self(images)
        if self.meta.get("end_to_end"):  # YOLO26: [B, K, 6] top-k rows, no NMS
            from detect.models.heads.yolo26 import end_to_end_detections

            return end_to_end_detections(out, conf, max_det)
        if not self.meta.get("nms"):
            return postprocess(out, conf, iou, max_det, multi_label=multi_label)  # [B, A, 4 + C] -> per image
        results = []
        for b in range(len(images)):
            rows = out[(out[:, 0] == b) & (out[:, 5] > conf)][:max_det]  # [K, 7], by decreasing score
            results.append({"boxes": rows[:, 1:5], "scores": rows[:, 5], "labels": rows[:, 6].long()})
        return results


class OnnxDetector(ExportedDetector):
    """An exported `.onnx` run by onnxruntime (see `ExportedDetector`).

    Attributes:
        meta: the file's plugdet metadata (class names, config, ...).
        fixed_shape: (H, W) the file takes, or None for a dynamic file.
        strides: (stride,) of the exported model.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise UserError(f"running {path} needs onnxruntime: pip install -e '.[onnx]'") from err
        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # onnxruntime's pool spins after each run by default, taking the cores from the letterbox, postprocess and
        # torch work between runs: val_det's batches took 1.11x the .pt's time with it, 0.93-0.98x without
        # (bench/bench_val_runtimes.py, bench/RESULTS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError(f"{path}: onnxruntime here has no CUDA provider (pip install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own types for a file that is no ONNX model
            raise UserError(f"cannot read ONNX model {path}: {str(err).splitlines()[0]}") from None
        custom = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in custom:
            raise UserError(f"{path} was not exported by plugdet (no '{META_KEY}' metadata): use tools/export.py")
        self.meta: dict[str, Any] = json.loads(custom[META_KEY])
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        dims = model_input.shape  # ints, or names of dynamic axes
        self.fixed_batch = dims[0] if isinstance(dims[0], int) else None
        self.fixed_shape = (dims[2], dims[3]) if isinstance(dims[2], int) and isinstance(dims[3], int) else None
        self.strides = (int(self.meta["stride"]),)
        self.num_classes = len(self.meta["class_names"])
        self.path = path
        self.note_fixed_shape()

    def run(self, chunk: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: chunk})[0]
