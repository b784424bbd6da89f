"""Tests for detect/losses/assign.py: hand-built assignments with known answers, and parity with Ultralytics."""

from __future__ import annotations

import pytest
import torch

from detect.boxes import make_anchors
from detect.losses.assign import TaskAlignedAssigner

NUM_CLASSES = 2


def grid_points() -> torch.Tensor:
    """16 anchors of a 32 x 32 image at stride 8, in pixels: x, y in (4, 12, 20, 28), row-major."""
    points, strides = make_anchors([(4, 4)], [8])
    return points * strides  # [16, 2]


def index(x: float, y: float) -> int:
    """Anchor index of the cell centre (x, y) on the 4 x 4 grid."""
    return int(y // 8) * 4 + int(x // 8)


def single_image(gts: list[list[float]], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground-truth tensors of one image: labels [1, M, 1], boxes [1, M, 4], mask [1, M, 1]."""
    boxes = torch.tensor(gts, dtype=torch.float32).view(1, -1, 4)
    return torch.tensor(labels, dtype=torch.float32).view(1, -1, 1), boxes, torch.ones(1, len(gts), 1)


def boxes_at_anchors(box: list[float], num_anchors: int = 16) -> torch.Tensor:
    """Every anchor predicts the same box: [1, A, 4]."""
    return torch.tensor(box).expand(1, num_anchors, 4).clone()


def test_empty_ground_truth() -> None:
    assigner = TaskAlignedAssigner(num_classes=NUM_CLASSES)
    scores, boxes = torch.rand(2, 16, NUM_CLASSES), torch.rand(2, 16, 4)
    empty = torch.zeros(2, 0, 4)
    labels, target_boxes, target_scores, fg, gt_idx = assigner(
        scores, boxes, grid_points(), torch.zeros(2, 0, 1), empty, torch.zeros(2, 0, 1)
    )
    assert labels.shape == (2, 16) and (labels == NUM_CLASSES).all()
    assert target_boxes.shape == (2, 16, 4) and not target_boxes.any()
    assert target_scores.shape == (2, 16, NUM_CLASSES) and not target_scores.any()
    assert fg.dtype == torch.bool and not fg.any()
    assert gt_idx.dtype == torch.long and not gt_idx.any()


def test_one_box_topk_and_soft_targets() -> None:
    gt_box = [0.0, 0.0, 20.0, 20.0]  # anchor centres strictly inside: (4, 4), (12, 4), (4, 12), (12, 12)
    labels, gt_boxes, mask = single_image([gt_box], [1])
    scores = torch.full((1, 16, NUM_CLASSES), 0.99)  # anchors outside the box score high: must not matter
    inside = [index(4, 4), index(12, 4), index(4, 12), index(12, 12)]
    scores[0, inside, 1] = torch.tensor([0.81, 0.36, 0.16, 0.04])
    pred = boxes_at_anchors(gt_box)  # perfect boxes: IoU 1 everywhere, so the metric orders by score
    points = grid_points()

    out = TaskAlignedAssigner(topk=2, num_classes=NUM_CLASSES)(scores, pred, points, labels, gt_boxes, mask)
    target_labels, target_boxes, target_scores, fg, gt_idx = out
    assert fg[0].nonzero().flatten().tolist() == inside[:2]
    assert target_labels[0, inside[:2]].tolist() == [1, 1]
    assert torch.equal(target_boxes[0, inside[0]], torch.tensor(gt_box))
    # t = s^0.5 * 1; target = t / max_t * max_iou -> 1 and 0.6 / 0.9
    torch.testing.assert_close(target_scores[0, inside[:2], 1], torch.tensor([1.0, 2 / 3]), atol=1e-6, rtol=0)
    assert not target_scores[0, :, 0].any() and not target_scores[0, ~fg[0]].any()

    out = TaskAlignedAssigner(topk=10, num_classes=NUM_CLASSES)(scores, pred, points, labels, gt_boxes, mask)
    assert out[3][0].nonzero().flatten().tolist() == inside  # only 4 anchors inside: topk 10 keeps all four
    expected = torch.tensor([0.9, 0.6, 0.4, 0.2]) / 0.9
    torch.testing.assert_close(out[2][0, inside, 1], expected, atol=1e-6, rtol=0)


def test_box_on_the_border_and_anchor_on_an_edge() -> None:
    gt_box = [12.0, 0.0, 32.0, 32.0]  # touches top, right and bottom; the anchors at x = 12 lie on its left edge
    labels, gt_boxes, mask = single_image([gt_box], [0])
    scores = torch.linspace(0.2, 0.9, 16).view(1, 16, 1).expand(1, 16, NUM_CLASSES).contiguous()
    out = TaskAlignedAssigner(num_classes=NUM_CLASSES)(
        scores, boxes_at_anchors(gt_box), grid_points(), labels, gt_boxes, mask
    )
    expected = sorted(index(x, y) for x in (20, 28) for y in (4, 12, 20, 28))
    assert out[3][0].nonzero().flatten().tolist() == expected
    assert (out[1][0, expected] == torch.tensor(gt_box)).all()
    assert (out[0][0, expected] == 0).all() and (out[4][0, expected] == 0).all()


def test_tiny_box_is_widened_for_candidates_only() -> None:
    gt_box = [9.0, 9.0, 11.0, 11.0]  # contains no anchor centre
    labels, gt_boxes, mask = single_image([gt_box], [1])
    scores, pred, points = (
        torch.full((1, 16, NUM_CLASSES), 0.5),
        boxes_at_anchors([8.0, 8.0, 12.0, 12.0]),
        grid_points(),
    )
    fg = TaskAlignedAssigner(num_classes=NUM_CLASSES, min_gt_side=0)(scores, pred, points, labels, gt_boxes, mask)[3]
    assert not fg.any()
    out = TaskAlignedAssigner(num_classes=NUM_CLASSES)(scores, pred, points, labels, gt_boxes, mask)
    # widened to 16 x 16 about its centre (10, 10): [2, 18] holds the anchors at 4 and 12
    assert out[3][0].nonzero().flatten().tolist() == [index(4, 4), index(12, 4), index(4, 12), index(12, 12)]
    assert (out[1][0, out[3][0]] == torch.tensor(gt_box)).all()  # the target stays the true box


@pytest.mark.parametrize("flip", [False, True])
def test_two_boxes_compete_for_one_anchor(flip: bool) -> None:
    box_a, box_b = [0.0, 0.0, 24.0, 24.0], [8.0, 8.0, 32.0, 32.0]
    gts, labels_list = ([box_a, box_b], [0, 1]) if not flip else ([box_b, box_a], [1, 0])
    labels, gt_boxes, mask = single_image(gts, labels_list)
    shared = index(12, 12)  # inside both
    points = grid_points()
    pred = torch.cat((points - 1, points + 1), -1).unsqueeze(0)  # tiny boxes: near-zero IoU with both gts
    pred[0, shared] = torch.tensor(box_b)  # the shared anchor predicts box B: CIoU 1 with B, ~0.22 with A
    scores = torch.full((1, 16, NUM_CLASSES), 0.01)
    scores[0, shared] = 0.99
    target_labels, _, target_scores, fg, gt_idx = TaskAlignedAssigner(topk=1, num_classes=NUM_CLASSES)(
        scores, pred, points, labels, gt_boxes, mask
    )
    assert fg[0].nonzero().flatten().tolist() == [shared]  # both chose it; A loses it and has no positive left
    assert gt_idx[0, shared].item() == (1 if not flip else 0)
    assert target_labels[0, shared].item() == 1
    torch.testing.assert_close(target_scores[0, shared], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)


def test_image_with_boxes_beside_image_without() -> None:
    gt_box = [0.0, 0.0, 20.0, 20.0]
    labels, gt_boxes, mask = single_image([gt_box], [1])
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 16, NUM_CLASSES, generator=gen)
    pred = boxes_at_anchors(gt_box).expand(2, 16, 4).clone()
    points, assigner = grid_points(), TaskAlignedAssigner(num_classes=NUM_CLASSES)
    batch_out = assigner(
        scores, pred, points, labels.repeat(2, 1, 1), gt_boxes.repeat(2, 1, 1), torch.tensor([1.0, 0.0]).view(2, 1, 1)
    )
    alone = assigner(scores[:1], pred[:1], points, labels, gt_boxes, mask)
    for together, single in zip(batch_out, alone, strict=True):
        assert torch.equal(together[:1], single)
    assert not batch_out[3][1].any() and not batch_out[2][1].any()
    assert batch_out[3][0].sum() == 4


def test_stateless() -> None:
    assigner = TaskAlignedAssigner(num_classes=NUM_CLASSES)
    before = dict(vars(assigner))
    labels, gt_boxes, mask = single_image([[0.0, 0.0, 20.0, 20.0]], [1])
    assigner(
        torch.rand(1, 16, NUM_CLASSES), boxes_at_anchors([0.0, 0.0, 20.0, 20.0]), grid_points(), labels, gt_boxes, mask
    )
    assert dict(vars(assigner)).keys() == before.keys()


def random_case(seed: int, batch: int, max_boxes: int, num_classes: int, counts: list[int] | None = None) -> tuple:
    """Random predictions near the anchors of a 128 x 128 input and random ground truths (some tiny)."""
    gen = torch.Generator().manual_seed(seed)
    points, strides = make_anchors([(16, 16), (8, 8), (4, 4)], [8, 16, 32])
    points = points * strides  # [336, 2] pixels
    num_anchors = points.shape[0]
    scores = torch.rand(batch, num_anchors, num_classes, generator=gen)
    centre = points + torch.randn(batch, num_anchors, 2, generator=gen) * 6
    size = torch.rand(batch, num_anchors, 2, generator=gen) * 60 + 4
    pred = torch.cat((centre - size / 2, centre + size / 2), -1)  # [B, A, 4]
    if counts is None:
        counts = torch.randint(0, max_boxes + 1, (batch,), generator=gen).tolist()
    gt_centre = torch.rand(batch, max_boxes, 2, generator=gen) * 128
    gt_size = torch.rand(batch, max_boxes, 2, generator=gen) * 70 + 2
    gt = torch.cat((gt_centre - gt_size / 2, gt_centre + gt_size / 2), -1).clamp(0, 128)
    mask = (torch.arange(max_boxes)[None] < torch.tensor(counts)[:, None]).unsqueeze(-1).float()  # [B, M, 1]
    labels = torch.randint(0, num_classes, (batch, max_boxes, 1), generator=gen).float() * mask
    return scores, pred, points, labels, gt * mask, mask


@pytest.mark.parametrize(
    ("seed", "counts"),
    [(0, None), (1, None), (2, [3, 0, 8, 1]), (3, [0, 0, 5, 0]), (4, [0, 0, 0, 0]), (5, [8, 8, 8, 8])],
)
def test_parity_with_ultralytics(seed: int, counts: list[int] | None) -> None:
    from ultralytics.utils.tal import TaskAlignedAssigner as UltralyticsAssigner

    num_classes = 5
    inputs = random_case(seed, batch=4, max_boxes=8, num_classes=num_classes, counts=counts)
    ours = TaskAlignedAssigner(topk=10, num_classes=num_classes, alpha=0.5, beta=6.0)(*inputs)
    # the construction v8DetectionLoss uses: strides (8, 16, 32), topk2 left at topk
    reference = UltralyticsAssigner(topk=10, num_classes=num_classes, alpha=0.5, beta=6.0, stride=[8, 16, 32])
    theirs = reference(*inputs)
    for name, mine, ref in zip(("labels", "boxes", "scores", "fg", "gt_idx"), ours, theirs, strict=True):
        assert mine.shape == ref.shape, name
        if name in ("labels", "fg", "gt_idx"):
            assert torch.equal(mine, ref.to(mine.dtype)), name
        else:
            torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6, msg=name)
    if counts is None or sum(counts):
        assert ours[3].any()  # the case exercises real assignments


def test_parity_with_ultralytics_no_boxes_at_all() -> None:
    from ultralytics.utils.tal import TaskAlignedAssigner as UltralyticsAssigner

    scores, pred, points, *_ = random_case(0, batch=3, max_boxes=1, num_classes=4)
    empty = (torch.zeros(3, 0, 1), torch.zeros(3, 0, 4), torch.zeros(3, 0, 1))
    ours = TaskAlignedAssigner(num_classes=4)(scores, pred, points, *empty)
    theirs = UltralyticsAssigner(topk=10, num_classes=4, alpha=0.5, beta=6.0)(scores, pred, points, *empty)
    for mine, ref in zip(ours, theirs, strict=True):
        assert torch.equal(mine, ref.to(mine.dtype))
