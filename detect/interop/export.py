"""Model export (ONNX, TorchScript) and the onnxruntime runner that predict, val_det and the API use for `.onnx`.

What an exported file computes: `images [B, 3, H, W]` float RGB in [0, 1] (letterboxed, grey 114 pad) -> the head's
own decode, `preds [B, A, 4 + C]`, xyxy input pixels then sigmoid scores (the eval output of `Detector`, DESIGN §3;
only head families with a traceable decode export, today the YOLO families), which the caller turns into detections
with `detect.postprocess.postprocess`. With `nms=True` the graph ends in NMS instead (ONNX `NonMaxSuppression`) and
returns `detections [K, 7]` rows `(image index, x1, y1, x2, y2, score, label)`, sorted by decreasing score, with the
confidence threshold, IoU threshold and `max_det` per image fixed at export (one candidate per anchor: its best
class, as `predict` does; multi-label validation needs the raw file).

Sizes: a file exported without `dynamic` takes exactly the export size (batch 1), and whoever runs it letterboxes
to that size; with `dynamic`, batch, height and width are free (any multiple of the stride), so the rectangular
letterbox works through onnxruntime too. For that reason the head's decode computes its anchors in the graph from
the feature-map sizes when traced (eagerly it caches them per size, which a trace would freeze).

Everything a runner needs travels in the file: ONNX metadata key `plugdet` (TorchScript: extra file `plugdet.json`)
holds JSON with the class names, category ids, image size, stride, NMS settings and the checkpoint's config, so
`val_det.py --weights model.onnx` knows its data set. The ONNX files come from the TorchScript-based exporter
(`torch.onnx.export(..., dynamo=False)`, opset >= 17), which needs `onnx` only; onnxruntime runs them (`pip install
-e .[onnx]`).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import nms

from backbones.errors import UserError
from detect.models.detector import Detector
from detect.postprocess import postprocess

META_KEY = "plugdet"
FORMATS = ("onnx", "openvino", "torchscript")


def nms_in_graph(preds: torch.Tensor, conf: float, iou: float, max_det: int) -> torch.Tensor:
    """Class-aware NMS written with traceable ops (it exports to ONNX NonZero / NonMaxSuppression / CumSum).

    Args:
        preds: [B, A, 4 + C] decoded outputs.
        conf, iou, max_det: score threshold (strict), NMS IoU, most detections per image.

    Returns:
        [K, 7] rows (image index, x1, y1, x2, y2, score, label), by decreasing score.
    """
    batch, num_classes = preds.shape[0], preds.shape[2] - 4
    best, label = preds[..., 4:].max(dim=-1)  # [B, A] each
    image, anchor = (best > conf).nonzero(as_tuple=True)  # [K] each
    boxes, scores, labels = preds[image, anchor, :4], best[image, anchor], label[image, anchor]  # [K, 4], [K], [K]
    # torchvision's batched-NMS offset: every (image, class) group moves to its own region of the plane
    offsets = (image * num_classes + labels).to(boxes.dtype) * (preds[..., :4].max() + 1)  # [K]
    keep = nms(boxes + offsets[:, None], scores, iou)  # [K'] by decreasing score
    kept_image = image[keep]  # [K']
    one_hot = (kept_image[:, None] == torch.arange(batch, device=preds.device)[None, :]).to(torch.int64)  # [K', B]
    rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # [K'] rank inside its image
    keep = keep[rank < max_det]
    return torch.cat((image[keep, None].to(boxes.dtype), boxes[keep], scores[keep, None],
                      labels[keep, None].to(boxes.dtype)), dim=1)  # fmt: skip


class ExportModule(nn.Module):
    """A detector as exported: images -> its head's own decode, `preds [B, A, 4 + C]`, or -> the [K, 7] detections
    with `nms`. Only a head family with a traceable decode (`DetectionHead.traceable_decode`) exports; the decode,
    anchors included, is the head's, computed in the graph from the maps' sizes so that dynamic shapes work."""

    def __init__(self, detector: Detector, nms: Mapping[str, float] | None = None) -> None:
        super().__init__()
        head = detector.head
        if not head.traceable_decode:
            raise UserError(f"export: the {type(head).__name__} head is not exportable by plugdet yet (no traceable "
                            "decode); tools/export.py exports the YOLO families (yolov8, yolo11)")  # fmt: skip
        self.detector = detector.eval()
        self.nms = dict(nms) if nms else None
        self.eval()  # the exporter restores this mode afterwards; a fused detector refuses train mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the head's decode [B, A, 4 + C] (the eval-mode `Detector` output), or [K, 7] with `nms`."""
        preds = self.detector(images)  # [B, A, 4 + C]
        if self.nms:
            return nms_in_graph(preds, self.nms["conf"], self.nms["iou"], int(self.nms["max_det"]))
        return preds


def export_metadata(checkpoint: Mapping[str, Any], img_size: tuple[int, int], stride: int, dynamic: bool,
                    nms: Mapping[str, float] | None, half: bool) -> dict[str, Any]:  # fmt: skip
    """What a runner needs from the checkpoint, as plain JSON data (stored in the exported file)."""
    return {"format": 1, "class_names": list(checkpoint["class_names"]),
            "category_ids": [int(c) for c in checkpoint.get("category_ids") or
                             range(1, len(checkpoint["class_names"]) + 1)],
            "img_size": [int(img_size[0]), int(img_size[1])], "stride": int(stride), "dynamic": bool(dynamic),
            "nms": dict(nms) if nms else None, "half": bool(half), "arch": checkpoint.get("arch"),
            "config": checkpoint.get("config") or {}}  # fmt: skip


def export_model(
    detector: Detector,
    checkpoint: Mapping[str, Any],
    out: str | os.PathLike,
    fmt: str = "onnx",
    img_size: int | tuple[int, int] = 640,
    dynamic: bool = True,
    nms: Mapping[str, float] | None = None,
    half: bool = False,
    opset: int = 17,
    device: torch.device | str = "cpu",
    calib: str | None = None,
    calib_limit: int = 300,
) -> Path:
    """Export a detector to ONNX, OpenVINO or TorchScript (see the module docstring).

    Args:
        detector: the detector (eval mode; fused or not).
        checkpoint: its checkpoint dict (class names, config) for the metadata.
        out: the file to write (written to a temp file, then moved into place); OpenVINO: the folder.
        fmt: "onnx", "openvino" or "torchscript".
        img_size: export size (H, W) or a square side; a multiple of the stride.
        dynamic: batch, height and width dynamic (ONNX, OpenVINO; the default, so that predict and val_det letterbox
            to the .pt's rectangles); otherwise batch 1 at `img_size`.
        nms: {"conf", "iou", "max_det"} to end the graph in NMS, or None for the raw `[B, A, 4 + C]`.
        half: fp16 weights and input (CUDA only: fp16 convolutions on a CPU are emulated and slow).
        opset: ONNX opset (>= 17).
        device: where the trace runs ("cuda" for `half`).
        calib: OpenVINO INT8: the calibration images (a folder, a glob, or "data": the checkpoint's validation
            images), see `detect.interop.openvino`; None: FP32.
        calib_limit: most calibration images.

    Returns:
        The written path.
    """
    from backbones.checkpoint import atomic_open

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    device = torch.device(device)
    if calib is not None and fmt != "openvino":
        raise UserError(f"--int8 / --calib quantise an OpenVINO export (--format openvino), not {fmt}")
    if half and fmt == "openvino":
        raise UserError("--half is an fp16 export for CUDA; an OpenVINO export is FP32 (or --int8)")
    if half and device.type != "cuda":
        raise UserError("--half exports fp16 for CUDA and needs a CUDA device (--device cuda); fp16 on a CPU is slow")
    if fmt == "onnx" and opset < 17:
        raise UserError(f"--opset {opset}: plugdet exports opset 17 or newer")
    h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    stride = detector.input_stride
    if h % stride or w % stride or h <= 0 or w <= 0:
        raise UserError(f"export size {h}x{w} must be positive multiples of the stride {stride}")
    module = ExportModule(detector.to(device), nms)
    example = torch.zeros(1, 3, h, w, device=device)
    if half:
        module, example = module.half(), example.half()
    meta = json.dumps(export_metadata(checkpoint, (h, w), stride, dynamic, nms, half))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter: the parity tests are the check
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(module, example, check_trace=False)
            with atomic_open(path) as f:
                torch.jit.save(traced, f, _extra_files={"plugdet.json": meta})
            return path
        if fmt == "openvino":
            return _export_openvino(module, example, path, dynamic, nms, opset, meta, checkpoint, calib, calib_limit)
        _export_onnx(module, example, path, dynamic, bool(nms), opset, meta)
    return path


def _export_openvino(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool,
                     nms: Mapping[str, float] | None, opset: int, meta: str, checkpoint: Mapping[str, Any],
                     calib: str | None, calib_limit: int) -> Path:  # fmt: skip
    """The ONNX export (same graph and axes), then OpenVINO IR in the folder `path`, INT8 with `calib`."""
    import tempfile

    from detect.interop.openvino import calibration_images, write_openvino

    images = None
    if calib is not None:
        h, w = example.shape[2:]
        fixed = None if dynamic else (h, w)
        images = calibration_images(calib, checkpoint, max(h, w), int(json.loads(meta)["stride"]), fixed, calib_limit)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        _export_onnx(module, example, onnx_path, dynamic, bool(nms), opset, meta)
        return write_openvino(onnx_path, path, meta, images)


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool, with_nms: bool, opset: int,
                 meta: str) -> None:  # fmt: skip
    """torch.onnx.export (TorchScript-based) into memory, add the metadata, write atomically."""
    import io

    from backbones.checkpoint import atomic_write_bytes

    try:
        import onnx
    except ImportError as err:
        raise UserError("ONNX export needs the `onnx` package: pip install -e '.[onnx]'") from err
    output = "detections" if with_nms else "preds"
    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        axes[output] = {0: "rows"} if with_nms else {0: "batch", 1: "anchors"}
    elif with_nms:
        axes = {output: {0: "rows"}}
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (example,), buffer, input_names=["images"], output_names=[output],
                          opset_version=opset, dynamic_axes=axes, dynamo=False, do_constant_folding=True)  # fmt: skip
    model = onnx.load_from_string(buffer.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, meta
    onnx.checker.check_model(model)
    atomic_write_bytes(model.SerializeToString(), path)


class ExportedDetector:
    """What the runners of exported files share (`OnnxDetector`, `detect.interop.openvino.OpenVinoDetector`): the
    `detect` interface of `Detector` (so `evaluate`, the API and predict run them unchanged) over `run`, one inference
    on float images [B, 3, H, W]. A subclass sets `meta`, `fixed_batch`, `fixed_shape`, `input_dtype` and `path`."""

    meta: dict[str, Any]
    fixed_batch: int | None
    fixed_shape: tuple[int, int] | None
    input_dtype: type
    path: Path

    def run(self, chunk: np.ndarray) -> np.ndarray:
        raise NotImplementedError

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
        """The file's raw output for float images [B, 3, H, W] (a fixed-batch file runs in chunks)."""
        step = self.fixed_batch or len(images)
        outs = []
        for start in range(0, len(images), step):
            out = self.run(np.ascontiguousarray(images[start : start + step], dtype=self.input_dtype))
            if self.meta.get("nms"):
                out = out.copy()
                out[:, 0] += start
            outs.append(out)
        return np.concatenate(outs, axis=0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.forward_numpy(images.detach().float().cpu().numpy())).float()

    def detect(
        self, images: torch.Tensor, conf: float, iou: float, max_det: int, multi_label: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image in input pixels, as `Detector.detect`. A file with NMS inside applies its own
        thresholds (fixed at export); `conf` and `max_det` then only filter further."""
        out = self(images)
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
