"""OpenVINO export (FP32 and INT8) and the OpenVINO runner that predict, val_det and the API use for an IR folder.

An OpenVINO model is the ONNX export (`detect.interop.export`, same graph, same dynamic axes) read by OpenVINO's ONNX
front end (`Core.read_model`, the converter `convert_model` wraps, without its telemetry) and saved as IR in a
folder: `<name>.xml` (graph) + `<name>.bin` (weights, kept in fp32: `compress_to_fp16=False`, else the FP32 model
would round every weight to fp16). plugdet's metadata (the ONNX file's `plugdet` JSON: class names, image size,
stride, config) travels in the .xml as `rt_info` key `plugdet`.

INT8 is post-training quantisation by nncf (`nncf.quantize`, preset MIXED: symmetric weights, asymmetric
activations) calibrated on images the user names (a folder, a glob, or `data`: the checkpoint's own validation
images), each letterboxed exactly as inference letterboxes it (the smallest stride rectangle for a dynamic model,
else the file's fixed size), float RGB in [0, 1]. The decode after the head's last convolutions (DFL softmax and
integral, anchors, box arithmetic, sigmoid; NMS with `nms`) stays in fp32 (nncf `ignored_scope`): quantising the
DFL integral would put the box sides on an 8-bit grid of the bin expectations.

Precision at run time: OpenVINO's CPU plugin runs an "FP32" model in bf16 on a CPU with native bf16 unless told
otherwise (its default `INFERENCE_PRECISION_HINT`); the runner sets the hint from the precision plugdet was asked for
(fp32 -> f32, bf16 -> bf16), so an FP32 model gives the .pt's numbers. An INT8 model runs its quantised layers in
int8 and the rest at that hint. Needs `pip install -e '.[openvino]'` (openvino, nncf).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.errors import UserError
from detect.interop.runners import ExportedDetector

META_KEY = "plugdet"
# Every graph node outside the backbone, the neck and the head's convolution branches: the decode (and NMS) tail.
DECODE_TAIL = r"^(?!/detector/(backbone|neck|head)/)"
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise UserError("OpenVINO export and OpenVINO models need openvino: pip install -e '.[openvino]'") from err
    return openvino


def ir_file(path: str | os.PathLike) -> Path:
    """The .xml of an OpenVINO model given as the .xml or as the folder holding exactly one."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        if not path.is_file():
            raise UserError(f"OpenVINO model not found: {path}")
        return path
    found = sorted(path.glob("*.xml")) if path.is_dir() else []
    if len(found) != 1:
        what = "no folder" if not path.is_dir() else f"{len(found)} .xml files"
        raise UserError(f"{path}: an OpenVINO model is a folder with one .xml (+ .bin) or the .xml, found {what}")
    return found[0]


def calibration_images(source: str, checkpoint: Mapping[str, Any], img_size: int, stride: int,
                       fixed: tuple[int, int] | None, limit: int) -> list[Callable[[], np.ndarray]]:  # fmt: skip
    """The calibration inputs, letterboxed as inference letterboxes them, each read when nncf asks for it.

    Args:
        source: a folder (with its sub-folders), a glob, an image file, or "data" (the checkpoint's validation images).
        checkpoint: the checkpoint (its config names the data set for "data").
        img_size: letterbox long side; stride: the model's largest stride.
        fixed: the (H, W) of a fixed-size model, or None (dynamic: the smallest stride rectangle).
        limit: most images (the first ones, in path or data-set order).

    Returns:
        One function per image giving float32 [1, 3, H, W] in [0, 1], RGB (300 images at 640 would hold 1 GB).
    """
    from detect.data.source import read_image_rgb
    from detect.data.transforms import letterbox
    from detect.inference import IMAGE_SUFFIXES, canvas_shape, find_inputs

    if source == "data":
        from detect.config import DetConfig, load_config
        from detect.data.formats import build_source

        cfg = load_config(DetConfig, None, [], base=checkpoint.get("config") or {})
        data = build_source(cfg.data, "val")
        readers = [partial(data.load_image, i) for i in range(min(limit, len(data)))]
    else:
        try:
            files = [path for path in find_inputs(source, recursive=True) if path.suffix.lower() in IMAGE_SUFFIXES]
        except UserError:
            files = []
        readers = [partial(read_image_rgb, path) for path in files[:limit]]
    if not readers:
        raise UserError(f"--calib {source}: no images to calibrate on (give a folder, a glob, or data)")

    def prepared(read: Callable[[], np.ndarray]) -> np.ndarray:
        image = read()  # [H, W, 3] uint8 RGB
        shape = canvas_shape(image.shape[:2], img_size, True, stride, fixed)
        boxed = letterbox(image, max(shape) if fixed else img_size, shape=shape)[0]  # [h, w, 3] uint8
        return np.ascontiguousarray(boxed.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0  # [1, 3, h, w]

    return [partial(prepared, read) for read in readers]


def quantize_int8(model: Any, images: list[Callable[[], np.ndarray]]) -> Any:
    """nncf post-training INT8 of an OpenVINO model on `images` (the decode tail kept in fp32, module docstring)."""
    os.environ.setdefault("NNCF_CI", "1")  # nncf's only use of it: no usage telemetry (nothing reaches the network)
    try:
        import nncf
    except ImportError as err:
        raise UserError("--int8 needs nncf: pip install -e '.[openvino]'") from err
    nncf.set_log_level(logging.WARNING)  # its per-node INFO lines (hundreds) would bury the export's one line
    dataset = nncf.Dataset(images, lambda read: read())
    tail = nncf.IgnoredScope(patterns=[DECODE_TAIL], validate=False)
    return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(images),
                         ignored_scope=tail)  # fmt: skip


def write_openvino(onnx_path: Path, out: str | os.PathLike, meta: str,
                   images: list[Callable[[], np.ndarray]] | None) -> Path:  # fmt: skip
    """The ONNX export as an OpenVINO IR folder `out` (`out/<name>.xml` + .bin), INT8 when calibration `images` are
    given; written to a temp folder, then moved into place (an earlier export there is replaced, any other existing
    path is refused before any work). Returns the folder."""
    ov = _openvino()
    folder = Path(out)
    if folder.exists() and not (folder.is_dir() and all(p.suffix in (".xml", ".bin") for p in folder.iterdir())):
        raise UserError(f"--out {folder}: exists and is not an OpenVINO model folder (only .xml / .bin files)")
    model = ov.Core().read_model(str(onnx_path))
    if images is not None:
        model = quantize_int8(model, images)
    model.set_rt_info(meta, [META_KEY])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        name = folder.name.removesuffix("_openvino_model") or "model"  # best_openvino_model/: best.xml + best.bin
        ov.save_model(model, str(staging / f"{name}.xml"), compress_to_fp16=False)
        if folder.is_dir():  # an earlier export of the same name: replaced whole
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful move
    return folder


def uint8_input(model: Any) -> Any:
    """`model` taking the letterbox's uint8 RGB [B, H, W, 3] as it is: OpenVINO's preprocessing (`PrePostProcessor`,
    part of the compiled graph, run on its own threads) converts to float, divides by 255 and transposes to the
    file's NCHW. Why: in predict, the float conversion and the NHWC -> NCHW copy before `infer` ran in torch's and
    numpy's threads against OpenVINO's pinned ones (bench/RESULTS.md "Where the INT8 time goes")."""
    ov = _openvino()
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(255.0)
    return ppp.build()


class OpenVinoDetector(ExportedDetector):
    """An OpenVINO model (tools/export.py --format openvino) with the `detect` interface of `Detector`, as
    `OnnxDetector` has it (the two share `ExportedDetector`'s batching, postprocess and fixed-size note).

    Attributes:
        meta: the model's plugdet metadata; fixed_shape: (H, W) or None (dynamic); strides: (stride,).
        precision: the inference precision OpenVINO runs the non-int8 layers in ("f32", "bf16", "f16").
    """

    takes_uint8 = True  # compiled with `uint8_input`: predict and val_det hand it the letterbox's uint8

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", threads: int | None = None,
                 precision: str = "fp32") -> None:  # fmt: skip
        ov = _openvino()
        xml = ir_file(path)
        core = ov.Core()
        try:
            model = core.read_model(str(xml))
        except Exception as err:  # OpenVINO raises its own types for a file that is no IR
            raise UserError(f"cannot read OpenVINO model {xml}: {str(err).splitlines()[0]}") from None
        if not model.has_rt_info([META_KEY]):
            raise UserError(f"{xml} was not exported by plugdet (no '{META_KEY}' rt_info): use tools/export.py")
        self.meta: dict[str, Any] = json.loads(model.get_rt_info([META_KEY]).astype(str))
        self.precision = HINTS.get(precision, "f32")
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}  # fmt: skip
        self.core, self.model, self.config = core, model, config
        self.compiled = core.compile_model(uint8_input(model.clone()), "CPU", config)  # OpenVINO's CPU plugin always
        self.request = self.compiled.create_infer_request()
        self.float_request: Any = None  # the file's own float input, compiled on first use (`run`)
        dims = model.inputs[0].get_partial_shape()
        self.fixed_batch = dims[0].get_length() if dims[0].is_static else None
        static = dims[2].is_static and dims[3].is_static
        self.fixed_shape = (dims[2].get_length(), dims[3].get_length()) if static else None
        self.input_dtype = np.float32
        self.strides = (int(self.meta["stride"]),)
        self.num_classes = len(self.meta["class_names"])
        self.path = xml
        self.note_fixed_shape()

    def to_array(self, images: torch.Tensor) -> np.ndarray:
        """uint8 images [B, 3, H, W] as the uint8 NHWC array the compiled model takes (the letterbox's own memory: a
        view), float images as float32 NCHW in [0, 1] (the file's own input)."""
        if images.dtype == torch.uint8:
            return images.cpu().permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
        return images.detach().float().cpu().numpy()

    def run(self, chunk: np.ndarray) -> np.ndarray:
        """One inference: uint8 [B, H, W, 3] or float [B, 3, H, W] -> the model's output (a copy: the request reuses
        its buffers)."""
        if chunk.dtype == np.uint8:
            return self.request.infer({0: chunk})[0].copy()
        if self.float_request is None:
            self.float_request = self.core.compile_model(self.model, "CPU", self.config).create_infer_request()
        return self.float_request.infer({0: chunk})[0].copy()
