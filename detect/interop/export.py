"""Model export (ONNX, TorchScript, OpenVINO); the runners of the exported files are `detect.interop.runners`.

What an exported file computes: `images [B, 3, H, W]` float RGB in [0, 1] (letterboxed, grey 114 pad) -> the head's
own decode, `preds [B, A, 4 + C]`, xyxy input pixels then sigmoid scores (the eval output of `Detector`, DESIGN §3;
only head families with a traceable decode export, today the YOLO families), which the caller turns into detections
with `detect.postprocess.postprocess`. An NMS-free head (YOLO26, `end_to_end`) exports its top-k decode instead
(ONNX TopK): `preds [B, K, 6]` rows (x1, y1, x2, y2, score, label), K = min(max_det, A), metadata `end_to_end`, which
the runners only threshold; `nms` is refused for it. With `nms=True` the graph ends in NMS instead (ONNX
`NonMaxSuppression`) and returns `detections [K, 7]` rows `(image index, x1, y1, x2, y2, score, label)`, sorted by
decreasing score, with the confidence threshold, IoU threshold and `max_det` per image fixed at export (one candidate
per anchor: its best class, as `predict` does; multi-label validation needs the raw file).

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
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops import nms

from backbones.errors import UserError
from detect.interop.runners import META_KEY
from detect.models.detector import Detector

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
            reason = getattr(head, "export_refusal", "") or "no traceable decode"  # a family may say why
            raise UserError(f"export: the {type(head).__name__} head is not exportable by plugdet yet ({reason}); "
                            "tools/export.py exports the YOLO families (yolov8, yolo11, yolo26)")  # fmt: skip
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
                    nms: Mapping[str, float] | None, half: bool,
                    end_to_end: bool = False) -> dict[str, Any]:  # fmt: skip
    """What a runner needs from the checkpoint, as plain JSON data (stored in the exported file); `end_to_end`: the
    output is an NMS-free head's [B, K, 6] rows (YOLO26), not [B, A, 4 + C]."""
    return {"format": 1, "class_names": list(checkpoint["class_names"]),
            "category_ids": [int(c) for c in checkpoint.get("category_ids") or
                             range(1, len(checkpoint["class_names"]) + 1)],
            "img_size": [int(img_size[0]), int(img_size[1])], "stride": int(stride), "dynamic": bool(dynamic),
            "nms": dict(nms) if nms else None, "half": bool(half), "arch": checkpoint.get("arch"),
            "config": checkpoint.get("config") or {}, "end_to_end": bool(end_to_end)}  # fmt: skip


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
    end_to_end = bool(getattr(detector.head, "end_to_end", False))
    if end_to_end and nms:
        raise UserError(f"--nms: the {type(detector.head).__name__} head is NMS-free (its export ends in the top-k "
                        "decode, [B, 300, 6] rows); export it without --nms")  # fmt: skip
    module = ExportModule(detector.to(device), nms)
    example = torch.zeros(1, 3, h, w, device=device)
    if half:
        module, example = module.half(), example.half()
    meta = json.dumps(export_metadata(checkpoint, (h, w), stride, dynamic, nms, half, end_to_end))
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
    """torch.onnx.export (TorchScript-based) into memory, add the metadata, write atomically. An NMS-free head's
    output (metadata `end_to_end`) has the K = min(max_det, A) rows on axis 1."""
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
        rows = "rows" if json.loads(meta).get("end_to_end") else "anchors"
        axes[output] = {0: "rows"} if with_nms else {0: "batch", 1: rows}
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
