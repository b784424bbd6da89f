"""Tests for detect/losses/yolo.py: DFL and padding by hand, and parity with Ultralytics' v8DetectionLoss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from backbones.errors import UserError
from detect.boxes import xyxy2cxcywh
from detect.losses.yolo import build_yolo_loss, distribution_focal_loss, pad_targets

NUM_CLASSES = 3
SIZE = 128
STRIDES = (8, 16, 32)


def test_distribution_focal_loss_by_hand() -> None:
    logits = torch.zeros(1, 4, 16)  # uniform over 16 bins: -log p = log 16 for every bin
    target = torch.tensor([[3.0, 3.5, 0.0, 14.99]])
    torch.testing.assert_close(distribution_focal_loss(logits, target), torch.tensor([math.log(16)]))
    peaked = torch.full((1, 4, 16), -1e4)
    peaked[0, :, 3] = 0.0  # all mass on bin 3
    loss = distribution_focal_loss(peaked, torch.tensor([[3.0, 3.0, 3.0, 3.0]]))
    torch.testing.assert_close(loss, torch.tensor([0.0]))
    half = torch.full((1, 4, 16), -1e4)
    half[0, :, 3:5] = 0.0  # p = 0.5 on bins 3 and 4; target 3.5 -> 0.5 * log 2 + 0.5 * log 2
    torch.testing.assert_close(distribution_focal_loss(half, torch.full((1, 4), 3.5)), torch.tensor([math.log(2)]))


def test_pad_targets_groups_unsorted_rows() -> None:
    targets = torch.tensor(
        [[2, 1, 0, 0, 5, 5], [0, 2, 1, 1, 4, 4], [2, 0, 2, 2, 9, 9], [0, 1, 3, 3, 7, 7]], dtype=torch.float32
    )
    labels, boxes, mask = pad_targets(targets, batch_size=3)
    assert labels.shape == (3, 2, 1) and boxes.shape == (3, 2, 4)
    assert mask.squeeze(-1).tolist() == [[1, 1], [0, 0], [1, 1]]
    assert labels.squeeze(-1).tolist() == [[2, 1], [0, 0], [1, 0]]  # original order kept within an image
    assert boxes[2].tolist() == [[0, 0, 5, 5], [2, 2, 9, 9]]
    labels, boxes, mask = pad_targets(torch.zeros(0, 6), batch_size=2)
    assert labels.shape == (2, 0, 1) and boxes.shape == (2, 0, 4) and mask.shape == (2, 0, 1)
    with pytest.raises(UserError, match="image index"):
        pad_targets(targets, batch_size=2)


def random_levels(batch: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    channels = 64 + NUM_CLASSES
    return [torch.randn(batch, channels, SIZE // s, SIZE // s, generator=gen) for s in STRIDES]


def test_empty_batch_has_only_class_loss() -> None:
    levels = [level.requires_grad_() for level in random_levels(2)]
    total, parts = build_yolo_loss(NUM_CLASSES, STRIDES)(levels, torch.zeros(0, 6))
    assert parts["box"].item() == 0.0 and parts["dfl"].item() == 0.0
    cls_logits = torch.cat([level.detach().flatten(2) for level in levels], 2)[:, 64:]  # [B, C, A]
    expected = F.binary_cross_entropy_with_logits(cls_logits, torch.zeros_like(cls_logits), reduction="sum") * 0.5
    torch.testing.assert_close(parts["cls"], expected)
    torch.testing.assert_close(total.detach(), expected * 2)
    total.backward()
    assert all(level.grad is not None and torch.isfinite(level.grad).all() for level in levels)


def test_unsorted_targets_and_wrong_channels() -> None:
    levels = random_levels(2)
    targets = torch.tensor([[1, 0, 10, 10, 60, 70], [0, 2, 30, 5, 90, 50], [1, 1, 64, 64, 120, 127]], dtype=torch.float)
    loss = build_yolo_loss(NUM_CLASSES, STRIDES)
    _, sorted_parts = loss(levels, targets[targets[:, 0].argsort(stable=True)])
    _, parts = loss(levels, targets)
    assert parts == sorted_parts
    with pytest.raises(UserError, match="expected \\[B, 68, H, W\\]"):
        build_yolo_loss(NUM_CLASSES + 1, STRIDES)(levels, targets)
    with pytest.raises(UserError, match="class ids \\[3.0\\] out of range"):
        loss(levels, torch.tensor([[0, 3, 10, 10, 60, 70]], dtype=torch.float))


@pytest.fixture(scope="module")
def ultralytics_model() -> tuple:
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.loss import v8DetectionLoss

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=NUM_CLASSES, verbose=False)
    model.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)  # v8DetectionLoss reads model.args.box / .cls / .dfl
    model.train()
    with torch.no_grad():
        outputs = model(torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    return outputs, v8DetectionLoss(model)


def make_targets(counts: list[int], seed: int) -> torch.Tensor:
    """Rows (image_index, class_id, x1, y1, x2, y2) in pixels, sorted by image; boxes 3 to 90 pixels wide."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for image, count in enumerate(counts):
        centre = torch.rand(count, 2, generator=gen) * SIZE
        size = torch.rand(count, 2, generator=gen) * 87 + 3
        boxes = torch.cat((centre - size / 2, centre + size / 2), 1).clamp(0, SIZE)
        labels = torch.randint(0, NUM_CLASSES, (count, 1), generator=gen).float()
        rows.append(torch.cat((torch.full((count, 1), float(image)), labels, boxes), 1))
    return torch.cat(rows)


@pytest.mark.parametrize(
    ("counts", "noise"),
    [([3, 0, 5, 1], 0.0), ([3, 0, 5, 1], 2.0), ([1, 12, 0, 2], 1.0), ([0, 0, 0, 0], 1.0)],
)
def test_parity_with_ultralytics(ultralytics_model: tuple, counts: list[int], noise: float) -> None:
    outputs, criterion = ultralytics_model
    gen = torch.Generator().manual_seed(len(counts) + int(noise * 10))
    box_leaf = (outputs["boxes"] + noise * torch.randn(outputs["boxes"].shape, generator=gen)).requires_grad_()
    cls_leaf = (outputs["scores"] + noise * torch.randn(outputs["scores"].shape, generator=gen)).requires_grad_()
    targets = make_targets(counts, seed=sum(counts))
    batch = {
        "batch_idx": targets[:, 0],
        "cls": targets[:, 1:2],
        "bboxes": xyxy2cxcywh(targets[:, 2:]) / SIZE,
        "img": torch.zeros(4, 3, SIZE, SIZE),
    }
    their_total, their_parts = criterion({"boxes": box_leaf, "scores": cls_leaf, "feats": outputs["feats"]}, batch)
    their_total.sum().backward()
    their_grads = box_leaf.grad.clone(), cls_leaf.grad.clone()
    box_leaf.grad, cls_leaf.grad = None, None

    levels, start = [], 0  # our head layout: one [B, 4 * 16 + C, H, W] map per level
    for feat in outputs["feats"]:
        height, width = feat.shape[2:]
        stop = start + height * width
        level = torch.cat((box_leaf[..., start:stop], cls_leaf[..., start:stop]), 1)  # [B, 64 + C, H*W]
        levels.append(level.view(4, -1, height, width))
        start = stop
    total, parts = build_yolo_loss(NUM_CLASSES, STRIDES)(levels, targets)
    total.backward()

    for ours_key, their_key in (("box", "box_loss"), ("cls", "cls_loss"), ("dfl", "dfl_loss")):
        torch.testing.assert_close(parts[ours_key], their_parts[their_key], rtol=1e-4, atol=1e-7, msg=ours_key)
    torch.testing.assert_close(total, their_total.sum(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(box_leaf.grad, their_grads[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cls_leaf.grad, their_grads[1], rtol=1e-4, atol=1e-7)
    if sum(counts):
        assert parts["box"] > 0 and parts["dfl"] > 0
    else:
        assert parts["box"] == 0 and parts["dfl"] == 0


@pytest.mark.parametrize("kind", ["ciou", "diou", "giou", "iou"])
def test_the_box_overlap_kind_is_a_setting_of_the_loss_and_the_assigner(kind: str) -> None:
    """`loss.iou` / `assign.iou`: the box part is 1 - that overlap; the four kinds give four different box parts."""
    torch.manual_seed(0)
    levels = [torch.randn(2, 4 * 16 + NUM_CLASSES, 256 // s, 256 // s) for s in STRIDES]
    targets = torch.tensor([[0, 1, 30.0, 40, 120, 160], [1, 0, 10, 10, 200, 90]])
    loss = build_yolo_loss(NUM_CLASSES, STRIDES, iou=kind, assign_iou=kind)
    assert loss.iou == kind and loss.assigner.iou == kind
    _, parts = loss(levels, targets)
    ciou = build_yolo_loss(NUM_CLASSES, STRIDES)(levels, targets)[1]["box"]
    assert torch.isfinite(parts["box"]) and (kind == "ciou") == bool(torch.equal(parts["box"], ciou))
