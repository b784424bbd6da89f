"""The one YOLO decode (`YoloDecoder`): the loss built for a head decodes with the head's decoder, so its anchors are
made once per map size and its DFL bins once per device, with the numbers of a loss built from plain numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from detect.boxes import make_anchors
from detect.losses.yolo import build_yolo_loss, yolo_loss
from detect.models.heads import yolo as yolo_head_module
from detect.models.heads.yolo import YoloDecoder, YoloHead

STRIDES = (8, 16, 32)
NUM_CLASSES = 3


def _levels(height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """Raw maps of a [2, 3, height, width] batch: [2, 64 + C, height / s, width / s] per stride s."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 64 + NUM_CLASSES, height // s, width // s, generator=gen) for s in STRIDES]


TARGETS = torch.tensor([[0, 1, 30.0, 40, 120, 100], [1, 0, 10, 10, 150, 90], [1, 2, 60, 20, 90, 60]])


def test_the_loss_takes_anchors_and_bins_from_its_head(monkeypatch: pytest.MonkeyPatch) -> None:
    head = YoloHead(NUM_CLASSES, (16, 32, 64), STRIDES)
    loss = yolo_loss(head, {}, {})
    assert loss.decoder is head.decoder
    made: list[tuple] = []

    def counting_make_anchors(shapes, strides, **kwargs):
        made.append(tuple(tuple(s) for s in shapes))
        return make_anchors(shapes, strides, **kwargs)

    monkeypatch.setattr(yolo_head_module, "make_anchors", counting_make_anchors)
    bins_seen: list[torch.Tensor] = []
    own_bins = head.decoder.bins
    monkeypatch.setattr(head.decoder, "bins", lambda device: bins_seen.append(own_bins(device)) or bins_seen[-1])

    levels = _levels(128, 160)
    first = loss(levels, TARGETS)
    points, strides = head.decoder.anchors(levels)
    second = loss(levels, TARGETS)
    head.decode(levels)  # the eval decode of the same sizes: the same anchors again
    assert made == [((16, 20), (8, 10), (4, 5))]  # made once for three uses
    assert head.decoder.anchors(levels)[0] is points and head.decoder.anchors(levels)[1] is strides
    assert len(bins_seen) == 2 and bins_seen[0] is bins_seen[1]  # one bins tensor for both calls
    assert torch.equal(bins_seen[0], torch.arange(16.0)) and torch.equal(bins_seen[0], head.dfl_bins)
    assert torch.equal(first[0], second[0])

    other = _levels(96, 64, seed=1)  # a new size: made once more, the first size still cached
    loss(other, TARGETS.clamp(max=60))
    assert made[1:] == [((12, 8), (6, 4), (3, 2))]
    new_points, new_strides = head.decoder.anchors(other)
    expected_points, expected_strides = make_anchors([(12, 8), (6, 4), (3, 2)], STRIDES)
    assert torch.equal(new_points, expected_points) and torch.equal(new_strides, expected_strides)
    assert head.decoder.anchors(levels)[0] is points and len(made) == 2


def test_the_heads_loss_equals_the_loss_from_numbers() -> None:
    """Sharing the head's decoder changes no number: total, parts and gradients equal to the bit."""
    head = YoloHead(NUM_CLASSES, (16, 32, 64), STRIDES)
    results = []
    for loss in (yolo_loss(head, {}, {}), build_yolo_loss(NUM_CLASSES, STRIDES)):
        levels = [level.requires_grad_() for level in _levels(128, 160)]
        total, parts = loss(levels, TARGETS)
        total.backward()
        results.append((total.detach(), parts, [level.grad for level in levels]))
    (total_a, parts_a, grads_a), (total_b, parts_b, grads_b) = results
    assert torch.equal(total_a, total_b) and parts_a.keys() == parts_b.keys() == {"box", "cls", "dfl"}
    assert all(torch.equal(parts_a[key], parts_b[key]) for key in parts_a)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert parts_a["box"] > 0 and parts_a["dfl"] > 0


def test_a_loss_from_numbers_builds_its_own_decoder() -> None:
    loss = build_yolo_loss(NUM_CLASSES, STRIDES, reg_max=8)
    assert (loss.decoder.num_classes, loss.decoder.strides, loss.decoder.reg_max) == (NUM_CLASSES, STRIDES, 8)
    layout_only = SimpleNamespace(num_classes=2, strides=(8, 16), reg_max=4)  # a user's head of YOLO's raw layout
    assert yolo_loss(layout_only, {}, {}).decoder.strides == (8, 16)
    with pytest.raises(ValueError, match="differ"):
        build_yolo_loss(NUM_CLASSES, STRIDES, reg_max=8, decoder=YoloDecoder(NUM_CLASSES, STRIDES, 16))


def test_box_distances_is_the_dfl_expectation() -> None:
    """Bins 0..3; logits putting probability 1/2 on bins 1 and 3 of the left side -> 2.0, uniform -> 1.5."""
    decoder = YoloDecoder(1, (8,), reg_max=4)
    box_logits = torch.full((1, 2, 16), -1e4)  # [B, A, 4R]: anchor 0 peaked, anchor 1 uniform
    box_logits[0, 0, [1, 3]] = 0.0  # left: bins 1 and 3
    box_logits[0, 0, 4 + 2] = box_logits[0, 0, 8 + 0] = box_logits[0, 0, 12 + 3] = 0.0  # top 2, right 0, bottom 3
    box_logits[0, 1] = 0.0
    distances = decoder.box_distances(box_logits)  # [1, 2, 4]
    assert distances.tolist() == [[[2.0, 2.0, 0.0, 3.0], [1.5, 1.5, 1.5, 1.5]]]
    assert decoder.bins(torch.device("cpu")) is decoder.bins(torch.device("cpu"))
