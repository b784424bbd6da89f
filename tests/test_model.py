"""Detector / build_yolo: YOLOv8 parameter counts, train/eval outputs, any backbone, weights, inference options."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn

from backbones.checkpoint import save_backbone
from backbones.errors import UserError
from backbones.registry import build_backbone
from detect import Detector, build_yolo


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("scale", "num_classes", "expected"),
    [
        ("n", 80, 3_157_200),
        ("s", 80, 11_166_560),
        ("m", 80, 25_902_640),
        ("l", 80, 43_691_520),
        ("x", 80, 68_229_648),
        ("n", 1, 3_011_043),
        ("n", 200, 3_376_440),
    ],
)
def test_parameter_counts_are_yolov8s(scale: str, num_classes: int, expected: int) -> None:
    # Ultralytics' counts include the 16 frozen DFL bins (yolov8n: 3,157,200 parameters, 3,157,184 trainable).
    with torch.device("meta"):
        model = build_yolo(scale, num_classes=num_classes)
    assert _num_params(model) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected - 16


def test_train_and_eval_outputs() -> None:
    torch.manual_seed(0)
    model = build_yolo("n", num_classes=3)
    assert (model.num_classes, model.strides, model.head.reg_max) == (3, (8, 16, 32), 16)
    assert [name for name, _ in model.named_children()] == ["backbone", "neck", "head"]
    images = torch.rand(2, 3, 64, 96)
    levels = model(images)
    assert [tuple(o.shape) for o in levels] == [(2, 67, 8, 12), (2, 67, 4, 6), (2, 67, 2, 3)]
    model.eval()
    with torch.no_grad():
        preds = model(images)
    assert preds.shape == (2, 96 + 24 + 6, 4 + 3)
    assert torch.all((preds[..., 4:] > 0) & (preds[..., 4:] < 1))
    assert torch.all(preds[..., 2:4] >= preds[..., 0:2])  # xyxy: non-negative distances


def test_unknown_scale_lists_the_scales() -> None:
    with pytest.raises(UserError, match=r"'q'.*n, s, m, l, x"):
        build_yolo("q")


@pytest.mark.parametrize("name", ["resnet18", "tv:mobilenet_v3_small"])
def test_any_registered_backbone(name: str) -> None:
    model = build_yolo("n", num_classes=2, backbone=name).eval()
    assert model.neck.in_channels == tuple(model.backbone.out_channels)
    with torch.no_grad():
        preds = model(torch.rand(1, 3, 64, 64))
    assert preds.shape == (1, 64 + 16 + 4, 6)


def test_backbone_weights_are_loaded_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    trained = build_backbone("cspdarknet_n")
    torch.nn.init.normal_(trained.stem.conv.weight)
    path = tmp_path / "backbone.pt"
    save_backbone(path, trained, "cspdarknet_n")
    with caplog.at_level(logging.INFO, logger="plugdet"):
        model = build_yolo("n", backbone_weights=path)
    assert torch.equal(model.backbone.stem.conv.weight, trained.stem.conv.weight)
    count = len(trained.state_dict())
    assert f"transferred {count} tensors" in caplog.text
    with pytest.raises(UserError, match="cspdarknet_n"):
        build_yolo("s", backbone_weights=path)


@torch.no_grad()
def test_fuse_keeps_outputs_and_refuses_training() -> None:
    torch.manual_seed(0)
    model = build_yolo("n", num_classes=4)
    randomize_bn(model)
    for branch in model.head.cls_branch:
        branch.pred.bias.normal_()
    model.eval()
    images = torch.rand(1, 3, 64, 64)
    reference = model(images)
    fused = model.fuse()
    assert fused is model and model.fused
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    out = model(images)
    assert (out[..., :4] - reference[..., :4]).abs().max() < 1e-3  # pixels
    assert (out[..., 4:] - reference[..., 4:]).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="fused"):
        model.train()


@pytest.mark.parametrize("name", ["resnet18", "tv:mobilenet_v3_small"])
@torch.no_grad()
def test_fuse_other_backbones(name: str) -> None:
    torch.manual_seed(0)
    model = build_yolo("n", num_classes=2, backbone=name)
    randomize_bn(model)
    model.eval()
    images = torch.rand(1, 3, 64, 64)
    reference = model(images)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    out = model.fuse()(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # conv-bn pairs of every kind
    torch.testing.assert_close(out, reference, atol=1e-3, rtol=1e-4)


@torch.no_grad()
def test_channels_last_and_bf16_autocast_options() -> None:
    torch.manual_seed(0)
    model = build_yolo("n", num_classes=4)
    randomize_bn(model)
    model.eval()
    images = torch.rand(1, 3, 64, 64)
    reference = model(images)
    model = model.to(memory_format=torch.channels_last)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(images_cl), reference, atol=1e-3, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images_cl)
    assert low.dtype == torch.float32
    assert (low[..., 4:] - reference[..., 4:]).abs().max() < 0.05


def test_detector_class_is_exported() -> None:
    assert isinstance(build_yolo("n", num_classes=1), Detector)
