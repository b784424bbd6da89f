"""YoloHead: branch widths, bias priors, raw output layout, and the DFL decode on hand-built logits."""

from __future__ import annotations

import math

import pytest
import torch

from detect.models.heads.yolo import YoloHead

STRIDES = (8, 16, 32)


def test_branch_widths_follow_yolov8() -> None:
    head = YoloHead(80, (64, 128, 256), STRIDES)
    assert head.box_branch[0].conv1.conv.out_channels == 64  # max(16, 64 // 4, 4 * 16)
    assert head.cls_branch[0].conv1.conv.out_channels == 80  # max(64, min(80, 100))
    assert head.cls_branch[2].conv1.conv.in_channels == 256
    assert YoloHead(200, (64, 128, 256), STRIDES).cls_branch[0].conv1.conv.out_channels == 100
    assert YoloHead(1, (320, 640, 640), STRIDES).box_branch[1].conv2.conv.out_channels == 80  # 320 // 4


def test_bias_prior_and_frozen_bins() -> None:
    head = YoloHead(80, (16, 32, 64), STRIDES)
    for level, stride in enumerate(STRIDES):
        assert torch.all(head.box_branch[level].pred.bias == 1.0)
        expected = math.log(5 / 80 / (640 / stride) ** 2)
        torch.testing.assert_close(head.cls_branch[level].pred.bias, torch.full((80,), expected))
    assert torch.equal(head.dfl_bins, torch.arange(16.0))
    assert not head.dfl_bins.requires_grad
    head.box_branch[0].pred.bias.data.zero_()
    head.reset_bias()
    assert torch.all(head.box_branch[0].pred.bias == 1.0)


def test_forward_layout_and_gradients() -> None:
    head = YoloHead(3, (16, 32, 64), STRIDES, reg_max=8)
    feats = [torch.randn(2, 16, 8, 10), torch.randn(2, 32, 4, 5), torch.randn(2, 64, 2, 3)]
    outs = head(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 35, 8, 10), (2, 35, 4, 5), (2, 35, 2, 3)]
    # box logits first, class logits after
    with torch.no_grad():
        assert torch.equal(outs[1][:, :32], head.box_branch[1](feats[1]))
        assert torch.equal(outs[1][:, 32:], head.cls_branch[1](feats[1]))
    sum(o.sum() for o in outs).backward()
    assert head.cls_branch[0].pred.weight.grad is not None
    assert head.dfl_bins.grad is None


def _one_hot_levels(reg_max: int, num_classes: int, bins: tuple[int, int, int, int]) -> list[torch.Tensor]:
    """Two levels (2x3 at stride 8, 1x2 at stride 16) whose box logits pick `bins` (l, t, r, b) with certainty."""
    levels = []
    for height, width in ((2, 3), (1, 2)):
        out = torch.full((1, 4 * reg_max + num_classes, height, width), -1e4)
        for side, index in enumerate(bins):
            out[:, side * reg_max + index] = 1e4
        out[:, 4 * reg_max :] = 0.0
        levels.append(out)
    # class logits that number the anchors: anchor a gets logit a on class 0
    levels[0][0, 4 * reg_max] = torch.arange(6.0).view(2, 3)
    levels[1][0, 4 * reg_max] = torch.arange(6.0, 8.0).view(1, 2)
    return levels


def test_decode_one_hot_bins_anchor_order_and_scores() -> None:
    head = YoloHead(2, (16, 16), (8, 16), reg_max=4)
    preds = head.decode(_one_hot_levels(4, 2, (1, 2, 3, 0)))  # ltrb = 1, 2, 3, 0 cells
    assert preds.shape == (1, 8, 6)
    centres = torch.tensor([[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8], [24, 8]], dtype=torch.float)
    strides = torch.tensor([8.0] * 6 + [16.0] * 2).view(-1, 1)
    expected = torch.cat(
        (centres - strides * torch.tensor([1.0, 2.0]), centres + strides * torch.tensor([3.0, 0.0])), 1
    )
    torch.testing.assert_close(preds[0, :, :4], expected)
    torch.testing.assert_close(preds[0, :, 4], torch.arange(8.0).sigmoid())  # level by level, row-major
    torch.testing.assert_close(preds[0, :, 5], torch.full((8,), 0.5))


def test_decode_uniform_bins_is_the_mean_distance() -> None:
    head = YoloHead(1, (8,), (32,), reg_max=16)
    preds = head.decode([torch.zeros(1, 65, 1, 1)])  # uniform softmax: expectation (16 - 1) / 2 = 7.5 cells
    torch.testing.assert_close(preds[0, 0], torch.tensor([16 - 240.0, 16 - 240.0, 16 + 240.0, 16 + 240.0, 0.5]))


def test_decode_caches_anchors_per_shape_and_returns_float32() -> None:
    head = YoloHead(2, (16, 16), (8, 16), reg_max=4)
    levels = _one_hot_levels(4, 2, (0, 0, 0, 0))
    head.decode(levels)
    points, strides = head.decoder.anchors(levels)
    head.decode(levels)
    assert head.decoder.anchors(levels)[0] is points  # same shapes: reused
    cells = [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5]]  # 2x3 level, then 1x2
    assert points.tolist() == cells + cells[:2]
    assert strides.flatten().tolist() == [8.0] * 6 + [16.0] * 2
    out = head.decode([lv.bfloat16() for lv in levels])
    assert out.dtype == torch.float32
    assert head.decoder.anchors([lv.bfloat16() for lv in levels])[0] is points  # float32 whatever the maps' dtype
    new_levels = [torch.zeros(1, 18, 4, 4), torch.zeros(1, 18, 2, 2)]
    head.decode(new_levels)
    new_points = head.decoder.anchors(new_levels)[0]
    assert new_points.shape == (20, 2) and new_points[4].tolist() == [0.5, 1.5]
    assert head.decoder.anchors(levels)[0] is points  # the first shape is still cached


def test_anchor_cache_keeps_the_newest_shapes() -> None:
    head = YoloHead(1, (8,), (32,), reg_max=2)
    first = [torch.zeros(1, 9, 1, 1)]
    kept = head.decoder.anchors(first)[0]
    for side in range(2, 2 + head.decoder.max_cached_shapes - 1):
        head.decoder.anchors([torch.zeros(1, 9, side, side)])
    assert head.decoder.anchors(first)[0] is kept  # 8 shapes: all cached
    head.decoder.anchors([torch.zeros(1, 9, 20, 20)])  # a ninth drops the oldest
    again = head.decoder.anchors(first)[0]
    assert again is not kept and torch.equal(again, kept)


def test_rejects_mismatched_levels() -> None:
    with pytest.raises(ValueError, match="strides"):
        YoloHead(2, (16, 16), (8,))
    head = YoloHead(2, (16, 16), (8, 16))
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        head([torch.zeros(1, 16, 4, 4)])
