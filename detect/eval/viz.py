"""Pictures of a run: training curves, confusion matrix, PR curve, boxes drawn on images (DESIGN §6).

Matplotlib is used only through its object API (`matplotlib.figure.Figure` rendered by the Agg canvas), so importing
this module never changes pyplot's global backend and works headless. Text on images is drawn with OpenCV's Hershey
fonts and plots use matplotlib's bundled DejaVu: nothing is downloaded. Every file is written atomically: rendered
to a temporary file in the destination folder, then moved into place with `os.replace`, so a reader never sees a
half-written picture.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from backbones.checkpoint import atomic_open, atomic_write_bytes
from backbones.errors import UserError

# 20 distinct, saturated colours (RGB); a class keeps its colour across pictures.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 56, 56), (50, 205, 50), (0, 114, 255), (255, 178, 29), (207, 84, 255),
    (0, 194, 255), (255, 112, 31), (72, 249, 10), (146, 204, 23), (61, 219, 134),
    (26, 147, 52), (0, 212, 187), (44, 153, 168), (52, 69, 147), (100, 115, 255),
    (132, 56, 255), (82, 0, 133), (203, 56, 255), (255, 149, 200), (255, 55, 199),
)  # fmt: skip
_MAX_ANNOTATED_CLASSES = 30  # confusion-matrix cells carry numbers only up to this many classes
_MAX_PR_CLASSES = 20  # per-class curves drawn on the PR plot


def _to_numpy(x: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _save_figure(fig: Figure, out_path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render `fig` with Agg into `out_path` (format from its suffix), atomically."""
    path = Path(out_path)
    FigureCanvasAgg(fig)
    with atomic_open(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
    return path


def _save_image(image: np.ndarray, out_path: str | os.PathLike, quality: int = 90) -> Path:
    """Encode an RGB uint8 image [H, W, 3] with OpenCV (format from the suffix) and write it atomically."""
    path = Path(out_path)
    ext = path.suffix.lower() or ".jpg"
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise UserError(f"cannot encode an image as '{ext}': {path}")
    return atomic_write_bytes(buf.tobytes(), path)


def _read_csv_columns(csv_path: Path) -> dict[str, list[float]]:
    """Every column of a results csv as floats (empty or non-numeric cells become NaN)."""
    if not csv_path.is_file():
        raise UserError(f"results csv not found: {csv_path}")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            columns.setdefault(key.strip(), []).append(number)
    return columns


def plot_curves(
    csv_path: str | os.PathLike, out_png: str | os.PathLike, panels: Sequence[tuple[str, Sequence[str]]]
) -> list[str]:
    """Plot columns of a results csv against the epoch, one subplot per panel.

    Args:
        csv_path: csv with a header row; x is the `epoch` column (row number when absent). Empty cells (a metric
            not measured that epoch) are gaps.
        out_png: picture to write (atomically).
        panels: `(title, [column, ...])` pairs, e.g. `[("loss", ["train/loss", "val/loss"]), ("mAP", ["val/AP"])]`.
            Columns missing from the csv are skipped; a panel with none of its columns is left out.

    Returns:
        The columns actually drawn.
    """
    columns = _read_csv_columns(Path(csv_path))
    num_rows = max((len(v) for v in columns.values()), default=0)
    x = np.asarray(columns.get("epoch", range(num_rows)), dtype=float)
    present = [(title, [c for c in names if c in columns]) for title, names in panels]
    present = [(title, names) for title, names in present if names]
    num_panels = max(len(present), 1)
    ncols = min(num_panels, 3)
    nrows = math.ceil(num_panels / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    marker = "o" if num_rows <= 30 else None
    drawn: list[str] = []
    for ax, (title, names) in zip(axes, present, strict=False):
        for name in names:
            y = np.asarray(columns[name], dtype=float)
            keep = np.isfinite(y) & np.isfinite(x)
            ax.plot(x[keep], y[keep], marker=marker, markersize=3, linewidth=1.5, label=name)
            drawn.append(name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(present) :]:
        ax.axis("off")
    if not present:
        axes[0].text(0.5, 0.5, "no matching columns", ha="center", va="center", transform=axes[0].transAxes)
    _save_figure(fig, out_png)
    return drawn


def _tick_step(num_classes: int, max_labels: int = 100) -> int:
    """Label every k-th class so that at most `max_labels` tick labels are written."""
    return max(1, math.ceil(num_classes / max_labels))


def plot_confusion_matrix(
    matrix: Any, class_names: Sequence[str], out_png: str | os.PathLike, normalize: bool = True
) -> Path:
    """Draw a confusion matrix (rows = true class, columns = predicted class).

    Args:
        matrix: [C, C] counts.
        class_names: C names.
        out_png: picture to write (atomically).
        normalize: divide each row by its total (recall per class on the diagonal); empty rows stay 0.

    Cells carry numbers up to 30 classes; beyond, only colour. Figure size grows with C (readable to ~200 classes,
    where every other name is written).

    Returns:
        The path written.
    """
    counts = _to_numpy(matrix).astype(np.float64)
    num_classes = len(class_names)
    if counts.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {num_classes} class names")
    values, accuracy = normalize_rows(counts) if normalize else counts, overall_accuracy(counts)

    side = float(np.clip(0.12 * num_classes + 4.0, 6.0, 26.0))
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", interpolation="none", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    step = _tick_step(num_classes)
    ticks = np.arange(0, num_classes, step)
    cell_points = side * 72.0 * 0.8 / max(num_classes, 1)  # ~80% of the figure side holds the matrix
    font = float(np.clip(0.8 * cell_points * step, 4.0, 10.0))
    ax.set_xticks(ticks, [class_names[i] for i in ticks], rotation=90, fontsize=font)
    ax.set_yticks(ticks, [class_names[i] for i in ticks], fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    kind = "normalised by true class" if normalize else "counts"
    ax.set_title(f"confusion matrix ({kind}), accuracy {accuracy:.3f}")
    if num_classes <= _MAX_ANNOTATED_CLASSES:
        vmax = values.max() if values.size else 0.0
        for i in range(num_classes):
            for j in range(num_classes):
                v = values[i, j]
                if v == 0:
                    continue
                text = f"{v:.2f}" if normalize else f"{int(v)}"
                colour = "white" if v > 0.5 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=max(font - 2, 4), color=colour)
    return _save_figure(fig, out_png)


def format_score(score: float) -> str:
    """A score for a box label with 3 significant digits: 0.87, 0.123, 0.00123 (a fixed 2 decimals would show the
    low scores validation keeps, down to 0.001, as 0.00)."""
    return f"{float(score):.3g}"


def class_color(label: int, color_seed: int = 0) -> tuple[int, int, int]:
    """The palette colour (RGB) of a contiguous class label; `color_seed` rotates the palette."""
    return PALETTE[(int(label) + int(color_seed)) % len(PALETTE)]


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma of the RGB colour)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def drawing_scale(height: int, width: int) -> tuple[int, float]:
    """Line width (pixels) and Hershey font scale for an image size: ~0.3% of the mean side, at least 1 px."""
    line_width = max(1, round(0.003 * (height + width) / 2))
    return line_width, max(0.3, line_width / 3)


def _draw_label(image: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int], lw: int, fs: float) -> None:
    """Draw `text` on a filled box of `colour` whose bottom-left is (x, y), moved inside the image if needed."""
    h, w = image.shape[:2]
    thickness = max(1, lw - 1)
    (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, thickness)
    box_h = th + baseline + 2
    top = y - box_h if y - box_h >= 0 else y  # above the box if there is room, else inside it
    x = int(np.clip(x, 0, max(w - tw - 2, 0)))
    cv2.rectangle(image, (x, top), (x + tw + 1, top + box_h), colour, thickness=-1)
    cv2.putText(
        image, text, (x + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, fs, text_color(colour), thickness, cv2.LINE_AA
    )


def draw_detections(
    image: Any,
    boxes: Any,
    labels: Any,
    scores: Any | None = None,
    class_names: Sequence[str] | None = None,
    color_seed: int = 0,
    show_labels: bool = True,
) -> np.ndarray:
    """Draw boxes with class name and score on a copy of an image.

    Args:
        image: [H, W, 3] uint8 RGB.
        boxes: [K, 4] xyxy pixels of this image. Pixel rows y1..y2-1 and columns x1..x2-1 (rounded) are covered by
            a box, so its outline is drawn on the first and last covered row and column (then thickened).
        labels: [K] contiguous class labels.
        scores: [K] confidences, or None (ground truth: name only).
        class_names: names indexed by label; None writes the label number.
        color_seed: rotates the palette.
        show_labels: write the name/score tag; False draws the outlines only.

    Returns:
        [H, W, 3] uint8 RGB, a new array. Line width and font scale grow with the image (readable 64 to 4000 px).
    """
    out = np.ascontiguousarray(_to_numpy(image), dtype=np.uint8).copy()
    if out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(f"draw_detections needs an [H, W, 3] image, got shape {out.shape}")
    boxes_np = _to_numpy(boxes).reshape(-1, 4).astype(np.float64)  # [K, 4]
    labels_np = _to_numpy(labels).reshape(-1).astype(np.int64)  # [K]
    scores_np = None if scores is None else _to_numpy(scores).reshape(-1).astype(np.float64)  # [K]
    lw, fs = drawing_scale(*out.shape[:2])
    for k in range(len(boxes_np)):
        x1, y1, x2, y2 = (int(round(v)) for v in boxes_np[k])
        p2 = (max(x2 - 1, x1), max(y2 - 1, y1))
        colour = class_color(labels_np[k], color_seed)
        cv2.rectangle(out, (x1, y1), p2, colour, thickness=lw, lineType=cv2.LINE_8)
        if show_labels:
            label = int(labels_np[k])
            name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
            text = name if scores_np is None else f"{name} {format_score(scores_np[k])}"
            _draw_label(out, text, x1, y1, colour, lw, fs)
    return out


def _unpack(entry: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(boxes [K,4], labels [K], scores [K] or None) from a dict with those keys or a (boxes, labels[, scores])."""
    if isinstance(entry, dict):
        scores = entry.get("scores")
        return _to_numpy(entry["boxes"]), _to_numpy(entry["labels"]), None if scores is None else _to_numpy(scores)
    boxes, labels, *rest = entry
    return _to_numpy(boxes), _to_numpy(labels), _to_numpy(rest[0]) if rest and rest[0] is not None else None


def _tile(
    image: np.ndarray, entry: Any, class_names: Sequence[str], size: int, title: str, min_score: float = 0.0
) -> np.ndarray:
    """Resize an image to fit `size` x `size`, draw its boxes (scored ones from `min_score`) at that scale, pad, and
    put a title bar on top."""
    boxes, labels, scores = _unpack(entry)
    if scores is not None:
        keep = scores >= min_score
        boxes, labels, scores = boxes.reshape(-1, 4)[keep], labels[keep], scores[keep]
    h, w = image.shape[:2]
    ratio = size / max(h, w)
    new_w, new_h = max(1, round(w * ratio)), max(1, round(h * ratio))
    small = cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_AREA)
    drawn = draw_detections(small, boxes.reshape(-1, 4) * ratio, labels, scores, class_names)
    canvas = np.full((size + 24, size, 3), 114, dtype=np.uint8)
    canvas[24 : 24 + new_h, :new_w] = drawn
    canvas[:24] = 40
    cv2.putText(canvas, title, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def save_gt_vs_pred_grid(
    images: Sequence[Any],
    gts: Sequence[Any],
    preds: Sequence[Any],
    class_names: Sequence[str],
    out_jpg: str | os.PathLike,
    max_images: int = 8,
    tile_size: int = 320,
    min_score: float = 0.25,
) -> Path:
    """Write a grid where each image appears twice: ground truth (left) beside prediction (right).

    Args:
        images: [H, W, 3] uint8 RGB images (any sizes).
        gts: per image, `dict(boxes, labels)` or `(boxes, labels)`; boxes [n, 4] xyxy pixels of that image.
        preds: per image, `dict(boxes, scores, labels)` (postprocess output in original pixels).
        class_names: names indexed by label.
        out_jpg: picture to write (atomically).
        max_images: images shown (the first ones); two pairs per row.
        tile_size: side of each square tile in pixels.
        min_score: predictions drawn from this score up (validation keeps boxes down to 0.001; the prediction
            threshold 0.25 shows what a user would see).

    Returns:
        The path written.
    """
    n = min(len(images), len(gts), len(preds), max_images)
    if n == 0:
        raise ValueError("save_gt_vs_pred_grid needs at least one image")
    pairs = [
        np.concatenate(
            [
                _tile(_to_numpy(images[i]), gts[i], class_names, tile_size, "ground truth"),
                _tile(
                    _to_numpy(images[i]),
                    preds[i],
                    class_names,
                    tile_size,
                    f"prediction (score >= {min_score})",
                    min_score,
                ),  # fmt: skip
            ],
            axis=1,
        )  # [S+24, 2S, 3]
        for i in range(n)
    ]
    per_row = 1 if n == 1 else 2
    blank = np.full_like(pairs[0], 255)
    pairs += [blank] * (-n % per_row)
    rows = [np.concatenate(pairs[r : r + per_row], axis=1) for r in range(0, len(pairs), per_row)]
    return _save_image(np.concatenate(rows, axis=0), out_jpg)


def normalize_rows(counts: np.ndarray) -> np.ndarray:
    """Each row (a true class) divided by its total: recall per class on the diagonal; empty rows stay 0."""
    counts = counts.astype(np.float64)
    row_sums = counts.sum(axis=1, keepdims=True)  # [C, 1]
    return np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)


def overall_accuracy(counts: np.ndarray) -> float:
    """The diagonal over the total (0 for an empty matrix)."""
    total = counts.sum()
    return float(np.trace(counts) / total) if total > 0 else 0.0


def pr_curves_at_50(precision: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What `plot_pr_curve` draws: (recall thresholds [R], per-class precision [R, C] with NaN for a class without
    ground truth, the mean over the classes with ground truth [R] or None)."""
    prec = _to_numpy(precision).astype(np.float64)
    prec = np.where(prec < 0, np.nan, prec)  # -1 marks a class without ground truth
    valid = np.flatnonzero(np.isfinite(prec).all(axis=0))
    mean = prec[:, valid].mean(axis=1) if len(valid) else None  # [R]
    return np.linspace(0.0, 1.0, prec.shape[0]), prec, mean


def plot_pr_curve(precision: Any, class_names: Sequence[str], out_png: str | os.PathLike) -> Path:
    """Precision-recall curves at IoU 0.5: the class mean in bold, up to 20 classes thin.

    Args:
        precision: [R, C] interpolated precision at R evenly spaced recall thresholds from 0 to 1 (COCO's 101),
            e.g. `coco_evaluate(...)["precision"]`. Columns of classes without ground truth hold NaN or -1 and
            are left out.
        class_names: C names.
        out_png: picture to write (atomically).

    Returns:
        The path written.
    """
    shape = tuple(_to_numpy(precision).shape)
    if len(shape) != 2 or shape[1] != len(class_names):
        raise ValueError(f"precision shape {shape} does not match {len(class_names)} class names")
    recall, prec, mean_curve = pr_curves_at_50(precision)
    valid = np.flatnonzero(np.isfinite(prec).all(axis=0))
    fig = Figure(figsize=(9.0, 5.5), layout="constrained")
    ax = fig.subplots()
    picks = np.linspace(0, len(valid) - 1, min(len(valid), _MAX_PR_CLASSES)).round().astype(int)
    shown = valid[picks] if len(valid) else valid  # spread over the classes, not the first 20
    for k in shown:
        ax.plot(recall, prec[:, k], linewidth=0.8, alpha=0.7, label=f"{class_names[k]} {prec[:, k].mean():.3f}")
    if mean_curve is not None:
        ax.plot(recall, mean_curve, linewidth=3.0, color="black", label=f"all classes {mean_curve.mean():.3f} AP50")
    else:
        ax.text(0.5, 0.5, "no class with ground truth", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"precision-recall at IoU 0.5 ({len(shown)} of {len(valid)} classes drawn)")
    ax.grid(True, alpha=0.3)
    if len(valid):
        ax.legend(fontsize=7 if len(shown) > 10 else 8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save_figure(fig, out_png)
