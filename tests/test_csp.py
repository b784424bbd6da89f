"""Tests for backbones/csp.py: YOLOv8 scales, exact parameter counts and numerical parity with Ultralytics."""

from __future__ import annotations

import os

import pytest
import torch

from backbones.csp import CSP_SCALES, CSPDarknet, build_cspdarknet, scale_depth, scale_width
from backbones.errors import UserError

# Ultralytics yolov8{n,s,m,l,x}.yaml, layers 0-9 (the backbone), counted from their DetectionModel.
ULTRALYTICS_BACKBONE_PARAMS = {
    "n": 1_272_656,
    "s": 5_079_712,
    "m": 11_855_856,
    "l": 19_808_576,
    "x": 30_943_120,
}


def test_scale_helpers() -> None:
    assert scale_width(64, 0.25, 1024) == 16
    assert scale_width(1024, 0.25, 1024) == 256
    assert scale_width(1024, 0.75, 768) == 576
    assert scale_width(1024, 1.25, 512) == 640
    assert scale_width(100, 0.33, 1024) == 40  # 33 rounded up to a multiple of 8
    assert scale_depth(3, 0.33) == 1
    assert scale_depth(6, 0.33) == 2
    assert scale_depth(6, 0.67) == 4
    assert scale_depth(3, 0.67) == 2
    assert scale_depth(1, 0.33) == 1
    assert scale_depth(2, 0.1) == 1


@pytest.mark.parametrize("scale", list(CSP_SCALES))
def test_parameter_counts_equal_ultralytics(scale: str) -> None:
    model = build_cspdarknet(scale)
    assert sum(p.numel() for p in model.parameters()) == ULTRALYTICS_BACKBONE_PARAMS[scale]


def test_parameter_counts_equal_live_ultralytics() -> None:
    """The constants above, recounted from Ultralytics' own models built from yaml (no download)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    for scale, expected in ULTRALYTICS_BACKBONE_PARAMS.items():
        reference = tasks.DetectionModel(f"yolov8{scale}.yaml", nc=80, verbose=False)
        assert sum(p.numel() for p in reference.model[:10].parameters()) == expected


def test_structure_names_and_outputs() -> None:
    model = CSPDarknet(*CSP_SCALES["n"])
    assert [name for name, _ in model.named_children()] == ["stem", "stages"]
    assert [list(dict(stage.named_children())) for stage in model.stages] == [
        ["downsample", "c2f"],
        ["downsample", "c2f"],
        ["downsample", "c2f"],
        ["downsample", "c2f", "sppf"],
    ]
    assert [len(stage.c2f.blocks) for stage in model.stages] == [1, 2, 2, 1]
    assert model.out_channels == (64, 128, 256)
    assert model.strides == (8, 16, 32)
    stages = model.stage_modules()
    assert len(stages) == 5 and stages[0] is model.stem
    assert sum(p.numel() for s in stages for p in s.parameters()) == sum(p.numel() for p in model.parameters())
    outputs = model(torch.zeros(1, 3, 100, 132))  # ceil(100/8)=13, ceil(132/8)=17
    assert [tuple(o.shape) for o in outputs] == [(1, 64, 13, 17), (1, 128, 7, 9), (1, 256, 4, 5)]


def test_unknown_scale() -> None:
    with pytest.raises(UserError, match="unknown CSP-Darknet scale 'q'"):
        build_cspdarknet("q")


def test_parity_with_ultralytics_yolov8n() -> None:
    """Copy Ultralytics' layers 0-9 tensor by tensor; our C3/C4/C5 must equal its layers 4, 6 and 9."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    reference = tasks.DetectionModel("yolov8n.yaml", nc=80, verbose=False).eval()
    layers = reference.model[:10]
    # Random BN statistics and affine parameters so that every tensor matters.
    with torch.no_grad():
        for module in layers.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    theirs = list(layers.state_dict().values())
    model = build_cspdarknet("n").eval()
    ours = model.state_dict()
    assert len(ours) == len(theirs)
    for (key, mine), other in zip(ours.items(), theirs, strict=True):
        assert mine.shape == other.shape, key
        ours[key] = other
    model.load_state_dict(ours)
    for module in layers.modules():  # BN settings come from Ultralytics' own weight initialisation
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.eps == 1e-3 and module.momentum == 0.03

    x = torch.rand(1, 3, 256, 320)
    with torch.no_grad():
        expected = []
        y = x
        for i, layer in enumerate(layers):
            y = layer(y)
            if i in (4, 6, 9):
                expected.append(y)
        outputs = model(x)
    for out, ref in zip(outputs, expected, strict=True):
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() < 1e-5
