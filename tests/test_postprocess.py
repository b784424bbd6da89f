"""Tests for detect/postprocess.py: hand-built NMS cases, limits, metas, and parity with Ultralytics."""

from __future__ import annotations

import pytest
import torch

from detect.boxes import cxcywh2xyxy
from detect.postprocess import postprocess


def preds_from(rows: list[list[float]]) -> torch.Tensor:
    """One image: rows (x1, y1, x2, y2, score_class_0, score_class_1, ...) -> [1, A, 4 + C]."""
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


def test_class_aware_nms_by_hand() -> None:
    preds = preds_from(
        [
            [0, 0, 10, 10, 0.9, 0.0],
            [1, 0, 11, 10, 0.8, 0.0],  # IoU 0.82 with the first, same class: suppressed
            [1, 0, 11, 10, 0.0, 0.7],  # same box, other class: kept
            [50, 50, 60, 60, 0.6, 0.0],  # far away: kept
            [0, 0, 10, 10, 0.2, 0.1],  # below the threshold
        ]
    )
    (out,) = postprocess(preds, conf_thres=0.25, iou_thres=0.7)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert out["labels"].tolist() == [0, 1, 0]
    assert out["labels"].dtype == torch.long
    assert out["boxes"].tolist() == [[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]]


def test_multi_label_gives_one_candidate_per_class() -> None:
    preds = preds_from([[0, 0, 10, 10, 0.9, 0.5, 0.1]])
    (single,) = postprocess(preds, conf_thres=0.25)
    (multi,) = postprocess(preds, conf_thres=0.25, multi_label=True)
    assert single["labels"].tolist() == [0]
    assert multi["labels"].tolist() == [0, 1] and multi["scores"].tolist() == pytest.approx([0.9, 0.5])


def test_nothing_above_threshold() -> None:
    preds = torch.rand(2, 50, 4 + 3) * 0.2
    preds[1, 7, 5] = 0.95
    preds[1, 7, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    empty, one = postprocess(preds, conf_thres=0.25)
    assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,) and empty["labels"].shape == (0,)
    assert one["boxes"].tolist() == [[1.0, 2.0, 3.0, 4.0]] and one["labels"].tolist() == [1]
    assert [len(r["scores"]) for r in postprocess(torch.zeros(3, 0, 6))] == [0, 0, 0]


def grid_of_disjoint_boxes(count: int, num_classes: int = 2) -> torch.Tensor:
    """count disjoint 8 x 8 boxes on a 10-pixel grid, scores decreasing with the index: [1, count, 4 + C]."""
    index = torch.arange(count, dtype=torch.float32)
    x1, y1 = (index % 50) * 10, (index // 50) * 10
    boxes = torch.stack((x1, y1, x1 + 8, y1 + 8), 1)
    scores = torch.zeros(count, num_classes)
    scores[:, 0] = 0.99 - index / (2 * count)
    return torch.cat((boxes, scores), 1).unsqueeze(0)


def test_max_det_and_max_nms() -> None:
    preds = grid_of_disjoint_boxes(400)
    (full,) = postprocess(preds, max_det=1000)
    assert len(full["scores"]) == 400
    (out,) = postprocess(preds, max_det=300)
    assert len(out["scores"]) == 300
    torch.testing.assert_close(out["scores"], preds[0, :300, 4])  # the 300 best, best first
    (out,) = postprocess(preds, max_det=300, max_nms=120)
    assert len(out["scores"]) == 120
    torch.testing.assert_close(out["boxes"], preds[0, :120, :4])


def test_metas_map_back_to_original_pixels() -> None:
    preds = preds_from([[16, 24, 48, 40, 0.9, 0.0], [0, 0, 64, 64, 0.0, 0.8]]).repeat(2, 1, 1)
    metas = [
        {"ratio": (0.32, 0.32), "pad": (0.0, 16.0), "orig_size": (100, 200), "image_id": 7},
        {"ratio": (1.0, 1.0), "pad": (0.0, 0.0), "orig_size": (64, 64)},
    ]
    first, second = postprocess(preds, metas=metas)
    torch.testing.assert_close(first["boxes"], torch.tensor([[50.0, 25.0, 150.0, 75.0], [0.0, 0.0, 200.0, 100.0]]))
    torch.testing.assert_close(second["boxes"], preds[1, :, :4])
    with pytest.raises(ValueError, match="metas"):
        postprocess(preds, metas=metas[:1])


def random_predictions(seed: int, batch: int = 3, anchors: int = 2000, num_classes: int = 6) -> torch.Tensor:
    """[B, A, 4 + C] with cxcywh boxes (Ultralytics' input) and skewed scores."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(batch, anchors, 2, generator=gen) * 320
    size = torch.rand(batch, anchors, 2, generator=gen) * 60 + 2
    scores = torch.rand(batch, anchors, num_classes, generator=gen) ** 3
    scores[-1] *= 0.2  # the last image has nothing above 0.25
    return torch.cat((centre, size, scores), -1)


def sorted_rows(rows: torch.Tensor) -> list[list[float]]:
    """Detections as a list sorted lexicographically, for order-free exact comparison."""
    return sorted(rows.tolist())


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_ultralytics(seed: int, multi_label: bool) -> None:
    from ultralytics.utils.nms import non_max_suppression

    raw = random_predictions(seed)
    theirs = non_max_suppression(raw.transpose(1, 2).clone(), 0.25, 0.7, multi_label=multi_label, max_det=300)
    ours = postprocess(torch.cat((cxcywh2xyxy(raw[..., :4]), raw[..., 4:]), -1), 0.25, 0.7, 300, multi_label)
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs, strict=True):
        rows = torch.cat((mine["boxes"], mine["scores"][:, None], mine["labels"][:, None].float()), 1)
        assert sorted_rows(rows) == sorted_rows(ref)
    assert len(ours[0]["scores"]) == 300 and len(ours[-1]["scores"]) == 0
