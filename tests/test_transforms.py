"""Tests of detect/data/transforms.py: letterbox, resize, HSV, flip, affine, box filter, classification pipelines."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backbones.errors import UserError
from detect.data.cls_transforms import build_cls_transforms, seed_transform
from detect.data.transforms import (
    affine_matrix,
    box_candidates,
    hflip,
    letterbox,
    random_affine,
    random_hsv,
    resize_long_side,
    warp_boxes,
)

RED = (230, 30, 30)


def rect_image(h: int, w: int, box: tuple[int, int, int, int], colour: tuple[int, int, int] = RED) -> np.ndarray:
    """Grey image with a solid rectangle covering columns x1..x2-1 and rows y1..y2-1."""
    image = np.full((h, w, 3), 60, dtype=np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = colour
    return image


def colour_extent(image: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    """Pixel-edge xyxy box of the pixels within `tol` of `colour`."""
    mask = np.abs(image.astype(np.int16) - np.array(colour, dtype=np.int16)).max(-1) <= tol
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


@st.composite
def image_and_boxes(draw: st.DrawFn) -> tuple[int, int, int, np.ndarray]:
    h, w = draw(st.integers(1, 700)), draw(st.integers(1, 700))
    size = draw(st.integers(16, 320))
    n = draw(st.integers(0, 4))
    boxes = []
    for _ in range(n):
        x = sorted(draw(st.floats(0, w, allow_nan=False)) for _ in range(2))
        y = sorted(draw(st.floats(0, h, allow_nan=False)) for _ in range(2))
        boxes.append([x[0], y[0], x[1], y[1]])
    return h, w, size, np.array(boxes, dtype=np.float32).reshape(-1, 4)


@settings(max_examples=60, deadline=None)
@given(image_and_boxes())
def test_letterbox_round_trips_boxes(case: tuple[int, int, int, np.ndarray]) -> None:
    from detect.boxes import scale_boxes_to_original

    h, w, size, boxes = case
    image = np.zeros((h, w, 3), dtype=np.uint8)
    out, mapped, meta = letterbox(image, size, boxes)
    r = min(size / h, size / w)
    assert out.shape == (size, size, 3)
    assert meta["ratio"] == (r, r) and meta["orig_size"] == (h, w)
    left, top = meta["pad"]
    new_w, new_h = min(max(round(w * r), 1), size), min(max(round(h * r), 1), size)
    assert (left, top) == ((size - new_w) // 2, (size - new_h) // 2)
    assert max(new_w, new_h) == size  # one side always fills the square
    np.testing.assert_allclose(mapped, boxes * r + np.array([left, top, left, top]), rtol=1e-5, atol=1e-3)
    assert (mapped >= -1e-3).all() and (mapped <= size + 1e-3).all()
    inline = (mapped - np.array([left, top, left, top], dtype=np.float32)) / r
    np.testing.assert_allclose(inline, boxes, rtol=1e-4, atol=2e-3 / min(r, 1.0))
    back = scale_boxes_to_original(torch.from_numpy(mapped).double(), meta["ratio"], meta["pad"], meta["orig_size"])
    np.testing.assert_allclose(back.numpy(), boxes, rtol=1e-4, atol=2e-3 / min(r, 1.0))


def test_letterbox_pixels_follow_boxes() -> None:
    box = (40, 30, 140, 90)
    image = rect_image(200, 320, box)
    out, mapped, meta = letterbox(image, 160, np.array([box], dtype=np.float32))
    assert meta == {"ratio": (0.5, 0.5), "pad": (0.0, 30.0), "orig_size": (200, 320)}
    np.testing.assert_array_equal(mapped, [[20, 45, 70, 75]])
    np.testing.assert_allclose(colour_extent(out, RED), mapped[0], atol=1)
    assert (out[:30] == 114).all() and (out[130:] == 114).all()  # 160 x 100 content centred vertically


def test_letterbox_identity_and_upscale() -> None:
    image = rect_image(64, 64, (8, 8, 24, 24))
    out, boxes, meta = letterbox(image, 64)
    assert boxes is None and np.array_equal(out, image) and meta["pad"] == (0.0, 0.0)
    out, boxes, meta = letterbox(rect_image(50, 100, (10, 10, 30, 40)), 200, np.array([[10, 10, 30, 40]]))
    assert meta["ratio"] == (2.0, 2.0) and meta["pad"] == (0.0, 50.0)
    np.testing.assert_array_equal(boxes, [[20, 70, 60, 130]])
    with pytest.raises(UserError):
        letterbox(image, 0)


def test_resize_long_side_scales_boxes_per_axis() -> None:
    image = rect_image(300, 450, (45, 30, 90, 120))
    out, boxes = resize_long_side(image, 150, np.array([[45, 30, 90, 120]], dtype=np.float32))
    assert out.shape == (100, 150, 3)
    np.testing.assert_allclose(boxes, [[15, 10, 30, 40]])
    np.testing.assert_allclose(colour_extent(out, RED), boxes[0], atol=1)


def test_hflip_mirrors_boxes_and_pixels_exactly() -> None:
    image = rect_image(40, 100, (10, 5, 30, 25))
    boxes = np.array([[10, 5, 30, 25], [0, 0, 100, 40]], dtype=np.float32)
    flipped, fboxes = hflip(image, boxes)
    np.testing.assert_array_equal(fboxes, [[70, 5, 90, 25], [0, 0, 100, 40]])
    np.testing.assert_array_equal(colour_extent(flipped, RED, tol=0), [70, 5, 90, 25])
    back, bboxes = hflip(flipped, fboxes)
    assert np.array_equal(back, image) and np.array_equal(bboxes, boxes)


def test_random_hsv_matches_yolov8_luts() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    gains = (0.015, 0.7, 0.4)
    out = random_hsv(image, gains, np.random.default_rng(7))
    r = np.random.default_rng(7).uniform(-1, 1, 3) * np.array(gains)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float64)
    expected = np.stack(
        [np.mod(hsv[..., 0] + r[0] * 180, 180), np.clip(hsv[..., 1] * (1 + r[1]), 0, 255), hsv[..., 2] * (1 + r[2])],
        -1,
    )
    expected[..., 2] = np.clip(expected[..., 2], 0, 255)
    expected = cv2.cvtColor(expected.astype(np.uint8), cv2.COLOR_HSV2RGB)
    np.testing.assert_array_equal(out, expected)
    assert np.array_equal(random_hsv(image, (0, 0, 0), np.random.default_rng(0)), image)


def test_affine_matrix_centres_and_scales() -> None:
    m, s = affine_matrix((200, 100), 64, np.random.default_rng(0), scale=0.0, translate=0.0)
    assert s == 1.0
    np.testing.assert_allclose(m @ [50, 100, 1], [32, 32, 1])  # input centre -> output centre
    m, s = affine_matrix((200, 100), 64, np.random.default_rng(1), scale=0.5, translate=0.1)
    assert 0.5 <= s <= 1.5
    np.testing.assert_allclose(m[:2, :2], np.eye(2) * s, atol=1e-12)  # no rotation or shear by default
    assert all(abs(m @ [50, 100, 1] - 32)[:2] <= 0.1 * 64 + 1e-9)


def test_warp_boxes_uses_all_corners() -> None:
    rot90 = np.array([[0.0, -1.0, 10.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # (x, y) -> (10 - y, x)
    np.testing.assert_allclose(warp_boxes(np.array([[1, 2, 4, 8]], dtype=np.float32), rot90), [[2, 1, 8, 4]])
    c, sn = math.cos(math.pi / 4), math.sin(math.pi / 4)
    rot45 = np.array([[c, -sn, 0.0], [sn, c, 0.0], [0, 0, 1]])
    d = 2 * math.sqrt(2)
    np.testing.assert_allclose(warp_boxes(np.array([[-2, -2, 2, 2]], dtype=np.float32), rot45), [[-d, -d, d, d]])
    assert warp_boxes(np.zeros((0, 4), dtype=np.float32), rot90).shape == (0, 4)


def test_box_candidates_yolov8_rules() -> None:
    before = np.array([[0, 0, 100, 100]] * 5, dtype=np.float32)
    after = np.array(
        [
            [0, 0, 40, 40],  # area 16 %: kept
            [0, 0, 30, 30],  # area 9 %: dropped
            [0, 0, 2, 50],  # width 2 px (not > 2): dropped
            [0, 0, 3, 50],  # width 3, area 1.5 %: dropped by area
            [0, 0, 100, 100],  # untouched: kept
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(box_candidates(before, after), [True, False, False, False, True])
    long_box = np.array([[0, 0, 101 * 3, 3]], dtype=np.float32)  # aspect ratio 101
    assert not box_candidates(long_box, long_box)[0]


def test_random_affine_identity_is_exact() -> None:
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    boxes, labels = np.array([[4, 6, 20, 30]], dtype=np.float32), np.array([3])
    out, oboxes, olabels = random_affine(image, boxes, labels, 48, np.random.default_rng(0), scale=0.0, translate=0.0)
    assert np.array_equal(out, image)
    assert np.array_equal(oboxes, boxes) and np.array_equal(olabels, labels)


def test_random_affine_pixels_follow_boxes() -> None:
    box = (50, 40, 110, 100)
    image = rect_image(160, 200, box)
    checked = 0
    for seed in range(8):
        out, boxes, labels = random_affine(image, np.array([box]), np.array([0]), 128, np.random.default_rng(seed))
        assert out.shape == (128, 128, 3) and labels.tolist() == [0] * len(boxes)
        if len(boxes) and (boxes[0, :2] > 0).all() and (boxes[0, 2:] < 128).all():
            # fully visible: the colour extent is the box to interpolation accuracy
            np.testing.assert_allclose(colour_extent(out, RED), boxes[0], atol=1.0)
            checked += 1
    assert checked >= 4


def test_cls_val_pipeline_is_resize_centre_crop_normalize() -> None:
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    out = build_cls_transforms(False, 48, 60)(image=image)["image"]
    assert out.dtype == torch.float32 and out.shape == (3, 48, 48)
    resized = cv2.resize(image, (80, 60), interpolation=cv2.INTER_LINEAR)[6:54, 16:64]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((resized / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("rrc", [False, True])
def test_cls_train_pipeline_is_seedable(rrc: bool) -> None:
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    t = build_cls_transforms(True, 48, 60, random_resized_crop=rrc)
    a = seed_transform(t, (0, 1, 5))(image=image)["image"]
    b = seed_transform(t, (0, 1, 5))(image=image)["image"]
    c = seed_transform(t, (0, 2, 5))(image=image)["image"]
    assert a.shape == (3, 48, 48) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(UserError):
        build_cls_transforms(True, 64, 48)


# --- parity with Ultralytics (numbers, same random draws) -------------------------------------------------------------


class PyRandomShim:
    """Feeds our `rng.uniform` calls from Python's `random`, in the order Ultralytics draws them."""

    def uniform(self, low: float, high: float, size: int | None = None) -> float | np.ndarray:
        import random

        if size is None:
            return random.uniform(low, high)
        return np.array([random.uniform(low, high) for _ in range(size)])


@pytest.mark.parametrize(
    ("h", "w", "size"), [(375, 500, 256), (500, 333, 256), (97, 61, 64), (64, 64, 64), (30, 40, 96)]
)
def test_letterbox_matches_ultralytics(h: int, w: int, size: int) -> None:
    from ultralytics.data.augment import LetterBox

    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    theirs = LetterBox(new_shape=(size, size), auto=False)(image=image.copy())
    assert np.array_equal(letterbox(image, size)[0], theirs)


def test_hsv_matches_ultralytics() -> None:
    from ultralytics.data.augment import RandomHSV

    image = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    for seed in range(5):
        np.random.seed(seed)
        theirs = RandomHSV(0.015, 0.7, 0.4)({"img": np.ascontiguousarray(image[..., ::-1])})["img"][..., ::-1]
        ours = random_hsv(image, (0.015, 0.7, 0.4), np.random.RandomState(seed))
        assert np.array_equal(ours, theirs)


def test_affine_matrix_boxes_and_filter_match_ultralytics() -> None:
    import random

    from ultralytics.data.augment import RandomPerspective

    theirs = RandomPerspective(degrees=10.0, translate=0.1, scale=0.5, shear=5.0, size=(96, 96))
    canvas = np.zeros((192, 160, 3), dtype=np.uint8)
    boxes = np.array([[10, 20, 60, 90], [100, 5, 150, 180], [0, 0, 160, 192]], dtype=np.float32)
    for seed in range(5):
        random.seed(seed)
        m_theirs, s_theirs = theirs._compute_affine_matrix(canvas, (96, 96))
        random.seed(seed)
        random.uniform(0, 0), random.uniform(0, 0)  # Ultralytics draws the two perspective terms first
        m_ours, s_ours = affine_matrix((192, 160), 96, PyRandomShim(), 0.5, 0.1, 10.0, 5.0)
        np.testing.assert_allclose(m_ours, m_theirs, rtol=1e-5, atol=1e-4)
        assert s_ours == pytest.approx(s_theirs)
        warped = warp_boxes(boxes, m_ours)
        np.testing.assert_allclose(warped, theirs.apply_bboxes(boxes, m_theirs), rtol=1e-5, atol=1e-3)
        clipped = warped.clip(0, 96)
        expected = RandomPerspective.box_candidates(box1=(boxes * s_ours).T, box2=clipped.T, area_thr=0.1)
        np.testing.assert_array_equal(box_candidates(boxes * s_ours, clipped), expected)
