"""Tests of detect/data/mosaic.py: exact layout, and boxes that keep matching pixels through Mosaic + affine + flip."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from detect.data.detection import DetectionDataset
from detect.data.mosaic import mosaic4, random_centre

BACKGROUND = (80, 80, 80)
# 24 saturated colours on the grid {30, 130, 230}^3 without the greys: any two differ by >= 100 on some channel
PALETTE = [c for c in itertools.product((30, 130, 230), repeat=3) if len(set(c)) > 1]
SIZES = [(180, 240), (300, 200), (150, 150), (260, 400), (200, 330), (240, 180), (120, 300), (320, 320)]


class RectSource:
    """In-memory detection source: uniform background, solid rectangles exactly at the boxes, one colour per label.

    Image k holds two rectangles with the labels 2k and 2k + 1, at least 12 px from the border and from each other.
    """

    def __init__(self) -> None:
        self.items = []
        for k, (h, w) in enumerate(SIZES):
            left = [12, 12, w // 2 - 6, h // 2 - 6]
            right = [w // 2 + 6, h // 3, w - 12, h - 12]
            self.items.append((h, w, np.array([left, right], dtype=np.float32), np.array([2 * k, 2 * k + 1])))
        self.class_names = [f"c{j}" for j in range(2 * len(SIZES))]
        self.category_ids = list(range(1, len(self.class_names) + 1))
        self.image_ids = [100 + k for k in range(len(SIZES))]

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, i: int) -> Path:
        return Path(f"/nonexistent/{i}.png")

    def image_size(self, i: int) -> tuple[int, int]:
        return self.items[i][:2]

    def load_image(self, i: int) -> np.ndarray:
        h, w, boxes, labels = self.items[i]
        image = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
        for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels, strict=True):
            image[y1:y2, x1:x2] = PALETTE[label]
        return image

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.items[i][2].copy(), self.items[i][3].copy()


def colour_mask(image: np.ndarray, label: int, tol: int = 12) -> np.ndarray:
    return np.abs(image.astype(np.int16) - np.array(PALETTE[label], dtype=np.int16)).max(-1) <= tol


def box_mask(shape: tuple[int, int], boxes: np.ndarray, grow: int = 0) -> np.ndarray:
    """Pixels whose centre lies inside any box grown by `grow` px."""
    mask = np.zeros(shape, dtype=bool)
    for x1, y1, x2, y2 in boxes:
        c1, r1 = int(np.floor(x1 - grow + 0.5)), int(np.floor(y1 - grow + 0.5))
        c2, r2 = int(np.ceil(x2 + grow - 0.5)), int(np.ceil(y2 + grow - 0.5))
        mask[max(r1, 0) : max(r2, 0), max(c1, 0) : max(c2, 0)] = True
    return mask


def test_random_centre_range() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([random_centre(64, rng) for _ in range(500)])
    assert centres.min() >= 32 and centres.max() < 96 and centres.min() < 36 and centres.max() > 92


@pytest.mark.parametrize("centre", [(64, 64), (40, 90), (95, 33), (32, 32)])
def test_mosaic4_layout_is_exact(centre: tuple[int, int]) -> None:
    source = RectSource()
    size = 64
    items = []
    for k in (0, 1, 2, 3):  # redrawn at long side S with integer boxes, so every pixel is exact
        h, w = source.image_size(k)
        r = size / max(h, w)
        boxes, labels = source.annotations(k)
        boxes = np.round(boxes * r)
        image = np.full((round(h * r), round(w * r), 3), BACKGROUND, dtype=np.uint8)
        for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels, strict=True):
            image[y1:y2, x1:x2] = PALETTE[label]
        items.append((image, boxes, labels))
    canvas, boxes, labels = mosaic4(items, size, centre)
    assert canvas.shape == (128, 128, 3) and boxes.dtype == np.float32 and labels.dtype == np.int64
    assert (boxes >= 0).all() and (boxes <= 128).all()
    xc, yc = centre
    h0, w0 = items[0][0].shape[:2]
    # image 0 ends exactly at the centre: its bottom-right pixel is the canvas pixel left of and above it
    np.testing.assert_array_equal(canvas[yc - 1, xc - 1], items[0][0][h0 - 1, w0 - 1])
    np.testing.assert_array_equal(canvas[yc, xc], items[3][0][0, 0])
    for label in np.unique(np.concatenate([item[2] for item in items])):
        # boxes are integers here, so the pixels of each colour are exactly the union of its boxes
        assert np.array_equal(colour_mask(canvas, label, tol=0), box_mask((128, 128), boxes[labels == label]))


def test_mosaic4_keeps_empty_images_and_drops_cut_boxes() -> None:
    empty = (np.full((64, 64, 3), 7, dtype=np.uint8), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    edge = (np.full((64, 64, 3), 9, dtype=np.uint8), np.array([[0, 0, 10, 10]], np.float32), np.array([5]))
    canvas, boxes, labels = mosaic4([edge, empty, empty, empty], 64, (64, 64))
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 10]])
    canvas, boxes, labels = mosaic4([edge, empty, empty, empty], 64, (40, 40))  # image 0 cut: box outside canvas
    assert boxes.shape == (0, 4) and labels.shape == (0,)
    assert (canvas[:40, :40] == 9).all() and (canvas[:40, 40:104] == 7).all() and (canvas[40:104, :104] == 7).all()
    assert (canvas[104:] == 114).all() and (canvas[:, 104:] == 114).all()


@pytest.mark.parametrize("index", range(8))
def test_pipeline_boxes_enclose_their_rectangles(index: int) -> None:
    """Mosaic -> affine -> flip (HSV off): boxes are their rectangles to 2 px (interpolation), no colour outside."""
    source = RectSource()
    size = 160
    data = DetectionDataset(source, size, train=True, mosaic=1.0, hsv=(0.0, 0.0, 0.0), seed=index)
    for epoch in range(3):
        image, boxes, labels, _ = data[(index, epoch)]
        image, boxes, labels = image.permute(1, 2, 0).numpy(), boxes.numpy(), labels.numpy()
        assert len(boxes) > 0
        for box, label in zip(boxes, labels, strict=True):
            inner = box_mask((size, size), box[None] + np.array([2, 2, -2, -2]))
            assert colour_mask(image, label)[inner].mean() >= 0.99, (epoch, box)
            near = colour_mask(image, label) & box_mask((size, size), box[None], grow=3)
            ys, xs = np.nonzero(near)
            extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert np.abs(extent - box).max() <= 2.0, (epoch, box, extent)
        for label in np.unique(np.concatenate([source.items[k][3] for k in range(len(source))])):
            stray = colour_mask(image, label) & ~box_mask((size, size), boxes[labels == label], grow=2)
            count, _, stats, _ = cv2.connectedComponentsWithStats(stray.astype(np.uint8), connectivity=8)
            for x, y, w, h, _ in stats[1:count]:
                # only boxes YOLOv8's filter dropped leave colour behind: cut by the border or thinner than 2 px
                touches_border = x == 0 or y == 0 or x + w == size or y + h == size
                assert touches_border or min(w, h) <= 3, (epoch, label, (x, y, w, h))


class UltralyticsLikeData:
    """The few members Ultralytics' Mosaic reads from its data set, over long-side-S images of RectSource."""

    cache = "ram"  # no buffer: partners drawn with random.randint over the whole set, as ours

    def __init__(self, size: int) -> None:
        from detect.data.transforms import resize_long_side

        source = RectSource()
        self.items = []
        for k in range(len(source)):
            image, boxes = resize_long_side(source.load_image(k), size, source.annotations(k)[0])
            self.items.append((image, boxes, source.annotations(k)[1]))

    def __len__(self) -> int:
        return len(self.items)

    def get_image_and_label(self, i: int) -> dict:
        from ultralytics.utils.instance import Instances

        image, boxes, labels = self.items[i]
        return {
            "img": image.copy(),
            "cls": labels.reshape(-1, 1).astype(np.float32),
            "instances": Instances(boxes.copy(), bbox_format="xyxy", normalized=False),
            "im_file": f"{i}.png",
            "ori_shape": image.shape[:2],
            "resized_shape": image.shape[:2],
        }


@pytest.mark.parametrize("seed", range(4))
def test_mosaic4_matches_ultralytics(seed: int) -> None:
    import random

    from ultralytics.data.augment import Mosaic

    size = 96
    data = UltralyticsLikeData(size)
    random.seed(seed)
    primary = random.randrange(len(data))
    theirs = Mosaic(data, imgsz=size, p=1.0)(data.get_image_and_label(primary))
    random.seed(seed)
    random.randrange(len(data)), random.uniform(0, 1)  # primary, then Mosaic's probability draw
    partners = [random.randint(0, len(data) - 1) for _ in range(3)]
    yc, xc = int(random.uniform(size / 2, 1.5 * size)), int(random.uniform(size / 2, 1.5 * size))
    canvas, boxes, labels = mosaic4([data.items[k] for k in (primary, *partners)], size, (xc, yc))
    assert np.array_equal(canvas, theirs["img"])
    theirs["instances"].convert_bbox(format="xyxy")
    np.testing.assert_allclose(boxes, theirs["instances"].bboxes, atol=1e-4)
    np.testing.assert_array_equal(labels, theirs["cls"].reshape(-1))
