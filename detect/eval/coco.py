"""COCO box evaluation: predictions to COCO results json, pycocotools (or faster-coco-eval) mAP, per-class AP.

The numbers are COCO's (Lin et al., "Microsoft COCO", 2014; the `cocoapi` evaluation code): for each class, IoU
threshold t in {0.50, 0.55, ..., 0.95}, area range and detection cap, detections sorted by score are greedily matched
to unmatched ground truth with IoU >= t; precision is made monotone from the right and sampled at the 101 recall
thresholds 0, 0.01, ..., 1 (a threshold above the highest recall reached scores 0). AP is the mean of those samples
over recall thresholds, IoU thresholds and classes with ground truth. AR: the highest recall reached, averaged alike.

Detection caps (`max_dets`): COCOeval keeps at most `max_dets[-1]` detections per image and class (highest scores
first), 100 by default. Our validation NMS keeps up to 300 per image (DESIGN §5), so with the default caps a class
holding more than 100 of an image's detections loses its lowest-scored ones. `max_dets=(1, 10, 300)` evaluates all
300 instead; AR is then reported as AR1/AR10/AR300, and AP usually rises a little (recall gained at low scores) but
may also fall (the extra false positives rank above other images' true positives). Ultralytics' COCO json check
keeps the default 100; its built-in mAP counts all 300. The 12 numbers are computed here from COCOeval's accumulated
arrays with AP and the area rows at `max_dets[-1]`: exactly pycocotools' `stats` for the default caps (pycocotools'
own `summarize` hard-codes 100 for the first number and returns -1 there for other caps).

-1 means "not measurable": an area range (or class) with no ground truth. Per-class AP of a class without ground truth
is NaN and such classes do not count in the mean.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backbones.errors import UserError

BACKENDS = ("pycocotools", "faster")
DEFAULT_MAX_DETS = (1, 10, 100)
_AREAS = ("all", "small", "medium", "large")


def stat_names(max_dets: Sequence[int] = DEFAULT_MAX_DETS) -> list[str]:
    """Names of the 12 COCO numbers in pycocotools order, e.g. AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ..."""
    m1, m2, m3 = max_dets
    return ["AP", "AP50", "AP75", "APs", "APm", "APl", f"AR{m1}", f"AR{m2}", f"AR{m3}", "ARs", "ARm", "ARl"]


def _to_numpy(x: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def predictions_to_coco(
    results: Sequence[Mapping[str, Any]], image_ids: Sequence[int], category_ids: Sequence[int]
) -> list[dict]:
    """Convert per-image detections to the COCO results format.

    Args:
        results: one dict per image with `boxes` [K, 4] xyxy in original-image pixels, `scores` [K] and `labels` [K]
            contiguous 0..C-1 (tensors or arrays), as `postprocess(..., metas=...)` returns.
        image_ids: the data set's own id of each image (same order as `results`).
        category_ids: the data set's category id of each contiguous label.

    Returns:
        `[{"image_id", "category_id", "bbox": [x, y, w, h] (3 decimals), "score" (5 decimals)}, ...]`.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"{len(results)} results but {len(image_ids)} image ids")
    cat_map = np.asarray(category_ids, dtype=np.int64)  # [C]
    out: list[dict] = []
    for result, image_id in zip(results, image_ids, strict=True):
        boxes = _to_numpy(result["boxes"]).reshape(-1, 4).astype(np.float64)  # [K, 4]
        scores = _to_numpy(result["scores"]).reshape(-1).astype(np.float64)  # [K]
        labels = _to_numpy(result["labels"]).reshape(-1).astype(np.int64)  # [K]
        if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_map)):
            raise ValueError(f"label out of range 0..{len(cat_map) - 1} for image id {image_id}")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(3)  # [K, 4]
        cats = cat_map[labels]  # [K]
        for k in range(len(labels)):
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(cats[k]),
                    "bbox": [float(v) for v in xywh[k]],
                    "score": round(float(scores[k]), 5),
                }
            )
    return out


def _load_gt_dict(gt: str | os.PathLike | Mapping[str, Any]) -> dict:
    """The ground-truth json as a dict (annotation dicts copied: COCOeval writes an `ignore` key into them)."""
    if isinstance(gt, Mapping):
        data = dict(gt)
        where = "ground-truth dict"
    else:
        path = Path(gt)
        where = str(path)
        if not path.is_file():
            raise UserError(f"COCO ground-truth json not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"COCO ground-truth json is not valid json: {path}: {err}") from None
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise UserError(f"COCO ground truth lacks key(s) {missing}: {where}")
    anns = [dict(ann) for ann in data["annotations"]]
    for i, ann in enumerate(anns):
        lacking = [key for key in ("id", "image_id", "category_id", "bbox") if key not in ann]
        if lacking:
            raise UserError(f"COCO ground-truth annotation {i} lacks {lacking}: {where}")
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))  # area ranges read it
    data["annotations"] = anns
    return data


def _make_coco(backend: str, dataset: dict) -> Any:
    """A COCO api object of the backend over an in-memory dataset, silently."""
    if backend == "faster":
        from faster_coco_eval import COCO

        return COCO(dataset, print_function=lambda *args, **kwargs: None)
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _run_cocoeval(backend: str, gt: Any, dt: Any, max_dets: tuple[int, int, int]) -> Any:
    """Run evaluate + accumulate (no summarize) and return the COCOeval object."""
    if backend == "faster":
        from faster_coco_eval import COCOeval_faster

        evaluator = COCOeval_faster(gt, dt, "bbox", print_function=lambda *args, **kwargs: None)
    else:
        from pycocotools.cocoeval import COCOeval

        evaluator = COCOeval(gt, dt, "bbox")
    evaluator.params.maxDets = list(max_dets)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _mean_valid(values: np.ndarray) -> float:
    """Mean of entries > -1 (COCO's 'absent' marker); -1 when there is none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def stats_from_eval(precision: np.ndarray, recall: np.ndarray, iou_thrs: np.ndarray, area_labels: list[str]) -> list:
    """The 12 COCO numbers from accumulated arrays, AP and area rows at the last detection cap.

    Args:
        precision: [T, R, K, A, M] from `COCOeval.eval["precision"]`.
        recall: [T, K, A, M] from `COCOeval.eval["recall"]`.
        iou_thrs: [T] IoU thresholds.
        area_labels: A area names ("all", "small", "medium", "large").

    Returns:
        12 floats in pycocotools order (see `stat_names`).
    """
    area = {name: area_labels.index(name) for name in _AREAS}
    t50 = int(np.flatnonzero(np.isclose(iou_thrs, 0.5))[0])
    t75 = int(np.flatnonzero(np.isclose(iou_thrs, 0.75))[0])
    ap = [
        _mean_valid(precision[:, :, :, area["all"], -1]),
        _mean_valid(precision[t50, :, :, area["all"], -1]),
        _mean_valid(precision[t75, :, :, area["all"], -1]),
    ] + [_mean_valid(precision[:, :, :, area[name], -1]) for name in _AREAS[1:]]
    ar = [_mean_valid(recall[:, :, area["all"], m]) for m in range(3)]
    ar += [_mean_valid(recall[:, :, area[name], -1]) for name in _AREAS[1:]]
    return ap + ar


def _check_predictions(predictions: Sequence[Mapping[str, Any]], image_ids: set[int]) -> list[dict]:
    """Copies of the prediction dicts (the COCO apis write into them); unknown image ids are an error."""
    unknown = sorted({p["image_id"] for p in predictions} - image_ids)
    if unknown:
        raise UserError(f"predictions name image ids absent from the ground truth: {unknown[:5]} ({len(unknown)} ids)")
    return [dict(p) for p in predictions]


def coco_evaluate(
    gt: str | os.PathLike | Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    backend: str = "pycocotools",
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    print_summary: bool = False,
) -> dict[str, Any]:
    """COCO box mAP of predictions against COCO json ground truth.

    Args:
        gt: path of a COCO json (as `data/coco.py:write_coco_json` writes) or the same content as a dict.
        predictions: COCO results (`predictions_to_coco`). Empty is fine: everything measurable is 0.
        backend: "pycocotools" (reference) or "faster" (faster-coco-eval's C++ COCOeval, the same 12 numbers;
            see tests/test_eval.py).
        max_dets: the three per-image detection caps; the last one applies to AP and AR rows. COCO's
            (1, 10, 100) by default: with max_det 300 predictions, COCOeval drops all but the 100 best-scored
            detections per image and class. (1, 10, 300) counts them all (see the module docstring).
        print_summary: print the 12 numbers in pycocotools' layout (all library chatter is silenced either way).

    Returns:
        dict with `coco_stats` (12 floats, pycocotools order), each number by name (`stat_names(max_dets)`, e.g.
        `AP`, `AP50`, `AP75`, `AR100`), `max_dets`, `backend`, `class_names` and `category_ids` (ground-truth
        categories sorted by id), `per_class_AP` and `per_class_AP50` ({name: AP}, NaN for a class without ground
        truth), and `precision` [101, C] float64: interpolated precision at IoU 0.5, all areas, the last cap, per
        recall threshold and class (NaN columns for classes without ground truth), for PR curves.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown eval backend '{backend}': choose one of {list(BACKENDS)}")
    caps = tuple(int(m) for m in max_dets)
    if len(caps) != 3 or caps[0] < 1 or list(caps) != sorted(caps):
        raise UserError(f"max_dets must be three increasing positive ints, got {tuple(max_dets)}")
    gt_data = _load_gt_dict(gt)
    coco_gt = _make_coco(backend, gt_data)
    dets = _check_predictions(predictions, set(coco_gt.getImgIds()))
    if dets:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dets)
    else:  # pycocotools' loadRes indexes the first result: evaluate an empty result set instead
        empty = {"images": list(gt_data["images"]), "categories": list(gt_data["categories"]), "annotations": []}
        coco_dt = _make_coco(backend, empty)
    evaluator = _run_cocoeval(backend, coco_gt, coco_dt, caps)
    return _metrics(evaluator, coco_gt, caps, backend, print_summary)


def _metrics(evaluator: Any, coco_gt: Any, caps: tuple[int, int, int], backend: str, print_summary: bool) -> dict:
    """Collect the metrics dict of `coco_evaluate` from an accumulated COCOeval."""
    params = evaluator.params
    precision = np.asarray(evaluator.eval["precision"], dtype=np.float64)  # [T, R, K, A, M]
    recall = np.asarray(evaluator.eval["recall"], dtype=np.float64)  # [T, K, A, M]
    iou_thrs = np.asarray(params.iouThrs)
    stats = stats_from_eval(precision, recall, iou_thrs, list(params.areaRngLbl))
    cat_ids = [int(c) for c in params.catIds]
    names = [coco_gt.cats[c]["name"] for c in cat_ids]
    a_all = list(params.areaRngLbl).index("all")
    t50 = int(np.flatnonzero(np.isclose(iou_thrs, 0.5))[0])
    per_class = precision[:, :, :, a_all, -1]  # [T, R, K]
    ap = np.array([_mean_valid(per_class[:, :, k]) for k in range(len(cat_ids))])  # [K], -1: no ground truth
    ap50 = np.array([_mean_valid(per_class[t50, :, k]) for k in range(len(cat_ids))])  # [K]
    ap, ap50 = np.where(ap < 0, np.nan, ap), np.where(ap50 < 0, np.nan, ap50)
    pr = np.where(per_class[t50] > -1, per_class[t50], np.nan)  # [R, K]
    metrics: dict[str, Any] = dict(zip(stat_names(caps), stats, strict=True))
    metrics.update(
        coco_stats=stats,
        max_dets=caps,
        backend=backend,
        class_names=names,
        category_ids=cat_ids,
        per_class_AP=dict(zip(names, ap.tolist(), strict=True)),
        per_class_AP50=dict(zip(names, ap50.tolist(), strict=True)),
        precision=pr,
    )
    if print_summary:
        print(format_summary(metrics))
    return metrics


def format_summary(metrics: Mapping[str, Any]) -> str:
    """The 12 numbers in pycocotools' printed layout (with the caps actually used)."""
    caps = tuple(metrics.get("max_dets", DEFAULT_MAX_DETS))
    rows = [
        (1, "0.50:0.95", "all", caps[2]),
        (1, "0.50", "all", caps[2]),
        (1, "0.75", "all", caps[2]),
        (1, "0.50:0.95", "small", caps[2]),
        (1, "0.50:0.95", "medium", caps[2]),
        (1, "0.50:0.95", "large", caps[2]),
        (0, "0.50:0.95", "all", caps[0]),
        (0, "0.50:0.95", "all", caps[1]),
        (0, "0.50:0.95", "all", caps[2]),
        (0, "0.50:0.95", "small", caps[2]),
        (0, "0.50:0.95", "medium", caps[2]),
        (0, "0.50:0.95", "large", caps[2]),
    ]
    lines = []
    for (is_ap, iou, area, cap), value in zip(rows, metrics["coco_stats"], strict=True):
        title = "Average Precision  (AP)" if is_ap else "Average Recall     (AR)"
        lines.append(f" {title} @[ IoU={iou:<9} | area={area:>6s} | maxDets={cap:>3d} ] = {value:0.3f}")
    return "\n".join(lines)


def format_table(metrics: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """A text table: the 12 COCO numbers, then AP and AP50 per class.

    Args:
        metrics: `coco_evaluate` output.
        class_names: classes to list, in this order (default: all ground-truth categories). Classes without
            ground truth show "-".

    Returns:
        Multi-line text.
    """
    names = stat_names(tuple(metrics.get("max_dets", DEFAULT_MAX_DETS)))
    lines = ["COCO box metrics (maxDets " + "/".join(str(m) for m in metrics["max_dets"]) + ")"]
    lines += [f"  {name:<6} {value:7.4f}" for name, value in zip(names, metrics["coco_stats"], strict=True)]
    per_class, per_class50 = metrics["per_class_AP"], metrics.get("per_class_AP50", {})
    classes = list(class_names) if class_names is not None else list(per_class)
    if classes:
        width = max(10, *(len(c) for c in classes))
        lines.append(f"  {'class':<{width}}  {'AP':>7}  {'AP50':>7}")
        for name in classes:
            ap, ap50 = per_class.get(name, math.nan), per_class50.get(name, math.nan)
            cells = ["      -" if math.isnan(v) else f"{v:7.4f}" for v in (ap, ap50)]
            lines.append(f"  {name:<{width}}  {cells[0]}  {cells[1]}")
    return "\n".join(lines)
