"""Parity with Ultralytics YOLOv8: same outputs after importing its weights, same parameter counts, name mapping."""

from __future__ import annotations

import copy
import datetime
import os
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", "/tmp/ycfg")
tasks = pytest.importorskip("ultralytics.nn.tasks")

from backbones.errors import UserError  # noqa: E402
from detect import build_yolo  # noqa: E402
from detect.boxes import cxcywh2xyxy  # noqa: E402
from detect.interop.ultralytics import (  # noqa: E402
    from_ultralytics,
    our_key_to_ultralytics,
    to_ultralytics_state_dict,
    ultralytics_key_to_ours,
)

SCALES = ["n", "s", "m", "l", "x"]
# l and x take most of this file's time on a busy machine: marked slow (they still run in `make test`).
PARITY_SCALES = ["n", "s", "m", pytest.param("l", marks=pytest.mark.slow), pytest.param("x", marks=pytest.mark.slow)]


def _ultralytics_model(scale: str, num_classes: int = 80, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised YOLOv8 with random BatchNorm statistics and spread-out class and box logits."""
    torch.manual_seed(seed)
    model = tasks.DetectionModel(f"yolov8{scale}.yaml", nc=num_classes, verbose=False)
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_bn(model, generator=gen)
    with torch.no_grad():
        detect = model.model[-1]
        for seq in detect.cv3:
            seq[-1].bias.normal_(0.0, 1.0, generator=gen)  # scores spread over (0, 1), not all ~0
        for seq in detect.cv2:
            seq[-1].weight.mul_(5.0)  # peaked bin distributions: distances vary over the whole range
    return model.eval()


def _theirs_as_ours(output: torch.Tensor) -> torch.Tensor:
    """Ultralytics' eval output [B, 4 + C, A] (cxcywh) -> [B, A, 4 + C] (xyxy)."""
    output = output.transpose(1, 2)  # [B, A, 4 + C]
    return torch.cat((cxcywh2xyxy(output[..., :4]), output[..., 4:]), dim=-1)


def _max_diffs(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    return (ours[..., :4] - reference[..., :4]).abs().max().item(), (
        ours[..., 4:] - reference[..., 4:]
    ).abs().max().item()


@pytest.mark.parametrize("scale", PARITY_SCALES)
@torch.no_grad()
def test_eval_outputs_equal_ultralytics(scale: str) -> None:
    theirs = _ultralytics_model(scale)
    ours = from_ultralytics(theirs)
    assert not ours.training and ours.num_classes == 80
    images = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(2))
    reference = _theirs_as_ours(theirs(images)[0])
    preds = ours(images)
    assert preds.shape == reference.shape == (1, 16 * 20 + 8 * 10 + 4 * 5, 84)
    assert reference[..., 4:].std() > 0.1  # the comparison is not between near-constant scores
    box_diff, score_diff = _max_diffs(preds, reference)
    assert box_diff <= 1e-4 and score_diff <= 1e-4, (box_diff, score_diff)


@pytest.mark.parametrize("num_classes", [1, 80, 200])
@pytest.mark.parametrize("scale", SCALES)
def test_parameter_counts_equal_ultralytics(scale: str, num_classes: int) -> None:
    spec = tasks.yaml_model_load(f"yolov8{scale}.yaml")  # what DetectionModel builds, minus its init passes
    spec["nc"] = num_classes
    with torch.device("meta"):  # parameters without storage: counting is all we need
        ours = build_yolo(scale, num_classes=num_classes)
        theirs, _ = tasks.parse_model(spec, ch=3, verbose=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == trainable


def test_key_mapping_is_a_bijection() -> None:
    theirs = tasks.DetectionModel("yolov8m.yaml", nc=5, verbose=False).state_dict()
    with torch.device("meta"):
        ours = build_yolo("m", num_classes=5).state_dict()
    mapped = {ultralytics_key_to_ours(k) for k in theirs}
    assert mapped == set(ours)
    assert all(our_key_to_ultralytics(ultralytics_key_to_ours(k)) == k for k in theirs)
    assert ultralytics_key_to_ours("model.2.m.0.cv1.conv.weight") == "backbone.stages.0.c2f.blocks.0.conv1.conv.weight"
    assert ultralytics_key_to_ours("model.9.cv1.bn.running_var") == "backbone.stages.3.sppf.reduce_conv.bn.running_var"
    assert ultralytics_key_to_ours("model.22.cv3.2.2.bias") == "head.cls_branch.2.pred.bias"
    assert ultralytics_key_to_ours("model.16.conv.weight") == "neck.downsample_p3.conv.weight"


@torch.no_grad()
def test_round_trip_to_ultralytics_state_dict() -> None:
    torch.manual_seed(3)
    ours = build_yolo("n", num_classes=7).eval()
    theirs = tasks.DetectionModel("yolov8n.yaml", nc=7, verbose=False)
    theirs.load_state_dict(to_ultralytics_state_dict(ours), strict=True)
    theirs.eval()
    images = torch.rand(2, 3, 64, 96)
    box_diff, score_diff = _max_diffs(ours(images), _theirs_as_ours(theirs(images)[0]))
    assert box_diff <= 1e-4 and score_diff <= 1e-6


@torch.no_grad()
def test_checkpoint_file_yolo_object_and_nc(tmp_path: Path) -> None:
    theirs = _ultralytics_model("n", num_classes=3)
    path = tmp_path / "best.pt"
    half = copy.deepcopy(theirs).half()  # Ultralytics' trainer saves fp16 models
    torch.save({"model": half, "ema": None, "epoch": 9, "train_args": {"imgsz": 640}}, path)
    from_file = from_ultralytics(path)
    from_memory = from_ultralytics(half)
    assert from_file.num_classes == 3
    trainable = {name for name, p in from_file.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in from_file.named_parameters()} - {"head.dfl_bins"}
    images = torch.rand(1, 3, 64, 64)
    assert torch.equal(from_file(images), from_memory(images))

    from ultralytics import YOLO

    wrapped = YOLO("yolov8n.yaml", verbose=False)  # built from the yaml; nothing downloaded
    assert from_ultralytics(wrapped).backbone.stem.conv.out_channels == 16


def test_unsafe_pickle_needs_explicit_trust(tmp_path: Path) -> None:
    theirs = tasks.DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    path = tmp_path / "odd.pt"
    torch.save({"model": theirs, "date": datetime.date(2024, 1, 1)}, path)  # a global outside the allow-list
    with pytest.raises(UserError, match="trust_pickle=True"):
        from_ultralytics(path)
    assert from_ultralytics(path, trust_pickle=True).num_classes == 2


def test_bad_sources_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        from_ultralytics(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="not a YOLOv8 detection model"):
        from_ultralytics(tasks.DetectionModel("yolo12n.yaml", nc=80, verbose=False))  # YOLO11 loads: test_yolo11.py
    with pytest.raises(UserError, match="expected a YOLO"):
        from_ultralytics(torch.nn.Linear(2, 2))
    fused = tasks.DetectionModel("yolov8n.yaml", nc=80, verbose=False).fuse(verbose=False)
    with pytest.raises(UserError, match="not a YOLOv8"):
        from_ultralytics(fused)
    with torch.device("meta"):
        foreign = build_yolo("n", backbone="resnet18")
    with pytest.raises(UserError, match="no Ultralytics counterpart"):
        to_ultralytics_state_dict(foreign)
