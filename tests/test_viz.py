"""Pictures: files are valid images of sensible size, boxes land on exact pixels, writes are atomic."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from backbones.errors import UserError
from detect.eval.viz import (
    class_color,
    draw_detections,
    drawing_scale,
    plot_confusion_matrix,
    plot_curves,
    plot_pr_curve,
    save_gt_vs_pred_grid,
    text_color,
)


def read_image(path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} is not a readable image"
    return image


def write_csv(path) -> None:
    path.write_text(
        "epoch,train/loss,val/loss,val/top1,lr\n0,2.0,2.1,0.10,0.01\n1,1.5,,0.30,0.009\n2,1.2,1.4,0.50,0.008\n"
    )


def test_plot_curves_skips_unknown_columns_and_leaves_no_temp_file(tmp_path):
    write_csv(tmp_path / "results.csv")
    panels = [("loss", ["train/loss", "val/loss", "no/such"]), ("acc", ["val/top1", "val/top5"]), ("x", ["zz"])]
    drawn = plot_curves(tmp_path / "results.csv", tmp_path / "curves.png", panels)
    assert drawn == ["train/loss", "val/loss", "val/top1"]
    image = read_image(tmp_path / "curves.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 800  # two panels side by side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "results.csv"]


def test_plot_curves_with_no_matching_column_still_writes(tmp_path):
    write_csv(tmp_path / "results.csv")
    assert plot_curves(tmp_path / "results.csv", tmp_path / "c.png", [("x", ["zz"])]) == []
    read_image(tmp_path / "c.png")


def test_plot_curves_missing_csv_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        plot_curves(tmp_path / "nope.csv", tmp_path / "c.png", [("loss", ["train/loss"])])


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    write_csv(tmp_path / "results.csv")
    target = tmp_path / "curves.xyz"  # matplotlib has no 'xyz' writer: rendering fails mid-way
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        plot_curves(tmp_path / "results.csv", target, [("loss", ["train/loss"])])
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.xyz", "results.csv"]


@pytest.mark.parametrize("num_classes", [5, 200])
def test_confusion_matrix_is_an_image_that_grows_with_classes(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 5, (num_classes, num_classes))
    matrix[np.arange(num_classes), np.arange(num_classes)] += 20
    names = [f"species_{i:03d}" for i in range(num_classes)]
    plot_confusion_matrix(matrix, names, tmp_path / "cm.png")
    h, w = read_image(tmp_path / "cm.png").shape[:2]
    assert (h >= 2500) if num_classes == 200 else (500 <= h <= 1200)
    assert w >= h
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png"]


def test_confusion_matrix_counts_from_a_tensor(tmp_path):
    matrix = torch.tensor([[5, 1, 0], [0, 3, 2], [0, 0, 0]])  # an empty row must not divide by zero
    plot_confusion_matrix(matrix, ["a", "b", "c"], tmp_path / "counts.png", normalize=False)
    plot_confusion_matrix(matrix, ["a", "b", "c"], tmp_path / "norm.png")
    read_image(tmp_path / "counts.png")
    read_image(tmp_path / "norm.png")


def test_confusion_matrix_shape_mismatch():
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion_matrix(np.zeros((3, 3)), ["a", "b"], "unused.png")


def test_draw_detections_colours_exactly_the_box_outline():
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    out = draw_detections(image, np.array([[20.0, 30.0, 70.0, 80.0]]), np.array([3]), show_labels=False)
    expected = np.zeros((100, 120), dtype=bool)  # box covers rows 30..79, columns 20..69
    expected[30:80, [20, 69]] = True
    expected[[30, 79], 20:70] = True
    changed = (out != 0).any(axis=2)
    assert np.array_equal(changed, expected)
    assert (out[expected] == class_color(3)).all()
    assert (image == 0).all()  # the input is not modified


def test_draw_detections_label_sits_above_the_box():
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    boxes = torch.tensor([[20.0, 30.0, 70.0, 80.0]])
    out = draw_detections(image, boxes, torch.tensor([0]), torch.tensor([0.87]), ["wren"])
    changed = (out != 0).any(axis=2)
    assert changed[:30].any()  # the tag is above the box
    assert not changed[31:79, 21:69].any() and not changed[80:].any()  # inside and below untouched


def test_draw_detections_scales_with_image_size():
    assert drawing_scale(64, 64) == (1, pytest.approx(1 / 3))
    assert drawing_scale(4000, 4000) == (12, 4.0)
    big = np.full((3000, 4000, 3), 255, dtype=np.uint8)
    out = draw_detections(big, np.array([[1000, 1000, 3000, 2500]]), np.array([1]), np.array([0.5]), ["a", "gull"])
    rows = np.flatnonzero((out[:1000] != 255).any(axis=(1, 2)))
    assert 1000 - rows.min() >= 60  # a tag tall enough to read on a 4000 px image
    on_line = np.flatnonzero((out[900:1100, 2000] == class_color(1)).all(axis=1)) + 900
    assert on_line.tolist() == list(range(995, 1006))  # the 12 px line is centred on row 1000 (OpenCV draws 11)


def test_text_colour_follows_luminance():
    assert text_color((255, 255, 0)) == (0, 0, 0)
    assert text_color((0, 0, 128)) == (255, 255, 255)


def test_gt_vs_pred_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (480, 640), (900, 300)]]
    gts = [(np.array([[5, 5, 40, 50]]), np.array([0])), {"boxes": np.zeros((0, 4)), "labels": np.zeros(0)}]
    gts.append((np.array([[10, 10, 200, 800]]), np.array([1])))
    preds = [
        {"boxes": torch.tensor([[6.0, 4.0, 41.0, 52.0]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([0])}
        for _ in images
    ]
    save_gt_vs_pred_grid(images, gts, preds, ["sparrow", "tern"], tmp_path / "val.jpg")
    assert read_image(tmp_path / "val.jpg").shape == (2 * 344, 4 * 320, 3)  # two pairs per row, 24 px title bars
    save_gt_vs_pred_grid(images, gts, preds, ["sparrow", "tern"], tmp_path / "one.jpg", max_images=1)
    assert read_image(tmp_path / "one.jpg").shape == (344, 640, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jpg", "val.jpg"]


def test_pr_curve(tmp_path):
    rng = np.random.default_rng(0)
    precision = np.sort(rng.random((101, 30)), axis=0)[::-1]  # [R, C], decreasing in recall
    precision[:, 4] = -1  # class without ground truth
    precision[:, 7] = np.nan
    plot_pr_curve(precision, [f"c{i}" for i in range(30)], tmp_path / "pr.png")
    h, w = read_image(tmp_path / "pr.png").shape[:2]
    assert 500 <= h <= 1000 and 800 <= w <= 1400
    plot_pr_curve(np.full((101, 2), -1.0), ["a", "b"], tmp_path / "empty.png")
    read_image(tmp_path / "empty.png")
