"""The Python API (`detect.api`), Ultralytics weights through the import tool, rectangular inference against
Ultralytics' default `predict()`, ONNX parity with the torch path, the analysis pictures, predict's option checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PHOTOS, compare_detections, load_tool, randomize_bn

from backbones.checkpoint import atomic_save
from backbones.errors import UserError
from detect.api import load
from detect.checkpoints import detector_checkpoint
from detect.cli import run_tool
from detect.config import DetConfig, config_to_dict, load_config
from detect.data.source import read_image_rgb
from detect.inference import detect_image
from detect.models import build_yolo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def det_ckpt(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (spread-initialised) 1-class YOLOv8n checkpoint at 128 px on the tiny synthetic set."""
    cfg = load_config(DetConfig, None, [f"data.root={synth_cub_root}", "data.img_size=128", "train.workers=0",
                                        "train.batch_size=4", "model.backbone_weights=null"])  # fmt: skip
    torch.manual_seed(0)
    model = randomize_bn(build_yolo("n", 1), seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for branch in model.head.cls_branch:
            branch.pred.bias.normal_(0.0, 1.0, generator=gen)
    arch = {"scale": "n", "num_classes": 1, "backbone": None, "reg_max": 16}
    path = tmp_path_factory.mktemp("api") / "best.pt"
    atomic_save(detector_checkpoint(model, arch, ["bird"], [1], config_to_dict(cfg), {}, 1), path)
    return path


@pytest.mark.slow
def test_pretrain_train_val_det_and_fine_tune_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process `pretrain` then `train` on a CUB-format tree made for this test (another seed, 3 species, 6 per
    species); tools/val_det.py on the returned best.pt finds the coco_stats `train()` returned; `load(best).train`
    fine-tunes from those weights (model.weights = the file) in a fresh run folder."""
    from detect.api import pretrain, train
    from detect.data.synth import make_synth_cub

    root = tmp_path / "unseen"
    make_synth_cub(root, num_species=3, images_per_species=6, seed=7, width_range=(96, 128), height_range=(72, 96))
    monkeypatch.chdir(tmp_path)
    common = [f"data.root={root}", "train.epochs=1", "train.workers=0"]
    cls_run = pretrain(overrides=[*common, "data.img_size=64", "data.resize_size=72", "train.batch_size=6",
                                  "output_dir=runs/cls"])  # fmt: skip
    assert cls_run.backbone == tmp_path / "runs" / "cls" / "backbone.pt" and cls_run.backbone.is_file()
    assert cls_run.metrics["epoch"] == 1 and cls_run.metrics["top1"] == torch.load(cls_run.best)["metrics"]["top1"]
    det_run = train(overrides={"data.root": str(root), "train.epochs": 2, "train.workers": 0, "data.img_size": 96,
                               "train.batch_size": 4, "train.close_mosaic": 1, "output_dir": "runs/det",
                               "model.backbone_weights": str(cls_run.backbone)})  # fmt: skip
    assert (det_run.dir, det_run.best, det_run.last) == (tmp_path / "runs" / "det", det_run.dir / "best.pt",
                                                          det_run.dir / "last.pt")  # fmt: skip
    assert run_tool(load_tool("val_det").main, ["--weights", str(det_run.best), "--out", "runs/val"]) == 0
    validated = json.loads((tmp_path / "runs" / "val" / "metrics.json").read_text())
    assert len(det_run.metrics["coco_stats"]) == 12
    assert validated["coco_stats"] == pytest.approx(det_run.metrics["coco_stats"], abs=1e-3)
    tuned = load(det_run.best, device="cpu").train(overrides=["train.epochs=1"])
    assert tuned.dir == tmp_path / "runs" / "det-2" and tuned.best.is_file()
    saved = torch.load(tuned.last)["config"]
    assert saved["model"]["weights"] == str(det_run.best) and saved["model"]["backbone_weights"] is None
    assert saved["data"]["root"] == str(root) and saved["train"]["epochs"] == 1


def test_overrides_take_strings_or_a_mapping_of_dotted_keys() -> None:
    from detect.api import _as_overrides

    assert _as_overrides(["train.epochs=3"]) == ["train.epochs=3"]
    assert _as_overrides({"train.epochs": 3, "model.backbone_weights": None, "data.root": "/d", "imports": ["a.b"],
                          "train.ema": True}) == ["train.epochs=3", "model.backbone_weights=null", "data.root=/d",
                                                  'imports=["a.b"]', "train.ema=true"]  # fmt: skip
    with pytest.raises(UserError, match="not the string"):
        _as_overrides("train.epochs=3")


def test_bgr_arrays_tensors_and_device_strings_give_the_same_boxes(det_ckpt: Path, synth_cub_root: Path) -> None:
    path = sorted((synth_cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))[0]
    rgb = read_image_rgb(path)
    model = load(det_ckpt, device="cpu")
    from_file = model.predict(str(path), conf=0.3)[0]
    from_rgb = model.predict(rgb, conf=0.3)[0]
    from_bgr = model.predict(np.ascontiguousarray(rgb[..., ::-1]), conf=0.3, bgr=True)[0]
    from_tensor = model.predict(torch.from_numpy(rgb).permute(2, 0, 1), conf=0.3)[0]
    wrong = model.predict(np.ascontiguousarray(rgb[..., ::-1]), conf=0.3)[0]  # BGR read as RGB: other boxes
    assert len(from_file) > 0 and from_file.labels.dtype == torch.int64  # as `Result` documents (was float)
    for other in (from_rgb, from_bgr, from_tensor):
        assert torch.equal(other.boxes, from_file.boxes) and torch.equal(other.scores, from_file.scores)
    assert len(wrong) != len(from_file) or not torch.equal(wrong.scores, from_file.scores)
    assert from_file.to_json()["detections"][0]["class"] == "bird" and from_file.plot().shape == rgb.shape
    direct = detect_image(model.runner, rgb, 128, "cpu", conf=0.3)  # a device string works here too
    assert torch.equal(direct["boxes"], from_file.boxes)


@torch.no_grad()
def test_rect_predict_equals_ultralytics_default_predict(imported: dict[str, Path]) -> None:
    """Ultralytics' default predict() (rect letterbox, conf 0.25, IoU 0.7) on its bundled photos vs ours on the
    imported file: the same detections (same count and classes, boxes within 1e-3 px, scores within 1e-5)."""
    from ultralytics import YOLO

    theirs = YOLO(str(imported["source"]))
    model = load(imported["imported"], device="cpu")
    assert model.img_size == 640 and model.names[3] == "class3"
    for photo in PHOTOS:
        ref = theirs.predict(str(photo), verbose=False, device="cpu")[0]
        assert tuple(ref.orig_shape) == read_image_rgb(photo).shape[:2]
        ours = model.predict(str(photo))[0]
        compare_detections(ours, ref.boxes.xyxy, ref.boxes.conf, ref.boxes.cls)
        square = model.predict(str(photo), rect=False)[0]  # what plugdet did before: other boxes on a 4:3 photo
        assert len(square) != len(ours) or (square.boxes - ours.boxes).abs().max() > 1e-2


@pytest.mark.slow
@torch.no_grad()
def test_onnx_dynamic_and_fixed_match_the_torch_path(imported: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = load(imported["imported"], device="cpu")
    dynamic = tmp_path / "dynamic.onnx"
    assert run_tool(load_tool("export").main, ["--weights", str(imported["imported"]), "--format", "onnx", "--dynamic",
                                          "--out", str(dynamic)]) == 0  # fmt: skip
    fixed = model.export("onnx", tmp_path / "fixed.onnx", img_size=640, dynamic=False)
    nms = model.export("onnx", tmp_path / "nms.onnx", dynamic=True, nms=True)
    runners = {name: load(path, device="cpu") for name, path in
               (("dynamic", dynamic), ("fixed", fixed), ("nms", nms))}  # fmt: skip
    assert runners["fixed"].runner.fixed_shape == (640, 640) and runners["dynamic"].runner.fixed_shape is None
    for photo in PHOTOS:
        rect, square = model.predict(str(photo))[0], model.predict(str(photo), rect=False)[0]
        for name, reference in (("dynamic", rect), ("fixed", square)):
            got = runners[name].predict(str(photo))[0]
            # every detection whose score is not tied: same class, box within 1e-3 px, score within 1e-5; onnxruntime's
            # scores differ from torch's by up to 1e-5, so scores that close to another's count as tied here
            compare_detections(got, reference.boxes, reference.scores, reference.labels, tie=1e-5)
        for shape in ((384, 640), (640, 480), (640, 640)):  # the raw outputs, which NMS reads
            images = torch.rand(2, 3, *shape)
            theirs, ours = runners["dynamic"].runner(images), model.runner(images)
            assert (theirs[..., :4] - ours[..., :4]).abs().max() <= 1e-3
            assert (theirs[..., 4:] - ours[..., 4:]).abs().max() <= 1e-5
        in_graph = runners["nms"].predict(str(photo))[0]  # NMS on offset boxes (float32 at ~1e4 px): counts only
        assert abs(len(in_graph) - len(rect)) <= max(3, len(rect) // 20), (len(in_graph), len(rect))
    script = tmp_path / "model.torchscript"
    model.export("torchscript", script)
    traced = torch.jit.load(str(script))
    images = torch.rand(1, 3, 384, 640)
    assert (traced(images) - model.runner(images)).abs().max() <= 1e-3


def test_val_det_on_onnx_equals_torch_and_rect_is_default(det_ckpt: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    pytest.importorskip("onnxruntime")
    onnx_path = load(det_ckpt, device="cpu").export("onnx", tmp_path / "m.onnx", dynamic=True)
    val = load_tool("val_det").main
    assert run_tool(val, ["--weights", str(det_ckpt), "--out", str(tmp_path / "pt")]) == 0
    assert run_tool(val, ["--weights", str(onnx_path), "--out", str(tmp_path / "onnx")]) == 0
    assert run_tool(val, ["--weights", str(det_ckpt), "--out", str(tmp_path / "sq"), "--square"]) == 0
    banner = [line for line in capsys.readouterr().out.splitlines() if line.startswith("val_det:")]
    assert "rect batches" in banner[0] and "(cub, bird labels)" in banner[0] and "square" in banner[2]
    pt, ox, sq = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("pt", "onnx", "sq"))
    # an untrained model's AP (~0.001) rests on tied low scores, whose order float noise decides: 1e-3 here
    assert abs(pt["AP"] - ox["AP"]) <= 1e-3 and abs(pt["AP50"] - ox["AP50"]) <= 1e-3
    assert pt["rect"] and not sq["rect"]


def test_predict_tool_runs_an_onnx_file(det_ckpt: Path, synth_cub_root: Path, tmp_path: Path) -> None:
    """predict.py --weights m.onnx (onnxruntime, rect letterbox through the dynamic graph) draws every image and lists
    as many detections as the torch checkpoint; the ONNX-vs-torch box numbers are the parity test's above (this random
    model's scores cluster near 0.62, where float noise in NMS order decides single boxes, so counts are compared)."""
    pytest.importorskip("onnxruntime")
    onnx_path = load(det_ckpt, device="cpu").export("onnx", tmp_path / "m.onnx", dynamic=True)
    images = str(synth_cub_root / "CUB_200_2011" / "images" / "*" / "*.jpg")
    for name, weights in (("pt", det_ckpt), ("onnx", onnx_path)):
        argv = ["--weights", str(weights), "--source", images, "--out", str(tmp_path / name), "--conf", "0.3"]
        assert run_tool(load_tool("predict").main, argv) == 0
    pt, ox = (json.loads((tmp_path / name / "predictions.json").read_text()) for name in ("pt", "onnx"))
    assert [e["file"] for e in pt] == [e["file"] for e in ox] and len(pt) == 24
    assert len(list((tmp_path / "onnx").glob("*.jpg"))) == 24
    counts = [sum(len(e["detections"]) for e in found) for found in (pt, ox)]
    assert counts[0] > 0 and abs(counts[0] - counts[1]) <= max(2, counts[0] // 50), counts


@pytest.mark.train
def test_imported_checkpoint_fine_tunes_validates_and_predicts(imported: dict[str, Path], synth_cub_root: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    """model.weights=OUT.pt (80 classes) fine-tunes a 1-class detector: every tensor but the class layers copied."""
    from backbones.checkpoint import load_checkpoint

    saved = load_checkpoint(imported["imported"])  # weights_only=True
    assert saved["imported_from"]["family"] == "YOLOv8" and len(saved["class_names"]) == 80
    out = tmp_path / "det"
    argv = [f"data.root={synth_cub_root}", "data.img_size=64", "train.epochs=1", "train.batch_size=4",
            "train.workers=0", f"model.weights={imported['imported']}", "model.backbone_weights=null",
            f"output_dir={out}"]  # fmt: skip
    assert run_tool(load_tool("train_det").main, argv) == 0
    from detect.train.builders import load_detector_weights

    fresh = build_yolo("n", 1)
    copied = load_detector_weights(fresh, str(imported["imported"]))
    # the class branches' widths follow the number of classes (max(c0, min(C, 100))): they keep their init
    assert len([key for key in fresh.state_dict() if not key.startswith("head.cls_branch.")]) <= copied
    assert copied < len(fresh.state_dict())
    assert torch.equal(fresh.state_dict()["backbone.stem.conv.weight"], saved["model"]["backbone.stem.conv.weight"])
    assert load_checkpoint(out / "best.pt")["model"]["head.cls_branch.0.pred.weight"].shape[0] == 1
    assert run_tool(load_tool("val_det").main, ["--weights", str(out / "best.pt"), "--out", str(tmp_path / "v")]) == 0
    image = next((synth_cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    assert run_tool(load_tool("predict").main, ["--weights", str(imported["imported"]), "--source", str(image),
                                           "--out", str(tmp_path / "p"), "--conf", "0.9"]) == 0  # fmt: skip


@pytest.mark.parametrize("option, value, text", [
    ("--conf", "2", "--conf 2.0: a score threshold is in [0, 1]"),
    ("--conf", "-1", "--conf -1.0: a score threshold is in [0, 1]"),
    ("--iou", "5", "--iou 5.0: an IoU threshold is in [0, 1]"),
    ("--img-size", "0", "--img-size 0: must be a positive multiple of the stride 32"),
    ("--img-size", "100", "--img-size 100: must be a positive multiple of the stride 32"),
])  # fmt: skip
def test_predict_rejects_bad_settings_before_any_work(
    option: str, value: str, text: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    argv = ["--weights", str(tmp_path / "absent.pt"), "--source", str(tmp_path / "none"), option, value]
    assert run_tool(load_tool("predict").main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"error: {text} (e.g. 640)" if "img-size" in option else f"error: {text}"]


def test_predict_recursive_folder(det_ckpt: Path, synth_cub_root: Path, tmp_path: Path) -> None:
    images = synth_cub_root / "CUB_200_2011" / "images"
    total = len(list(images.rglob("*.jpg")))
    argv = ["--weights", str(det_ckpt), "--source", str(images), "--recursive", "--out", str(tmp_path / "r")]
    assert run_tool(load_tool("predict").main, argv) == 0
    assert len(json.loads((tmp_path / "r" / "predictions.json").read_text())) == total
    flat = ["--weights", str(det_ckpt), "--source", str(images), "--out", str(tmp_path / "f")]
    assert run_tool(load_tool("predict").main, flat) == 2  # the top folder holds only class folders


def test_model_info_counts_and_flops(det_ckpt: Path) -> None:
    from ultralytics.nn import tasks

    from detect.models.info import model_info

    info = load(det_ckpt, device="cpu").info(verbose=False)
    assert info["params"] == 3_011_043 and info["img_size"] == (128, 128)  # Ultralytics' yolov8n, nc=1
    full = model_info(build_yolo("n", 80), 640)
    assert full["params"] == 3_157_200 and abs(full["gflops"] - 8.7) < 0.15
    theirs = tasks.DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    assert model_info(theirs, 640)["gflops"] == pytest.approx(full["gflops"], rel=1e-3)


def test_bf16_falls_back_to_fp32_with_one_warning_without_native_bf16(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import detect.precision as precision

    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": False)
    monkeypatch.setattr(precision, "_WARNED", set())
    monkeypatch.delenv("PLUGDET_FORCE_BF16", raising=False)
    capsys.readouterr()
    assert precision.choose_bf16("cpu", True, "--bf16") is False
    assert precision.choose_bf16("cpu", True, "--bf16") is False
    assert precision.choose_bf16("cpu", False, "--bf16") is False
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --bf16 ignored: this CPU") and "running fp32" in lines[0]
    monkeypatch.setenv("PLUGDET_FORCE_BF16", "1")
    assert precision.choose_bf16("cpu", True, "--bf16") is True
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": True)
    monkeypatch.delenv("PLUGDET_FORCE_BF16")
    assert precision.choose_bf16("cpu", True, "train.precision") is True and capsys.readouterr().err == ""
