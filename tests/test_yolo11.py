"""The YOLO11 detector (csp11 backbone + yolo11 neck + yolo11 head) against Ultralytics' yolo11*.yaml: parameter
counts, eval outputs after `from_ultralytics`, the loss on the same predictions, family and scale detection, keys."""

from __future__ import annotations

import copy
import logging
import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import randomize_bn
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", "/tmp/plugdet-yolo-config")
tasks = pytest.importorskip("ultralytics.nn.tasks")

from backbones.errors import UserError  # noqa: E402
from detect.boxes import cxcywh2xyxy, xyxy2cxcywh  # noqa: E402
from detect.interop.ultralytics import (  # noqa: E402
    from_ultralytics,
    to_ultralytics_state_dict,
    ultralytics_family,
)
from detect.interop.ultralytics11 import our_key_to_yolo11, uses_c3k_everywhere, yolo11_key_to_ours  # noqa: E402
from detect.losses import build_criterion  # noqa: E402
from detect.models import DetectorSpec, PartSpec, build_detector, build_yolo  # noqa: E402
from detect.models.necks.pan11 import PAN11  # noqa: E402

SCALES = ["n", "s", "m", "l", "x"]
# Ultralytics' yolo11.yaml summary lines (80 classes), DESIGN §5.
YOLO11_PARAMS = {"n": 2_624_080, "s": 9_458_752, "m": 20_114_688, "l": 25_372_160, "x": 56_966_176}
IMAGE_SIZE = (128, 160)


def _spec(scale: str, num_classes: int = 80) -> DetectorSpec:
    return DetectorSpec(
        num_classes, PartSpec(f"csp11_{scale}"), PartSpec("yolo11", {"scale": scale}), PartSpec("yolo11", {})
    )


def _ultralytics_model(scale: str, num_classes: int = 80, seed: int = 0) -> nn.Module:
    """A randomly initialised YOLO11 with random BatchNorm statistics and spread-out class and box logits."""
    torch.manual_seed(seed)
    model = tasks.DetectionModel(f"yolo11{scale}.yaml", nc=num_classes, verbose=False)
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_bn(model, generator=gen)
    with torch.no_grad():
        detect = model.model[-1]
        for seq in detect.cv3:
            seq[-1].bias.normal_(0.0, 1.0, generator=gen)  # scores spread over (0, 1), not all ~0
        for seq in detect.cv2:
            seq[-1].weight.mul_(5.0)  # peaked bin distributions: distances vary over the whole range
    return model.eval()


class _Layers(nn.Module):
    """Ultralytics' layers without DetectionModel's init passes (what `from_ultralytics` reads: `.model`, `.yaml`)."""

    def __init__(self, scale: str) -> None:
        super().__init__()
        self.yaml = copy.deepcopy(tasks.yaml_model_load(f"yolo11{scale}.yaml"))
        self.model = tasks.parse_model(copy.deepcopy(self.yaml), ch=3, verbose=False)[0]


def _theirs_as_ours(output: torch.Tensor) -> torch.Tensor:
    """Ultralytics' eval output [B, 4 + C, A] (cxcywh) -> [B, A, 4 + C] (xyxy)."""
    output = output.transpose(1, 2)  # [B, A, 4 + C]
    return torch.cat((cxcywh2xyxy(output[..., :4]), output[..., 4:]), dim=-1)


@pytest.mark.parametrize("scale", SCALES)
def test_parameter_counts_equal_ultralytics(scale: str) -> None:
    spec = copy.deepcopy(tasks.yaml_model_load(f"yolo11{scale}.yaml"))
    spec["nc"] = 80
    with torch.device("meta"):  # parameters without storage: counting is all we need
        ours = build_detector(_spec(scale))
        theirs, _ = tasks.parse_model(spec, ch=3, verbose=False)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == YOLO11_PARAMS[scale]
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == trainable == count - 16  # the DFL bins


def test_build_yolo_family_yolo11_is_the_same_spec() -> None:
    with torch.device("meta"):
        ours = build_yolo("s", 80, family="yolo11")
    assert isinstance(ours.neck, PAN11)
    assert sum(p.numel() for p in ours.parameters()) == YOLO11_PARAMS["s"]


@pytest.mark.parametrize(
    "scale", ["n", "s", "m", pytest.param("l", marks=pytest.mark.slow), pytest.param("x", marks=pytest.mark.slow)]
)
@torch.no_grad()
def test_eval_outputs_equal_ultralytics(scale: str) -> None:
    """Boxes within 1e-4 px (the cxcywh -> xyxy conversion rounds), scores bit-identical."""
    theirs = _ultralytics_model(scale)
    ours = from_ultralytics(theirs)
    assert not ours.training and ours.num_classes == 80
    images = torch.rand(2, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    reference = _theirs_as_ours(theirs(images)[0])
    preds = ours(images)
    assert preds.shape == reference.shape == (2, 16 * 20 + 8 * 10 + 4 * 5, 84)
    assert reference[..., 4:].std() > 0.1  # the comparison is not between near-constant scores
    assert (preds[..., :4] - reference[..., :4]).abs().max().item() <= 1e-4
    assert torch.equal(preds[..., 4:], reference[..., 4:])


@torch.no_grad()
def test_train_outputs_equal_ultralytics() -> None:
    """Train mode (batch statistics): our raw level maps are Ultralytics' box and class logits, bit for bit."""
    theirs = _ultralytics_model("n").train()
    ours = from_ultralytics(theirs).train()
    images = torch.rand(2, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    reference = theirs(images)
    levels = ours(images)
    flat = torch.cat([level.flatten(2) for level in levels], dim=2)  # [B, 64 + C, A]
    assert torch.equal(flat[:, :64], reference["boxes"]) and torch.equal(flat[:, 64:], reference["scores"])


@pytest.fixture(scope="module")
def ultralytics_train_outputs() -> tuple[dict[str, Any], Any, Any]:
    """Ultralytics' train-mode outputs of yolo11n on a batch of 4, its v8DetectionLoss, and our criterion."""
    from ultralytics.utils.loss import v8DetectionLoss

    model = _ultralytics_model("n", num_classes=80)
    criterion = build_criterion(from_ultralytics(model).head)  # built by the yolo11 head family
    model.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)  # v8DetectionLoss reads model.args.box / .cls / .dfl
    model.train()
    with torch.no_grad():
        outputs = model(torch.rand(4, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0)))
    return outputs, v8DetectionLoss(model), criterion


def _targets(counts: list[int], seed: int) -> torch.Tensor:
    """Rows (image_index, class_id, x1, y1, x2, y2) in pixels, sorted by image; boxes 3 to 90 pixels wide."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    size = torch.tensor(IMAGE_SIZE[::-1], dtype=torch.float32)  # (W, H)
    for image, count in enumerate(counts):
        centre = torch.rand(count, 2, generator=gen) * size
        extent = torch.rand(count, 2, generator=gen) * 87 + 3
        boxes = torch.cat((centre - extent / 2, centre + extent / 2), 1)
        boxes = torch.minimum(boxes.clamp(min=0), size.repeat(2))
        labels = torch.randint(0, 80, (count, 1), generator=gen).float()
        rows.append(torch.cat((torch.full((count, 1), float(image)), labels, boxes), 1))
    return torch.cat(rows)


@pytest.mark.parametrize(("counts", "noise"), [([3, 0, 5, 1], 0.0), ([1, 12, 0, 2], 1.0), ([0, 0, 0, 0], 1.0)])
def test_loss_parts_equal_ultralytics(ultralytics_train_outputs: tuple, counts: list[int], noise: float) -> None:
    outputs, their_criterion, criterion = ultralytics_train_outputs
    gen = torch.Generator().manual_seed(len(counts) + int(noise * 10))
    box_leaf = (outputs["boxes"] + noise * torch.randn(outputs["boxes"].shape, generator=gen)).requires_grad_()
    cls_leaf = (outputs["scores"] + noise * torch.randn(outputs["scores"].shape, generator=gen)).requires_grad_()
    targets = _targets(counts, seed=sum(counts))
    height, width = IMAGE_SIZE
    batch = {
        "batch_idx": targets[:, 0],
        "cls": targets[:, 1:2],
        "bboxes": xyxy2cxcywh(targets[:, 2:]) / torch.tensor([width, height, width, height]),
        "img": torch.zeros(4, 3, height, width),
    }
    their_total, their_parts = their_criterion(
        {"boxes": box_leaf, "scores": cls_leaf, "feats": outputs["feats"]}, batch
    )

    levels, start = [], 0  # our head layout: one [B, 4 * 16 + C, H, W] map per level
    for feat in outputs["feats"]:
        level_height, level_width = feat.shape[2:]
        stop = start + level_height * level_width
        level = torch.cat((box_leaf[..., start:stop], cls_leaf[..., start:stop]), 1)  # [B, 64 + C, H*W]
        levels.append(level.view(4, -1, level_height, level_width))
        start = stop
    total, parts = criterion(levels, targets)

    for ours_key, their_key in (("box", "box_loss"), ("cls", "cls_loss"), ("dfl", "dfl_loss")):
        torch.testing.assert_close(parts[ours_key], their_parts[their_key], rtol=1e-4, atol=1e-7, msg=ours_key)
    torch.testing.assert_close(total, their_total.sum(), rtol=1e-4, atol=1e-6)
    assert (parts["box"] > 0) == (sum(counts) > 0)


def test_from_ultralytics_names_the_family(caplog: pytest.LogCaptureFixture) -> None:
    v8 = tasks.DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    yolo11 = tasks.DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    assert ultralytics_family(v8.state_dict()) == "yolov8"
    assert ultralytics_family(yolo11.state_dict()) == "yolo11"
    with caplog.at_level(logging.INFO, logger="plugdet"):
        from_v8 = from_ultralytics(v8)
        from_11 = from_ultralytics(yolo11)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("loaded Ultralytics YOLOv8n (3 classes)") for m in messages), messages
    assert any(m.startswith("loaded Ultralytics YOLO11n (3 classes)") for m in messages), messages
    assert not isinstance(from_v8.neck, PAN11) and isinstance(from_11.neck, PAN11)
    assert hasattr(from_11.head.cls_branch[0], "depthwise1") and not hasattr(from_v8.head.cls_branch[0], "depthwise1")


@pytest.mark.parametrize("scale", SCALES)
def test_scale_detection(scale: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every scale is found, m and l (same stem width 64) by their depth; a yaml saying otherwise is an error."""
    with torch.device("meta"):
        layers = _Layers(scale)
        with caplog.at_level(logging.INFO, logger="plugdet"):
            detector = from_ultralytics(layers)
    assert any(r.getMessage().startswith(f"loaded Ultralytics YOLO11{scale} (80 classes)") for r in caplog.records)
    assert sum(p.numel() for p in detector.parameters()) == YOLO11_PARAMS[scale]
    layers.yaml["scale"] = "l" if scale == "m" else "m"
    with pytest.raises(UserError, match="stem width and depth are that of"), torch.device("meta"):
        from_ultralytics(layers)


def test_foreign_yolo11_layouts_are_user_errors() -> None:
    seg = tasks.SegmentationModel("yolo11n-seg.yaml", nc=2, verbose=False)
    with pytest.raises(UserError, match="not a YOLO11 detection model: no plugdet counterpart for key 'model.23.proto"):
        from_ultralytics(seg)
    fused = tasks.DetectionModel("yolo11n.yaml", nc=2, verbose=False).fuse(verbose=False)
    with pytest.raises(UserError, match="not a YOLO11n detection layout"):
        from_ultralytics(fused)


@pytest.mark.parametrize("scale", ["n", "m"])
def test_key_round_trip_over_every_key(scale: str) -> None:
    theirs = _Layers(scale).state_dict()  # `model.<i>....` keys, as in a DetectionModel
    c3k = uses_c3k_everywhere(theirs)
    assert c3k is (scale == "m")
    assert all(our_key_to_yolo11(yolo11_key_to_ours(k, c3k)) == k for k in theirs)
    with torch.device("meta"):
        ours = build_detector(_spec(scale)).state_dict()
    assert {yolo11_key_to_ours(k, c3k) for k in theirs} == set(ours)
    assert {our_key_to_yolo11(k) for k in ours} == set(theirs)


@torch.no_grad()
def test_round_trip_to_ultralytics_state_dict() -> None:
    torch.manual_seed(3)
    ours = build_detector(_spec("n", num_classes=7)).eval()
    theirs = tasks.DetectionModel("yolo11n.yaml", nc=7, verbose=False)
    theirs.load_state_dict(to_ultralytics_state_dict(ours), strict=True)
    theirs.eval()
    images = torch.rand(2, 3, 64, 96)
    preds, reference = ours(images), _theirs_as_ours(theirs(images)[0])
    assert (preds[..., :4] - reference[..., :4]).abs().max().item() <= 1e-4
    assert torch.equal(preds[..., 4:], reference[..., 4:])
