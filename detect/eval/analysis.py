"""Detection analysis after validation: confusion matrix with background, P / R / F1 against confidence, per-class AP.

Inputs are what val_det writes anyway: the COCO ground truth (`gt.json`'s dict) and the COCO results
(`predictions.json`), boxes in original pixels.

- **Confusion matrix** (as Ultralytics draws it): the detections scoring above `conf` (0.25) are matched to the
  ground truth by IoU above `iou` (0.45), each detection and each ground-truth box at most once, highest IoU first,
  regardless of class. A match counts at (predicted class, true class); an unmatched ground-truth box at
  (background, true class): missed; an unmatched detection at (predicted class, background): a false positive. Rows
  are predicted, columns true; the normalised picture divides each column by its total (recall on the diagonal).
- **P, R, F1 against confidence**: per class, detections sorted by score are matched greedily to unmatched ground
  truth of their class with IoU >= 0.5 (COCO's rule at IoU 0.5); at each confidence threshold t the detections
  scoring >= t give precision TP / (TP + FP), recall TP / ground truth, and F1 = 2PR / (P + R). The class mean is
  drawn bold, with the threshold of the best mean F1.
- **Per-class AP**: horizontal bars of AP (0.5:0.95) and AP50 per class, sorted, drawn when there are at least two
  classes. Figures grow with the number of classes, so 200 classes stay legible.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from detect.boxes import box_iou, xywh2xyxy
from detect.eval.viz import _save_figure

_MAX_CURVE_CLASSES = 20  # thin per-class curves on the P / R / F1 plot
_MAX_CELL_NUMBERS = 30  # confusion-matrix cells carry numbers up to this many classes


def group_by_image(gt: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]], class_ids: Sequence[int]) -> list:
    """Per image: (gt boxes [n, 4] xyxy, gt labels [n], det boxes [k, 4], det scores [k], det labels [k])."""
    index = {int(c): i for i, c in enumerate(class_ids)}
    images = {int(im["id"]): ([], [], [], [], []) for im in gt["images"]}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            images[int(ann["image_id"])][0].append(ann["bbox"])
            images[int(ann["image_id"])][1].append(index[int(ann["category_id"])])
    for det in predictions:
        entry = images[int(det["image_id"])]
        entry[2].append(det["bbox"])
        entry[3].append(det["score"])
        entry[4].append(index[int(det["category_id"])])
    out = []
    for g_boxes, g_labels, d_boxes, d_scores, d_labels in images.values():
        out.append((
            xywh2xyxy(torch.tensor(g_boxes, dtype=torch.float64).reshape(-1, 4)),
            np.asarray(g_labels, dtype=np.int64),
            xywh2xyxy(torch.tensor(d_boxes, dtype=torch.float64).reshape(-1, 4)),
            np.asarray(d_scores, dtype=np.float64),
            np.asarray(d_labels, dtype=np.int64),
        ))  # fmt: skip
    return out


def confusion_matrix(grouped: list, num_classes: int, conf: float = 0.25, iou: float = 0.45) -> np.ndarray:
    """[C + 1, C + 1] counts, rows predicted and columns true class, index C = background (see the module doc)."""
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for g_boxes, g_labels, d_boxes, d_scores, d_labels in grouped:
        keep = d_scores > conf
        d_boxes, d_labels = d_boxes[torch.from_numpy(keep)], d_labels[keep]
        matched_gt, matched_det = set(), set()
        if len(g_labels) and len(d_labels):
            overlaps = box_iou(g_boxes, d_boxes).numpy()  # [n, k]
            gi, di = np.nonzero(overlaps > iou)
            for k in np.argsort(-overlaps[gi, di], kind="stable"):  # highest IoU first, each box once
                if gi[k] not in matched_gt and di[k] not in matched_det:
                    matched_gt.add(gi[k])
                    matched_det.add(di[k])
                    matrix[d_labels[di[k]], g_labels[gi[k]]] += 1
        for g in range(len(g_labels)):
            if g not in matched_gt:
                matrix[num_classes, g_labels[g]] += 1
        for d in range(len(d_labels)):
            if d not in matched_det:
                matrix[d_labels[d], num_classes] += 1
    return matrix


def pr_f1_curves(grouped: list, num_classes: int, thresholds: np.ndarray, iou: float = 0.5) -> dict[str, np.ndarray]:
    """Precision, recall and F1 per class at each confidence threshold: arrays [C, T]; classes without ground truth
    are NaN rows."""
    scores: list[list[float]] = [[] for _ in range(num_classes)]
    hits: list[list[bool]] = [[] for _ in range(num_classes)]
    totals = np.zeros(num_classes, dtype=np.int64)
    for g_boxes, g_labels, d_boxes, d_scores, d_labels in grouped:
        totals += np.bincount(g_labels, minlength=num_classes)
        for c in np.unique(d_labels):
            dets = np.flatnonzero(d_labels == c)
            dets = dets[np.argsort(-d_scores[dets], kind="stable")]
            gts = np.flatnonzero(g_labels == c)
            overlaps = box_iou(d_boxes[dets], g_boxes[gts]).numpy() if len(gts) else np.zeros((len(dets), 0))
            taken = np.zeros(len(gts), dtype=bool)
            for row, d in enumerate(dets):
                candidates = np.where(~taken & (overlaps[row] >= iou), overlaps[row], -1.0)
                best = int(candidates.argmax()) if len(gts) else -1
                hit = best >= 0 and candidates[best] >= iou
                if hit:
                    taken[best] = True
                scores[c].append(float(d_scores[d]))
                hits[c].append(bool(hit))
    precision = np.full((num_classes, len(thresholds)), np.nan)
    recall = np.full((num_classes, len(thresholds)), np.nan)
    for c in range(num_classes):
        if totals[c] == 0:
            continue
        s, h = np.asarray(scores[c]), np.asarray(hits[c], dtype=bool)
        above = s[None, :] >= thresholds[:, None]  # [T, k]
        tp = (above & h[None, :]).sum(1)
        count = above.sum(1)
        precision[c] = np.where(count > 0, tp / np.maximum(count, 1), 1.0)  # no detection left: precision 1
        recall[c] = tp / totals[c]
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-16)
    return {"precision": precision, "recall": recall, "f1": f1}


def normalize_columns(matrix: np.ndarray) -> np.ndarray:
    """Each column (a true class, or background) divided by its total: recall on the diagonal; empty columns 0."""
    counts = matrix.astype(np.float64)
    totals = counts.sum(axis=0, keepdims=True)  # [1, C + 1] per true class
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def best_f1(curves: Mapping[str, np.ndarray], thresholds: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The class-mean F1 against the threshold `[T]` over the classes with ground truth, and the index of its best
    threshold; None when no class has ground truth."""
    valid = np.isfinite(curves["precision"]).all(axis=1)
    if not valid.any():
        return None
    mean = curves["f1"][valid].mean(axis=0)  # [T]
    return mean, int(mean.argmax())


def plot_detection_confusion(matrix: np.ndarray, names: Sequence[str], out_png: str | os.PathLike,
                             normalize: bool, conf: float, iou: float) -> Path:  # fmt: skip
    """Draw `confusion_matrix`'s counts (or column-normalised); background is the last row and column."""
    labels = [*names, "background"]
    n = len(labels)
    values = normalize_columns(matrix) if normalize else matrix.astype(np.float64)
    side = float(np.clip(0.11 * n + 4.5, 6.0, 28.0))
    fig = Figure(figsize=(side + 1.6, side), layout="constrained")
    ax = fig.subplots()
    shown = np.where(values > 0, values, np.nan)  # empty cells stay white
    image = ax.imshow(shown, cmap="Blues", interpolation="none", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class" if normalize else "boxes")
    step = max(1, math.ceil(n / 110))
    ticks = [*range(0, n - 1, step), n - 1]  # background always labelled
    font = float(np.clip(0.8 * side * 72 * 0.8 / n * step, 4.0, 11.0))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=font)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.axhline(n - 1.5, color="grey", linewidth=0.6)
    ax.axvline(n - 1.5, color="grey", linewidth=0.6)
    kind = "normalised per true class" if normalize else "counts"
    ax.set_title(f"confusion matrix ({kind}), conf > {conf}, IoU > {iou}")
    if n <= _MAX_CELL_NUMBERS:
        top = np.nanmax(shown) if np.isfinite(shown).any() else 1.0
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                if v > 0:
                    ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center",
                            fontsize=max(font - 1, 4), color="white" if v > 0.55 * top else "black")  # fmt: skip
    return _save_figure(fig, out_png)


def plot_pr_f1(curves: Mapping[str, np.ndarray], thresholds: np.ndarray, names: Sequence[str],
               out_png: str | os.PathLike) -> Path:  # fmt: skip
    """Three panels, precision / recall / F1 against the confidence threshold; class mean bold."""
    valid = np.flatnonzero(np.isfinite(curves["precision"]).all(axis=1))
    picks = valid[np.linspace(0, len(valid) - 1, min(len(valid), _MAX_CURVE_CLASSES)).round().astype(int)] \
        if len(valid) else valid  # fmt: skip
    fig = Figure(figsize=(16.0, 5.0), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(axes, ("precision", "recall", "f1"), ("precision", "recall", "F1"), strict=True):
        values = curves[key]
        for c in picks if len(valid) > 1 else []:
            ax.plot(thresholds, values[c], linewidth=0.7, alpha=0.6, label=names[c])
        if len(valid):
            mean = values[valid].mean(axis=0)  # [T]
            label = "all classes"
            if key == "f1":
                mean, best = best_f1(curves, thresholds)
                label = f"all classes: best {mean[best]:.3f} at conf {thresholds[best]:.3f}"
                ax.axvline(thresholds[best], color="grey", linestyle="--", linewidth=0.8)
            ax.plot(thresholds, mean, color="black", linewidth=2.5, label=label)
        else:
            ax.text(0.5, 0.5, "no class with ground truth", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence threshold")
        ax.set_title(f"{title} against confidence (IoU 0.5)")
        ax.grid(True, alpha=0.3)
    if len(valid):
        axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{len(picks) if len(valid) > 1 else 0} of {len(valid)} classes drawn thin")
    return _save_figure(fig, out_png)


def plot_per_class_ap(metrics: Mapping[str, Any], names: Sequence[str], out_png: str | os.PathLike) -> Path | None:
    """Horizontal AP and AP50 bars per class, sorted by AP; None (no picture) for fewer than two classes."""
    if len(names) < 2:
        return None
    ap = np.array([np.nan if metrics["per_class_AP"].get(n) is None else metrics["per_class_AP"][n] for n in names],
                  dtype=np.float64)  # fmt: skip
    ap50 = np.array([np.nan if metrics["per_class_AP50"].get(n) is None else metrics["per_class_AP50"][n]
                     for n in names], dtype=np.float64)  # fmt: skip
    order = np.argsort(np.nan_to_num(ap, nan=-1.0), kind="stable")  # worst at the bottom, best on top
    height = float(np.clip(0.16 * len(names) + 1.5, 3.0, 40.0))
    fig = Figure(figsize=(9.0, height), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(ap50[order]), color="#9ecae1", height=0.8, label="AP50")
    ax.barh(y, np.nan_to_num(ap[order]), color="#08519c", height=0.5, label="AP (0.5:0.95)")
    font = float(np.clip(0.9 * height * 72 / max(len(names), 1), 4.0, 10.0))
    ax.set_yticks(y, [names[i] + (" (no ground truth)" if np.isnan(ap[i]) else "") for i in order], fontsize=font)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlim(0, 1)
    mean = np.nanmean(ap) if np.isfinite(ap).any() else float("nan")
    ax.axvline(mean, color="black", linestyle="--", linewidth=1.0, label=f"mean AP {mean:.3f}")
    ax.set_xlabel("average precision")
    ax.set_title(f"per-class AP ({len(names)} classes)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save_figure(fig, out_png)


def save_analysis(gt: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any],
                  names: Sequence[str], out_dir: str | os.PathLike, conf: float = 0.25,
                  iou: float = 0.45) -> list[Path]:  # fmt: skip
    """Write confusion_matrix.png, confusion_matrix_normalized.png, pr_f1_curves.png and (two classes or more)
    per_class_ap.png into `out_dir`; class order = `names` (the data set's categories sorted by id)."""
    out_dir = Path(out_dir)
    class_ids = sorted(int(c["id"]) for c in gt["categories"])
    grouped = group_by_image(gt, predictions, class_ids)
    matrix = confusion_matrix(grouped, len(names), conf, iou)
    thresholds = np.linspace(0.0, 1.0, 201)
    written = [plot_detection_confusion(matrix, names, out_dir / "confusion_matrix.png", False, conf, iou),
               plot_detection_confusion(matrix, names, out_dir / "confusion_matrix_normalized.png", True, conf, iou),
               plot_pr_f1(pr_f1_curves(grouped, len(names), thresholds), thresholds, names,
                          out_dir / "pr_f1_curves.png")]  # fmt: skip
    bars = plot_per_class_ap(metrics, names, out_dir / "per_class_ap.png")
    return written + ([bars] if bars else [])
