"""OpenVINO export (`detect.interop.openvino`) and the default export (item 4 of issue 20): an FP32 OpenVINO model and
the default `.onnx` (dynamic shapes) predict what the .pt predicts through the same `load(...).predict` / predict.py;
the INT8 model (nncf) keeps the .pt's per-anchor boxes and classes on Ultralytics' photos and its AP on a trained run.

The imported third-party YOLOv8n is test_api's `imported` fixture (random weights, spread), on the same photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PHOTOS, compare_detections, load_tool
from torchvision.ops import box_iou

from backbones.errors import UserError
from detect.api import Result, load
from detect.cli import run_tool
from detect.data.source import read_image_rgb
from detect.data.transforms import letterbox
from detect.inference import canvas_shape

pytest.importorskip("openvino")
pytest.importorskip("nncf")


# The compiled uint8 input (OpenVINO's own /255 and transpose, folded into the first convolution) against the file's
# float input: boxes (px) and scores (measured 7.6e-5 px on the FP32 model; 0 on the INT8 one).
UINT8_VS_FLOAT = (1e-3, 1e-6)


def _canvas(photo: Path) -> torch.Tensor:
    """The photo letterboxed as predict letterboxes it at 640 (smallest stride rectangle): [1, 3, H, W] in [0, 1]."""
    image = read_image_rgb(photo)
    boxed = letterbox(image, 640, shape=canvas_shape(image.shape[:2], 640, True, 32, None))[0]  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1)))[None].float() / 255.0


@pytest.fixture(scope="module")
def exports(imported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """The imported model exported by tools/export.py: FP32 OpenVINO, INT8 OpenVINO calibrated on the two photos."""
    folder = tmp_path_factory.mktemp("openvino")
    weights = str(imported["imported"])
    fp32, int8 = folder / "fp32", folder / "int8"
    assert run_tool(load_tool("export").main, ["--weights", weights, "--format", "openvino", "--out", str(fp32)]) == 0
    calib = str(PHOTOS[0].parent / "*.jpg")
    argv = ["--weights", weights, "--format", "openvino", "--int8", "--calib", calib, "--out", str(int8)]
    assert run_tool(load_tool("export").main, argv) == 0
    return {"fp32": fp32, "int8": int8}


@pytest.mark.slow
@torch.no_grad()
def test_openvino_fp32_predicts_what_the_pt_predicts(imported: dict[str, Path], exports: dict[str, Path]) -> None:  # noqa: F811
    """OpenVINO at the f32 hint against the fused torch path: raw decode within 1e-3 px and 1e-5 in score (measured
    1.2e-4 px, 5e-7), and the same detections through `load(...).predict` (rect letterbox through the dynamic IR)."""
    pt = load(imported["imported"], device="cpu")
    model = load(exports["fp32"], device="cpu")
    assert model.runner.precision == "f32" and model.runner.fixed_shape is None
    assert model.names == pt.names and model.img_size == 640 and model.stride == 32
    assert sorted(p.suffix for p in exports["fp32"].iterdir()) == [".bin", ".xml"]
    for photo in PHOTOS:
        images = _canvas(photo)
        ours, ref = model.runner(images), pt.runner(images.contiguous(memory_format=torch.channels_last))
        assert ours.shape == ref.shape == (1, images.shape[2] * images.shape[3] // 64 * 21 // 16, 84)
        assert (ours[..., :4] - ref[..., :4]).abs().max() <= 1e-3
        assert (ours[..., 4:] - ref[..., 4:]).abs().max() <= 1e-5
        uint8 = (images * 255).round().to(torch.uint8)  # what predict and val_det hand it: OpenVINO scales it
        assert model.runner.takes_uint8 and model.runner.to_array(uint8).shape == (1, *images.shape[2:], 3)
        difference = (model.runner(uint8) - ours).abs()
        assert difference[..., :4].max() <= UINT8_VS_FLOAT[0] and difference[..., 4:].max() <= UINT8_VS_FLOAT[1]
        reference = pt.predict(str(photo))[0]
        compare_detections(model.predict(str(photo))[0], reference.boxes, reference.scores, reference.labels, tie=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_openvino_int8_keeps_the_pt_boxes_and_classes(imported: dict[str, Path], exports: dict[str, Path]) -> None:  # noqa: F811
    """INT8 (nncf, decode tail in fp32) against the .pt, per anchor on the photos: box corners within 0.5 px and
    scores within 0.01 (measured 0.32 px, 0.006); every .pt detection's anchor keeps its class and an IoU >= 0.9.

    Why per anchor and not NMS output against NMS output: this random-weight model scores some 700 anchors per photo
    between 0.25 and 0.35 (the same on both photos: its deep features barely depend on the image), so which of two
    overlapping near-tied boxes NMS keeps is decided by 1e-3 differences, well inside int8's 6e-3; the detections'
    counts then differ (measured at conf 0.3: 35 vs 39, 37 vs 33) though every anchor's box and class agree."""
    pt = load(imported["imported"], device="cpu")
    model = load(exports["int8"], device="cpu")
    xml = (exports["int8"] / "int8.xml").read_text()
    assert xml.count('type="FakeQuantize"') + xml.count('type="FakeConvert"') > 50  # quantised convolutions
    for photo in PHOTOS:
        images = _canvas(photo)
        ours, ref = model.runner(images)[0], pt.runner(images.contiguous(memory_format=torch.channels_last))[0]
        assert (ours[:, :4] - ref[:, :4]).abs().max() <= 0.5
        assert (ours[:, 4:] - ref[:, 4:]).abs().max() <= 0.01
        found = pt.runner.detect(images, 0.25, 0.7, 300)[0]  # the .pt's detections in canvas pixels
        anchors = torch.cdist(found["boxes"], ref[:, :4]).argmin(dim=1)  # [K] the anchor each detection came from
        assert (ref[anchors, :4] - found["boxes"]).abs().max() == 0
        assert torch.equal(ours[anchors, 4:].argmax(dim=1), found["labels"])
        assert box_iou(ours[anchors, :4], found["boxes"]).diag().min() >= 0.9


@pytest.mark.slow
@pytest.mark.train
def test_openvino_int8_ap_within_0_01_of_the_pt(trained_det_run: Path, tmp_path: Path) -> None:
    """val_det's AP of the INT8 model (calibrated on the run's own validation images, `--calib data`) within 0.01 of the
    .pt's, and the FP32 model's within 1e-6. Vacuous in part: this 3-step run's AP is about 0.001."""
    weights = trained_det_run / "best.pt"
    argv = ["--weights", str(weights), "--format", "openvino", "--out"]
    assert run_tool(load_tool("export").main, [*argv, str(tmp_path / "fp32")]) == 0
    assert run_tool(load_tool("export").main, [*argv, str(tmp_path / "int8"), "--int8"]) == 0  # --calib data by default
    found = {}
    for name, path in (("pt", weights), ("fp32", tmp_path / "fp32"), ("int8", tmp_path / "int8" / "int8.xml")):
        assert (
            run_tool(load_tool("val_det").main, ["--weights", str(path), "--out", str(tmp_path / f"val-{name}")]) == 0
        )
        found[name] = json.loads((tmp_path / f"val-{name}" / "metrics.json").read_text())
    assert abs(found["fp32"]["AP"] - found["pt"]["AP"]) <= 1e-6
    assert abs(found["int8"]["AP"] - found["pt"]["AP"]) <= 0.01
    assert found["int8"]["rect"] and found["pt"]["rect"]


@pytest.mark.slow
def test_default_onnx_export_predicts_what_the_pt_predicts(imported: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """`tools/export.py --weights W` alone writes W.onnx with dynamic shapes; predict.py on it gives the .pt's
    detections (same classes, boxes within 1e-3 px, scores within 1e-5; measured 1.2e-4 px, 5e-7)."""
    assert run_tool(load_tool("export").main, ["--weights", str(imported["imported"])]) == 0
    onnx_path = imported["imported"].with_suffix(".onnx")
    assert load(onnx_path, device="cpu").runner.fixed_shape is None
    for name, weights in (("pt", imported["imported"]), ("onnx", onnx_path)):
        argv = ["--weights", str(weights), "--source", str(PHOTOS[0].parent / "*.jpg"), "--out", str(tmp_path / name)]
        assert run_tool(load_tool("predict").main, argv) == 0
    pt, ox = (json.loads((tmp_path / name / "predictions.json").read_text()) for name in ("pt", "onnx"))
    assert [e["file"] for e in pt] == [e["file"] for e in ox] and len(pt) == 2
    for mine, reference in zip(ox, pt, strict=True):
        got, ref = (_as_result(entry["detections"]) for entry in (mine, reference))
        compare_detections(got, ref.boxes, ref.scores, ref.labels, tie=1e-5)


def _as_result(detections: list[dict]) -> Result:
    """predictions.json's detections of one image as a `Result` (what `_compare` reads)."""
    return Result(torch.tensor([d["box_xyxy"] for d in detections]), torch.tensor([d["score"] for d in detections]),
                  torch.tensor([d["label"] for d in detections]), [], np.zeros((1, 1, 3), np.uint8))  # fmt: skip


def test_int8_calib_and_out_settings_are_checked_in_one_line(untrained_det_weights: Path, tmp_path: Path) -> None:
    """Bad settings and an --out that is someone's folder: one UserError line, nothing written or removed."""
    model = load(untrained_det_weights, device="cpu")
    with pytest.raises(UserError, match=r"^--int8 quantises an OpenVINO export: --format openvino \(not onnx\)$"):
        model.export("onnx", tmp_path / "m.onnx", int8=True)
    with pytest.raises(UserError, match=r"^--calib imgs/ calibrates an INT8 export: add --int8$"):
        model.export("openvino", tmp_path / "ov", calib="imgs/")
    with pytest.raises(UserError, match=r"^--calib .*nothing: no images to calibrate on \(give a folder"):
        model.export("openvino", tmp_path / "ov", int8=True, calib=str(tmp_path / "nothing"))
    assert not (tmp_path / "ov").exists() and not (tmp_path / "m.onnx").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match=r"^--out .*mine: exists and is not an OpenVINO model folder \(only"):
        model.export("openvino", tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
