"""COCO evaluation: hand-derived AP values, per-class AP, id mapping, empty input, detection caps, backend parity."""

from __future__ import annotations

import io
import math
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from backbones.errors import UserError
from detect.eval.coco import coco_evaluate, format_table, predictions_to_coco, stat_names

EXACT = 1e-12  # pycocotools divides by tp + fp + 2.2e-16, so "1.0" comes out as 0.9999999999999998


def make_gt(boxes: list[tuple[int, int, list[float]]], categories=((1, "a"),), image_ids=(1,)) -> dict:
    """COCO ground truth from (image_id, category_id, [x, y, w, h]) triples."""
    anns = [
        {"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, (im, c, b) in enumerate(boxes)
    ]
    return {
        "images": [{"id": i, "width": 640, "height": 480} for i in image_ids],
        "categories": [{"id": c, "name": n} for c, n in categories],
        "annotations": anns,
    }


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def assert_stats(stats: list[float], expected: list[float]) -> None:
    assert np.allclose(stats, expected, rtol=0, atol=EXACT), (stats, expected)


def test_one_perfect_detection_gives_ap_1():
    gt = make_gt([(1, 1, [0, 0, 100, 100])])  # area 10000 > 96^2: "large"
    m = coco_evaluate(gt, [det(1, 1, [0, 0, 100, 100], 0.9)])
    assert_stats(m["coco_stats"], [1, 1, 1, -1, -1, 1, 1, 1, 1, -1, -1, 1])
    assert m["max_dets"] == (1, 10, 100) and m["backend"] == "pycocotools"


def test_detection_at_iou_062_matches_three_of_ten_thresholds():
    # [0, 0, 100, 62] inside [0, 0, 100, 100]: IoU 0.62 >= 0.50, 0.55, 0.60 only -> AP = 3/10, AP50 1, AP75 0.
    gt = make_gt([(1, 1, [0, 0, 100, 100])])
    m = coco_evaluate(gt, [det(1, 1, [0, 0, 100, 62], 0.9)])
    assert_stats(m["coco_stats"], [0.3, 1, 0, -1, -1, 0.3, 0.3, 0.3, 0.3, -1, -1, 0.3])
    assert m["AP"] == pytest.approx(0.3, abs=EXACT) and m["AP75"] == 0.0


def test_two_gts_one_found_is_recall_limited():
    # Recall reaches 1/2 with precision 1: the 51 recall thresholds 0, 0.01, ..., 0.50 score 1, the other 50
    # score 0 -> AP = 51/101 at every IoU; AR = 1/2.
    gt = make_gt([(1, 1, [0, 0, 100, 100]), (1, 1, [200, 200, 100, 100])])
    m = coco_evaluate(gt, [det(1, 1, [0, 0, 100, 100], 0.9)])
    ap = 51 / 101
    assert_stats(m["coco_stats"], [ap, ap, ap, -1, -1, ap, 0.5, 0.5, 0.5, -1, -1, 0.5])


def test_false_positive_between_two_true_positives():
    # Ranked TP (0.9), FP (0.8, 50x50 = "medium", far away), TP (0.7): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # Made monotone from the right: 1, 2/3, 2/3. Thresholds <= 0.5 (51) read 1, the 50 above read 2/3:
    # AP = (51 + 50 * 2/3) / 101 = 253/303 at every IoU. APl ignores the medium-sized FP -> 1. AR1 = 1/2.
    gt = make_gt([(1, 1, [0, 0, 100, 100]), (1, 1, [200, 200, 100, 100])])
    dets = [det(1, 1, [0, 0, 100, 100], 0.9), det(1, 1, [400, 0, 50, 50], 0.8), det(1, 1, [200, 200, 100, 100], 0.7)]
    m = coco_evaluate(gt, dets)
    ap = 253 / 303
    assert_stats(m["coco_stats"], [ap, ap, ap, -1, -1, 1, 0.5, 1, 1, -1, -1, 1])
    # PR curve at IoU 0.5 for the single class: [101, 1]
    assert m["precision"].shape == (101, 1)
    assert np.allclose(m["precision"][:51, 0], 1, atol=EXACT) and np.allclose(m["precision"][51:, 0], 2 / 3)


def test_per_class_ap_and_table():
    gt = make_gt(
        [(1, 1, [0, 0, 100, 100]), (1, 2, [200, 200, 100, 100])],
        categories=((1, "albatross"), (2, "bunting"), (7, "cardinal")),
    )
    m = coco_evaluate(gt, [det(1, 1, [0, 0, 100, 100], 0.9), det(1, 2, [200, 200, 100, 62], 0.8)])
    assert m["class_names"] == ["albatross", "bunting", "cardinal"] and m["category_ids"] == [1, 2, 7]
    assert m["per_class_AP"]["albatross"] == pytest.approx(1.0, abs=EXACT)
    assert m["per_class_AP"]["bunting"] == pytest.approx(0.3, abs=EXACT)
    assert math.isnan(m["per_class_AP"]["cardinal"])  # no ground truth: NaN, left out of the mean
    assert m["per_class_AP50"]["bunting"] == pytest.approx(1.0, abs=EXACT)
    assert m["AP"] == pytest.approx(0.65, abs=EXACT)
    assert m["AP"] == pytest.approx(np.nanmean(list(m["per_class_AP"].values())), abs=EXACT)
    assert np.isnan(m["precision"][:, 2]).all()
    table = format_table(m)
    assert "bunting" in table and " 0.3000" in table and "AR100" in table
    assert table.splitlines()[-1].split() == ["cardinal", "-", "-"]


def test_predictions_to_coco_maps_ids_and_converts_boxes():
    results = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.5, 80.25], [0.0, 0.0, 1.0, 2.0]]),
            "scores": torch.tensor([0.9, 0.123456789]),
            "labels": torch.tensor([2, 0]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": np.array([[1.23456, 2, 3.5, 4]]), "scores": np.array([0.5]), "labels": np.array([1])},
    ]
    out = predictions_to_coco(results, image_ids=[17, 42, 99], category_ids=[5, 9, 11])
    assert out == [
        {"image_id": 17, "category_id": 11, "bbox": [10.0, 20.0, 40.5, 60.25], "score": 0.9},
        {"image_id": 17, "category_id": 5, "bbox": [0.0, 0.0, 1.0, 2.0], "score": 0.12346},
        {"image_id": 99, "category_id": 9, "bbox": [1.235, 2.0, 2.265, 2.0], "score": 0.5},
    ]
    with pytest.raises(ValueError, match="label out of range"):
        predictions_to_coco([{"boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [3]}], [1], [5, 9, 11])


def test_round_trip_from_contiguous_labels():
    boxes = [(4, 20, [10, 10, 50, 40]), (8, 30, [0, 0, 20, 20])]
    gt = make_gt(boxes, categories=((20, "x"), (30, "y")), image_ids=(4, 8))
    results = [
        {"boxes": np.array([[10, 10, 60, 50]]), "scores": np.array([0.8]), "labels": np.array([0])},
        {"boxes": np.array([[0, 0, 20, 20]]), "scores": np.array([0.7]), "labels": np.array([1])},
    ]
    m = coco_evaluate(gt, predictions_to_coco(results, [4, 8], [20, 30]))
    assert m["AP"] == pytest.approx(1.0, abs=EXACT)
    assert m["APs"] == pytest.approx(1.0, abs=EXACT) and m["APm"] == pytest.approx(1.0, abs=EXACT)  # 400, 2000 px²


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_empty_predictions_are_zero_not_a_crash(backend):
    if backend == "faster":
        pytest.importorskip("faster_coco_eval")
    gt = make_gt([(1, 1, [0, 0, 100, 100]), (1, 1, [0, 0, 10, 10])])
    m = coco_evaluate(gt, [], backend=backend)
    # every measurable number is 0; APm/ARm stay -1 because no ground truth is medium-sized
    assert m["coco_stats"] == [0, 0, 0, 0, -1, 0, 0, 0, 0, 0, -1, 0]
    assert m["per_class_AP"] == {"a": 0.0}


def test_max_dets_cap_drops_low_scored_detections():
    # 150 confident false positives, then the one true positive at the lowest score (rank 151).
    gt = make_gt([(1, 1, [0, 0, 100, 100])])
    dets = [det(1, 1, [300 + i, 300, 20, 20], 0.9 - i * 1e-3) for i in range(150)]
    dets.append(det(1, 1, [0, 0, 100, 100], 0.1))
    capped = coco_evaluate(gt, dets)  # COCO's 100: the true positive is cut
    assert capped["AP"] == 0.0 and capped["AR100"] == 0.0
    full = coco_evaluate(gt, dets, max_dets=(1, 10, 300))
    assert stat_names((1, 10, 300))[8] == "AR300" and full["AR300"] == 1.0 and full["AR10"] == 0.0
    assert full["AP"] == pytest.approx(1 / 151, abs=EXACT)  # precision 1/151 reached at recall 1


def test_our_12_numbers_are_pycocotools_summarize():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = random_case(3)
    m = coco_evaluate(gt, dets)
    with redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in dets]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert m["coco_stats"] == list(evaluator.stats)


def test_print_summary_prints_only_the_summary(capsys):
    gt = make_gt([(1, 1, [0, 0, 100, 100])])
    coco_evaluate(gt, [det(1, 1, [0, 0, 100, 100], 0.9)])
    assert capsys.readouterr().out == ""
    coco_evaluate(gt, [det(1, 1, [0, 0, 100, 100], 0.9)], print_summary=True)
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert len(lines) == 12 and lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")
    assert lines[0].endswith("maxDets=100 ] = 1.000")


def test_bad_input_is_a_user_error(tmp_path):
    gt = make_gt([(1, 1, [0, 0, 100, 100])])
    with pytest.raises(UserError, match="absent from the ground truth"):
        coco_evaluate(gt, [det(5, 1, [0, 0, 1, 1], 0.5)])
    with pytest.raises(UserError, match="not found"):
        coco_evaluate(tmp_path / "missing.json", [])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        coco_evaluate(tmp_path / "bad.json", [])
    with pytest.raises(UserError, match="lacks key"):
        coco_evaluate({"images": []}, [])
    with pytest.raises(UserError, match=r"annotation 0 lacks \['bbox'\]"):
        coco_evaluate({**gt, "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]}, [])
    with pytest.raises(UserError, match="unknown eval backend"):
        coco_evaluate(gt, [], backend="nope")
    with pytest.raises(UserError, match="max_dets"):
        coco_evaluate(gt, [], max_dets=(10, 1, 100))


def test_missing_area_is_computed_from_the_box():
    gt = make_gt([(1, 1, [0, 0, 20, 20])])
    del gt["annotations"][0]["area"]
    m = coco_evaluate(gt, [det(1, 1, [0, 0, 20, 20], 0.9)])
    assert m["APs"] == pytest.approx(1.0, abs=EXACT) and m["APl"] == -1
    assert "area" not in gt["annotations"][0]  # the caller's dict is left alone


def test_json_path_input(tmp_path):
    import json

    path = tmp_path / "gt.json"
    path.write_text(json.dumps(make_gt([(1, 1, [0, 0, 100, 100])])))
    assert coco_evaluate(path, [det(1, 1, [0, 0, 100, 62], 0.9)])["AP"] == pytest.approx(0.3, abs=EXACT)


def random_case(seed: int, num_images: int = 25, num_classes: int = 4, clutter: int = 40) -> tuple[dict, list[dict]]:
    """Random GT (0-5 boxes per image, sizes 8-300 px: small, medium and large) and jittered/random detections."""
    rng = np.random.default_rng(seed)
    image_ids = [int(1000 + 7 * i) for i in range(num_images)]
    cats = [(int(3 * c + 1), f"class{c}") for c in range(num_classes)]
    boxes, dets = [], []
    for im in image_ids:
        for _ in range(rng.integers(0, 6)):
            side = float(np.exp(rng.uniform(np.log(8), np.log(300))))
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, 640 - min(w, 600)), rng.uniform(0, 480 - min(h, 450))
            cat = cats[rng.integers(num_classes)][0]
            boxes.append((im, cat, [x, y, w, h]))
            for _ in range(rng.integers(0, 3)):  # near-duplicates, sometimes of the wrong class
                j = rng.normal(0, 0.1 * side, 4)
                c = cat if rng.random() < 0.8 else cats[rng.integers(num_classes)][0]
                bb = [x + j[0], y + j[1], max(w + j[2], 1), max(h + j[3], 1)]
                dets.append(det(im, c, [round(float(v), 3) for v in bb], round(float(rng.random()), 5)))
        for _ in range(rng.integers(0, clutter)):
            w = float(np.exp(rng.uniform(np.log(4), np.log(400))))
            bb = [rng.uniform(0, 600), rng.uniform(0, 450), w, w * rng.uniform(0.5, 2)]
            c = cats[rng.integers(num_classes)][0]
            dets.append(det(im, c, [round(float(v), 3) for v in bb], round(float(rng.random()), 5)))
    return make_gt(boxes, categories=cats, image_ids=image_ids), dets


@pytest.mark.parametrize("max_dets", [(1, 10, 100), (1, 10, 300)])
@pytest.mark.parametrize("seed", range(6))
def test_faster_backend_gives_the_same_numbers(seed, max_dets):
    """faster-coco-eval reproduces pycocotools to 1e-12 (measured: 0 or ~1e-16).

    The only difference is in accumulate: pycocotools divides tp / (tp + fp + np.spacing(1)), faster-coco-eval's C++
    tp / (tp + fp), so a precision of 1/1 is 0.9999999999999998 in one and 1.0 in the other; with tp + fp >= 2 the
    epsilon is below half an ulp and the doubles are identical.
    """
    pytest.importorskip("faster_coco_eval")
    clutter = 800 if seed % 3 == 0 else 40  # 800: ~200 per image and class, past the 100 cap
    gt, dets = random_case(seed, clutter=clutter)
    ref = coco_evaluate(gt, dets, max_dets=max_dets)
    fast = coco_evaluate(gt, dets, backend="faster", max_dets=max_dets)
    assert min(ref["coco_stats"]) > -1  # small, medium and large ground truth all present
    assert np.abs(np.subtract(ref["coco_stats"], fast["coco_stats"])).max() <= EXACT
    assert np.allclose(ref["precision"], fast["precision"], rtol=0, atol=EXACT, equal_nan=True)
    for name, ap in ref["per_class_AP"].items():
        assert fast["per_class_AP"][name] == pytest.approx(ap, abs=EXACT, nan_ok=True)


def test_faster_backend_on_hand_cases():
    pytest.importorskip("faster_coco_eval")
    gt = make_gt([(1, 1, [0, 0, 100, 100]), (1, 1, [200, 200, 100, 100])])
    dets = [det(1, 1, [0, 0, 100, 100], 0.9), det(1, 1, [400, 0, 50, 50], 0.8), det(1, 1, [200, 200, 100, 62], 0.7)]
    ref, fast = coco_evaluate(gt, dets), coco_evaluate(gt, dets, backend="faster")
    assert np.abs(np.subtract(ref["coco_stats"], fast["coco_stats"])).max() <= EXACT


# ----------------------------------------------------------------------------------------------------------------------
# Analysis numbers (detect/eval/analysis.py) on a case small enough to work out by hand
# ----------------------------------------------------------------------------------------------------------------------
def analysis_case() -> tuple[dict, list[dict]]:
    """One image; classes a (id 1), b (id 2), c (id 5, no ground truth). Ground truth A0, A1 of class a, B of class b;
    detections p1 a on A0 (0.9), p2 a on B (0.8: right place, wrong class), p3 a on A1 (0.4), p4 b over the top 6/10
    of B (IoU 0.6, 0.3). Every box is 10 x 10 (small) or smaller; no other pair of boxes overlaps."""
    gt = make_gt([(1, 1, [0, 0, 10, 10]), (1, 1, [40, 0, 10, 10]), (1, 2, [20, 20, 10, 10])],
                 categories=((1, "a"), (2, "b"), (5, "c")))  # fmt: skip
    dets = [det(1, 1, [0, 0, 10, 10], 0.9), det(1, 1, [20, 20, 10, 10], 0.8), det(1, 1, [40, 0, 10, 10], 0.4),
            det(1, 2, [20, 20, 10, 6], 0.3)]  # fmt: skip
    return gt, dets


def test_detection_confusion_matrix_by_hand():
    """Matching ignores the class, highest IoU first: p1-A0, p2-B, p3-A1 (IoU 1); p4 finds B taken: a false positive
    of b. Rows predicted (a, b, c, background), columns true."""
    from detect.eval.analysis import confusion_matrix, group_by_image

    gt, dets = analysis_case()
    grouped = group_by_image(gt, dets, [1, 2, 5])
    expected = [[2, 1, 0, 0],  # a predicted: on A0 and A1 (true a), on B (true b)
                [0, 0, 0, 1],  # b predicted: p4, nothing left to match
                [0, 0, 0, 0],
                [0, 0, 0, 0]]  # fmt: skip
    assert confusion_matrix(grouped, 3, conf=0.25, iou=0.45).tolist() == expected
    # conf 0.5 keeps p1 and p2 only: A1 is missed (background row), p4 is gone
    assert confusion_matrix(grouped, 3, conf=0.5, iou=0.45).tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0],
                                                                         [1, 0, 0, 0]]  # fmt: skip
    # IoU above 0.65 still matches the exact boxes: same matrix; p4 (IoU 0.6 with B) never could match
    assert confusion_matrix(grouped, 3, conf=0.25, iou=0.65).tolist() == expected


def test_precision_recall_f1_against_confidence_by_hand():
    """Class a (2 gt), by score: p1 TP, p2 FP (no a box there), p3 TP. Class b (1 gt): p4 TP (IoU 0.6 >= 0.5, class
    aware, unlike the confusion matrix). Class c has no ground truth: NaN. No detection left: precision 1."""
    from detect.eval.analysis import group_by_image, pr_f1_curves

    gt, dets = analysis_case()
    thresholds = np.array([0.0, 0.3, 0.35, 0.4, 0.5, 0.8, 0.85, 0.9, 0.95])
    curves = pr_f1_curves(group_by_image(gt, dets, [1, 2, 5]), 3, thresholds)
    a_p = [2 / 3, 2 / 3, 2 / 3, 2 / 3, 1 / 2, 1 / 2, 1, 1, 1]
    a_r = [1, 1, 1, 1, 1 / 2, 1 / 2, 1 / 2, 1 / 2, 0]
    a_f1 = [0.8, 0.8, 0.8, 0.8, 0.5, 0.5, 2 / 3, 2 / 3, 0]  # 2PR / (P + R)
    b_r = [1, 1, 0, 0, 0, 0, 0, 0, 0]
    np.testing.assert_allclose(curves["precision"][:2], [a_p, [1] * 9], rtol=0, atol=1e-15)
    np.testing.assert_allclose(curves["recall"][:2], [a_r, b_r], rtol=0, atol=1e-15)
    np.testing.assert_allclose(curves["f1"][:2], [a_f1, b_r], rtol=0, atol=1e-15)
    assert all(np.isnan(curves[key][2]).all() for key in ("precision", "recall", "f1"))


def test_pr_curve_values_by_hand():
    """The PR curve pr_curve.png draws (COCO's interpolated precision at IoU 0.5, 101 recall points) for the same case:
    class a reaches recall 1/2 at precision 1 and recall 1 at 2/3; class b recall 1 at precision 1; c has none."""
    gt, dets = analysis_case()
    m = coco_evaluate(gt, dets)
    expected_a = [1.0] * 51 + [2 / 3] * 50
    np.testing.assert_allclose(m["precision"][:, 0], expected_a, rtol=0, atol=EXACT)
    np.testing.assert_allclose(m["precision"][:, 1], [1.0] * 101, rtol=0, atol=EXACT)
    assert np.isnan(m["precision"][:, 2]).all()
    assert m["per_class_AP50"]["a"] == pytest.approx(253 / 303, abs=EXACT)
    assert m["AP50"] == pytest.approx((253 / 303 + 1) / 2, abs=EXACT)


def test_the_drawn_numbers_by_hand():
    """What the pictures show, from the same case: the normalised detection confusion matrix (columns), the mean F1
    and its best threshold, and pr_curve.png's per-class and mean curves."""
    from detect.eval.analysis import best_f1, confusion_matrix, group_by_image, normalize_columns, pr_f1_curves
    from detect.eval.viz import pr_curves_at_50

    gt, dets = analysis_case()
    grouped = group_by_image(gt, dets, [1, 2, 5])
    assert normalize_columns(confusion_matrix(grouped, 3, conf=0.5, iou=0.45)).tolist() == [
        [0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]  # fmt: skip
    thresholds = np.array([0.0, 0.3, 0.35, 0.4, 0.5, 0.8, 0.85, 0.9, 0.95])
    mean, best = best_f1(pr_f1_curves(grouped, 3, thresholds), thresholds)
    np.testing.assert_allclose(mean, [0.9, 0.9, 0.4, 0.4, 0.25, 0.25, 1 / 3, 1 / 3, 0.0], rtol=0, atol=1e-15)
    assert best == 0  # the first of the two 0.9s
    recall, per_class, mean_curve = pr_curves_at_50(coco_evaluate(gt, dets)["precision"])
    assert recall[50] == 0.5 and np.isnan(per_class[:, 2]).all()
    np.testing.assert_allclose(mean_curve, [1.0] * 51 + [5 / 6] * 50, rtol=0, atol=EXACT)


def test_classification_confusion_numbers_by_hand():
    from detect.eval.viz import normalize_rows, overall_accuracy

    counts = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]])
    assert normalize_rows(counts).tolist() == [[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.5]]
    assert overall_accuracy(counts) == 5 / 8 and overall_accuracy(np.zeros((2, 2))) == 0.0
