"""Properties (hypothesis) of bad boxes: arbitrary, broken boxes (NaN, inf, inverted, outside the image) through the
repair every source applies (`sanitize_boxes`) and through the whole YOLOv8 train pipeline with random
hyper-parameters. Conversions, letterbox round trips and augmentation of fixed sources are in test_boxes.py,
test_transforms.py and test_detection_dataset.py; how bad input is reported is in test_failures.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from detect.data.detection import DetectionDataset
from detect.data.source import sanitize_boxes

wild = st.floats(min_value=-500.0, max_value=1500.0) | st.sampled_from([float("nan"), float("inf"), -float("inf")])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(wild, wild, wild, wild), max_size=8), st.integers(1, 900), st.integers(1, 900))
@example([(0.0, 0.0, 1.0, 2e-189)], 1, 1)  # positive in float64, zero height in float32
def test_sanitized_boxes_are_inside_with_positive_area(boxes: list, height: int, width: int) -> None:
    labels = np.arange(len(boxes), dtype=np.int64)
    fixed = sanitize_boxes(np.array(boxes, dtype=np.float64).reshape(-1, 4), labels, height, width)
    kept = fixed.boxes
    assert kept.dtype == np.float32 and len(kept) == len(fixed.labels) == len(boxes) - fixed.dropped
    assert np.isfinite(kept).all() and 0 <= fixed.clipped <= len(kept)
    assert (kept[:, [0, 2]] >= 0).all() and (kept[:, [0, 2]] <= width).all()
    assert (kept[:, [1, 3]] >= 0).all() and (kept[:, [1, 3]] <= height).all()
    assert (kept[:, 2] > kept[:, 0]).all() and (kept[:, 3] > kept[:, 1]).all()
    assert set(fixed.labels.tolist()) <= set(labels.tolist())  # labels travel with their boxes, in order
    assert fixed.labels.tolist() == sorted(fixed.labels.tolist())


class WildSource:
    """One in-memory image per example, with whatever boxes hypothesis drew, repaired as every source does."""

    def __init__(self, height: int, width: int, boxes: list) -> None:
        self.height, self.width = height, width
        raw = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        fixed = sanitize_boxes(raw, np.zeros(len(raw), np.int64), height, width)
        self.boxes, self.labels = fixed.boxes, fixed.labels
        self.class_names, self.category_ids, self.image_ids = ["a"], [1], [0, 1, 2, 3]

    def __len__(self) -> int:
        return 4

    def image_path(self, i: int) -> Path:
        return Path(f"/nonexistent/{i}.jpg")

    def image_size(self, i: int) -> tuple[int, int]:
        return self.height, self.width

    def load_image(self, i: int) -> np.ndarray:
        return np.full((self.height, self.width, 3), 40 * i, dtype=np.uint8)

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.boxes, self.labels


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(8, 200),
    width=st.integers(8, 200),
    boxes=st.lists(st.tuples(wild, wild, wild, wild), max_size=5),
    mosaic=st.sampled_from([0.0, 1.0]),
    scale=st.floats(0.0, 0.9),
    translate=st.floats(0.0, 0.5),
    fliplr=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_train_pipeline_keeps_every_box_inside_with_positive_area(
    height: int, width: int, boxes: list, mosaic: float, scale: float, translate: float, fliplr: float, seed: int
) -> None:
    data = DetectionDataset(WildSource(height, width, boxes), 64, train=True, mosaic=mosaic, scale=scale,
                            translate=translate, fliplr=fliplr, seed=seed)  # fmt: skip
    image, out_boxes, labels, _ = data[(seed % 4, seed % 7)]
    assert image.shape == (3, 64, 64) and len(out_boxes) == len(labels)
    assert torch.isfinite(out_boxes).all() and (out_boxes >= 0).all() and (out_boxes <= 64).all()
    assert (out_boxes[:, 2] > out_boxes[:, 0]).all() and (out_boxes[:, 3] > out_boxes[:, 1]).all()
