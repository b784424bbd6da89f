"""Tests for detect/boxes.py: exact small cases, hypothesis properties, parity with Ultralytics where we claim it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detect.boxes import (
    bbox2dist,
    bbox_iou,
    box_area,
    box_iou,
    cxcywh2xyxy,
    dist2bbox,
    make_anchors,
    scale_boxes_to_original,
    xywh2xyxy,
    xyxy2cxcywh,
    xyxy2xywh,
)

coord = st.floats(min_value=-1000.0, max_value=1000.0, allow_nan=False)
size = st.floats(min_value=0.01, max_value=500.0, allow_nan=False)


@st.composite
def xyxy_boxes(draw: st.DrawFn) -> torch.Tensor:
    """A batch of valid xyxy boxes (positive width and height)."""
    n = draw(st.integers(min_value=1, max_value=8))
    rows = [[x, y, x + w, y + h] for x, y, w, h in (draw(st.tuples(coord, coord, size, size)) for _ in range(n))]
    return torch.tensor(rows, dtype=torch.float64)


def test_conversions_exact() -> None:
    box = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    assert xyxy2xywh(box).tolist() == [[10.0, 20.0, 40.0, 60.0]]
    assert xyxy2cxcywh(box).tolist() == [[30.0, 50.0, 40.0, 60.0]]
    assert xywh2xyxy(torch.tensor([[10.0, 20.0, 40.0, 60.0]])).tolist() == box.tolist()
    assert cxcywh2xyxy(torch.tensor([[30.0, 50.0, 40.0, 60.0]])).tolist() == box.tolist()
    assert box_area(box).tolist() == [2400.0]
    assert box_area(torch.tensor([[5.0, 5.0, 1.0, 9.0]])).tolist() == [0.0]  # inverted box: no area
    assert xyxy2xywh(torch.zeros(2, 3, 4)).shape == (2, 3, 4)  # leading dims kept


@settings(max_examples=40, deadline=None)
@given(xyxy_boxes())
def test_conversion_round_trips(boxes: torch.Tensor) -> None:
    torch.testing.assert_close(xywh2xyxy(xyxy2xywh(boxes)), boxes, rtol=0, atol=1e-9)
    torch.testing.assert_close(cxcywh2xyxy(xyxy2cxcywh(boxes)), boxes, rtol=0, atol=1e-9)
    cxcywh = xyxy2cxcywh(boxes)
    torch.testing.assert_close(xyxy2cxcywh(cxcywh2xyxy(cxcywh)), cxcywh, rtol=0, atol=1e-9)
    torch.testing.assert_close(box_area(boxes), xyxy2xywh(boxes)[:, 2] * xyxy2xywh(boxes)[:, 3])


def test_box_iou_exact() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 5.0]])
    torch.testing.assert_close(box_iou(a, b, eps=0.0), torch.tensor([[1.0, 1 / 3, 0.0, 0.25]]))
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 4)
    assert box_iou(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0  # two empty boxes: 0, not NaN


def test_bbox_iou_variants_exact() -> None:
    a = torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=torch.float64)
    b = torch.tensor([3.0, 0.0, 5.0, 2.0], dtype=torch.float64)  # disjoint, same height
    eps = 0.0
    assert bbox_iou(a, b, eps=eps).item() == 0.0
    # enclosing box 5 x 2 = 10, union 8 -> GIoU = 0 - 2/10
    assert bbox_iou(a, b, giou=True, eps=eps).item() == pytest.approx(-0.2)
    # centres 3 apart, enclosing diagonal^2 = 25 + 4 -> DIoU = -9/29; same aspect -> CIoU == DIoU
    assert bbox_iou(a, b, diou=True, eps=eps).item() == pytest.approx(-9 / 29)
    assert bbox_iou(a, b, ciou=True, eps=eps).item() == pytest.approx(-9 / 29)
    # same centre, 2 x 2 against 4 x 1: aspect term: v = 4/pi^2 (atan(4) - atan(1))^2, IoU = 1/(4+4-1)
    c = torch.tensor([-1.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    iou = 2 / 6
    v = 4 / math.pi**2 * (math.atan(4.0) - math.atan(1.0)) ** 2
    assert bbox_iou(a, c, eps=eps).item() == pytest.approx(iou)
    assert bbox_iou(a, c, ciou=True, eps=eps).item() == pytest.approx(iou - v * v / (1 - iou + v))
    assert bbox_iou(a, a, ciou=True).item() == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(xyxy_boxes(), xyxy_boxes())
def test_iou_bounds_and_order(first: torch.Tensor, second: torch.Tensor) -> None:
    n = min(len(first), len(second))
    a, b = first[:n], second[:n]
    # the default eps (1e-7) shifts tiny boxes by ~eps / area; a float64-sized eps keeps the bounds tight
    eps = 1e-12
    iou = bbox_iou(a, b, eps=eps)
    giou, diou = bbox_iou(a, b, giou=True, eps=eps), bbox_iou(a, b, diou=True, eps=eps)
    ciou = bbox_iou(a, b, ciou=True, eps=eps)
    tol = 1e-8
    assert ((iou >= -tol) & (iou <= 1 + tol)).all()
    assert ((giou >= -1 - tol) & (giou <= iou + tol)).all()
    assert ((diou >= -1 - tol) & (diou <= iou + tol)).all()
    assert ((ciou >= -1.5 - tol) & (ciou <= diou + tol)).all()
    torch.testing.assert_close(iou, box_iou(a, b, eps=eps).diagonal(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(box_iou(a, b), box_iou(b, a).T)  # symmetric
    torch.testing.assert_close(bbox_iou(a, a, ciou=True, eps=eps), torch.ones(n, dtype=a.dtype), rtol=0, atol=1e-6)


def test_bbox_iou_degenerate_boxes_are_finite() -> None:
    points = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 0.0], [0.0, 0.0, 0.0, 10.0]])
    for flags in ({}, {"giou": True}, {"diou": True}, {"ciou": True}):
        out = bbox_iou(points, points.flip(0), **flags)
        assert torch.isfinite(out).all(), flags


def test_bbox_iou_matches_ultralytics() -> None:
    from ultralytics.utils.metrics import bbox_iou as ul_bbox_iou

    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=gen) * 100
    a = torch.cat((xy, xy + torch.rand(500, 2, generator=gen) * 50 + 0.1), -1)
    b = a + torch.randn(500, 4, generator=gen) * 10
    b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 0.1)
    for ours, theirs in (
        ({}, {}),
        ({"giou": True}, {"GIoU": True}),
        ({"diou": True}, {"DIoU": True}),
        ({"ciou": True}, {"CIoU": True}),
    ):
        expected = ul_bbox_iou(a, b, xywh=False, **theirs).squeeze(-1)
        torch.testing.assert_close(bbox_iou(a, b, **ours), expected, rtol=0, atol=0)


def test_make_anchors_exact_and_order() -> None:
    points, strides = make_anchors([(2, 3), (1, 1)], [8, 16])
    assert points.tolist() == [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5]]
    assert strides.squeeze(1).tolist() == [8.0] * 6 + [16.0]
    points, _ = make_anchors([(2, 2)], [8], offset=0.0, dtype=torch.float64)
    assert points.dtype == torch.float64 and points.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]


def test_make_anchors_matches_ultralytics() -> None:
    from ultralytics.utils.tal import make_anchors as ul_make_anchors

    shapes = [(80, 80), (40, 40), (20, 20)]
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    ours, ours_stride = make_anchors(shapes, [8, 16, 32])
    theirs, theirs_stride = ul_make_anchors(feats, torch.tensor([8.0, 16.0, 32.0]))
    assert torch.equal(ours, theirs) and torch.equal(ours_stride, theirs_stride)


def test_dist2bbox_bbox2dist() -> None:
    points = torch.tensor([[5.0, 5.0]])
    boxes = torch.tensor([[2.0, 1.0, 9.0, 6.0]])
    dist = bbox2dist(points, boxes)
    assert dist.tolist() == [[3.0, 4.0, 4.0, 1.0]]
    assert dist2bbox(dist, points).tolist() == boxes.tolist()
    assert bbox2dist(points, boxes, max_dist=3.5).tolist() == [[3.0, 3.5, 3.5, 1.0]]
    outside = torch.tensor([[6.0, 6.0, 9.0, 9.0]])  # anchor outside the box: negative distances clamp to 0
    assert bbox2dist(points, outside, max_dist=14.99).tolist() == [[0.0, 0.0, 4.0, 4.0]]


@settings(max_examples=40, deadline=None)
@given(xyxy_boxes())
def test_dist_round_trip(boxes: torch.Tensor) -> None:
    points = (boxes[:, :2] + boxes[:, 2:]) / 2 + 0.1 * (boxes[:, 2:] - boxes[:, :2])
    torch.testing.assert_close(dist2bbox(bbox2dist(points, boxes), points), boxes, rtol=0, atol=1e-9)


def test_scale_boxes_to_original() -> None:
    # 200 x 100 (w x h) image letterboxed into 64: ratio 0.32, resized 64 x 32, padded 16 on top
    boxes = torch.tensor([[16.0, 24.0, 48.0, 40.0], [-5.0, 10.0, 70.0, 60.0]])
    out = scale_boxes_to_original(boxes, (0.32, 0.32), (0.0, 16.0), (100, 200))
    torch.testing.assert_close(out, torch.tensor([[50.0, 25.0, 150.0, 75.0], [0.0, 0.0, 200.0, 100.0]]))
