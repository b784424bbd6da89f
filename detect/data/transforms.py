"""Image and box transforms: letterbox and the YOLOv8 train augmentations (affine, HSV, flip).

Detection transforms are written directly with OpenCV and NumPy, not with albumentations, because none of the
albumentations 2.x transforms reproduces YOLOv8's behaviour:

- `A.Affine` keeps the output shape equal to the input shape, while YOLOv8's affine maps the 2S x 2S Mosaic canvas
  to an S x S output in one warp (warping the whole canvas and cropping afterwards costs 4x the pixels). Its box
  filter (`BboxParams.min_visibility` / `min_area`) is not YOLOv8's candidate rule (area kept >= 10 % of the
  *scaled* original, sides > 2 px, aspect ratio < 100).
- `A.HueSaturationValue` adds shifts to S and V; YOLOv8 multiplies them by random gains through lookup tables.
- A flip is one slice; an albumentations flip would need per-sample reseeding for nothing.

Every random choice here comes from an explicit `np.random.Generator`, so a caller that seeds one generator per
sample gets a pure function of that seed. Boxes are xyxy pixels, with pixel i covering [i, i + 1).

The classification pipelines are in `detect.data.cls_transforms` (albumentations): detection never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from backbones.errors import UserError

PAD_VALUE = 114  # grey used by YOLOv8 for letterbox padding, Mosaic canvas and affine borders


def letterbox_geometry(
    h: int, w: int, size: int, shape: tuple[int, int] | None = None
) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """Letterbox geometry of an h x w image into size x size (or into `shape`), without touching pixels.

    Args:
        h, w: image size.
        size: output side S (the square), used when `shape` is None.
        shape: (H, W) output rectangle instead of the square (`rect_shape`, or a val batch's shape).

    Returns:
        (r = min(S / h, S / w), (new_w, new_h) = rounded resized size, (left, top) padding, centred: the extra
        pixel of an odd padding goes to the right / bottom, as Ultralytics' `LetterBox` does). The ratio always
        comes from S (the long side becomes S); a `shape` is only the canvas. Should the image not fit it (a
        val batch's shape is planned from file headers, which an EXIF rotation contradicts), the ratio shrinks to
        min(H / h, W / w) so that it does.
    """
    if size <= 0:
        raise UserError(f"letterbox size must be positive, got {size}: img_size")
    out_h, out_w = (size, size) if shape is None else (int(shape[0]), int(shape[1]))
    r = min(size / h, size / w)
    if round(w * r) > out_w or round(h * r) > out_h:
        r = min(out_h / h, out_w / w)
    new_w, new_h = min(max(round(w * r), 1), out_w), min(max(round(h * r), 1), out_h)
    return r, (new_w, new_h), ((out_w - new_w) // 2, (out_h - new_h) // 2)


def rect_shape(h: int, w: int, size: int, stride: int = 32) -> tuple[int, int]:
    """The smallest (H, W), both multiples of `stride`, that holds an h x w image letterboxed with its long side at
    `size` (a multiple of `stride`): Ultralytics' `LetterBox(auto=True)`, what its predictor uses by default.

    E.g. 1080 x 810 (bus.jpg) at 640 -> (640, 480); 720 x 1280 (zidane.jpg) -> (384, 640); a square stays square.
    """
    if size <= 0 or size % stride:
        raise UserError(f"image size must be a positive multiple of {stride}, got {size}")
    _, (new_w, new_h), _ = letterbox_geometry(h, w, size)
    return -(-new_h // stride) * stride, -(-new_w // stride) * stride


def letterbox(
    image: np.ndarray,
    size: int,
    boxes: np.ndarray | None = None,
    color: tuple[int, int, int] = (PAD_VALUE, PAD_VALUE, PAD_VALUE),
    shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Resize keeping the aspect ratio so the image fits in size x size (or in `shape` (H, W)), then pad it centred.

    The ratio is r = min(S / h, S / w); the image is resized with cv2.INTER_LINEAR in both directions (as Ultralytics'
    validation loader does, so validation pixels match) to (round(w r), round(h r)). Boxes map as box * r + pad,
    which `detect.boxes.scale_boxes_to_original` inverts exactly. With `shape = rect_shape(h, w, S)` this is the
    rectangular letterbox of Ultralytics' predictor (`LetterBox(auto=True)`): the same pixels, fewer of them.

    Args:
        image: [H, W, 3] uint8.
        size: output side S.
        boxes: [n, 4] xyxy pixels of `image`, or None.
        color: padding colour.
        shape: (H_out, W_out) output rectangle instead of S x S.

    Returns:
        (image [S, S, 3] (or [H_out, W_out, 3]) uint8, boxes [n, 4] float32 in output pixels or None,
        meta {"ratio": (r, r), "pad": (left, top), "orig_size": (h, w)}).
    """
    h, w = image.shape[:2]
    r, (new_w, new_h), (left, top) = letterbox_geometry(h, w, size, shape)
    out_h, out_w = (size, size) if shape is None else (int(shape[0]), int(shape[1]))
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = cv2.copyMakeBorder(
        image, top, out_h - new_h - top, left, out_w - new_w - left, cv2.BORDER_CONSTANT, value=tuple(color)
    )
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.float32(r)  # [n, 4]
        boxes = boxes + np.array([left, top, left, top], dtype=np.float32)
    meta = {"ratio": (r, r), "pad": (float(left), float(top)), "orig_size": (h, w)}
    return out, boxes, meta


def long_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h', w') of an h x w image whose longer side is resized to `size` (each side at least 1 pixel)."""
    r = size / max(h, w)
    return min(max(round(h * r), 1), size), min(max(round(w * r), 1), size)


def resize_long_side(image: np.ndarray, size: int, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the longer side equals `size` (YOLOv8's `load_image` for training), cv2.INTER_LINEAR.

    Args:
        image: [H, W, 3] uint8.
        size: target length of the longer side.
        boxes: [n, 4] xyxy pixels.

    Returns:
        (image [h', w', 3], boxes [n, 4] float32 scaled by the exact per-axis ratios w'/W and h'/H).
    """
    h, w = image.shape[:2]
    new_h, new_w = long_side_size(h, w, size)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if (new_w, new_h) == (w, h):
        return image, boxes.copy()
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    gain = np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
    return image, boxes * gain


def random_hsv(image: np.ndarray, gains: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """YOLOv8 HSV augmentation: hue shifted by r_h * 180, saturation and value multiplied by (1 + r_s), (1 + r_v).

    r = uniform(-1, 1, 3) * gains, applied through one 3-channel cv2 lookup table on OpenCV's 8-bit HSV (H in
    [0, 180)). The hue shift is additive, as in Ultralytics >= 8.3.79 (older versions scaled the hue).
    Three numbers are always drawn from `rng`, so the stream does not depend on the gains.

    Args:
        image: [H, W, 3] uint8 RGB.
        gains: (h, s, v) gains, YOLOv8 defaults (0.015, 0.7, 0.4).
        rng: per-sample generator.

    Returns:
        [H, W, 3] uint8 RGB (a new array).
    """
    r = rng.uniform(-1.0, 1.0, 3) * np.asarray(gains, dtype=np.float64)
    if not np.any(r):
        return image.copy()
    x = np.arange(256, dtype=np.float64)
    lut_hue = np.mod(x + r[0] * 180.0, 180.0).astype(np.uint8)
    lut_sat = np.clip(x * (1.0 + r[1]), 0, 255).astype(np.uint8)
    lut_val = np.clip(x * (1.0 + r[2]), 0, 255).astype(np.uint8)
    lut = np.stack((lut_hue, lut_sat, lut_val), -1).reshape(1, 256, 3)  # [1, 256, 3]
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return cv2.cvtColor(cv2.LUT(hsv, lut), cv2.COLOR_HSV2RGB)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror horizontally: column j goes to W - 1 - j, box (x1, x2) goes to (W - x2, W - x1).

    Args:
        image: [H, W, 3].
        boxes: [n, 4] xyxy pixels.

    Returns:
        (image [H, W, 3] contiguous, boxes [n, 4] float32).
    """
    w = image.shape[1]
    flipped = boxes.astype(np.float32, copy=True).reshape(-1, 4)
    flipped[:, [0, 2]] = w - boxes[:, [2, 0]]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def affine_matrix(
    in_hw: tuple[int, int],
    out_size: int,
    rng: np.random.Generator,
    scale: float = 0.5,
    translate: float = 0.1,
    degrees: float = 0.0,
    shear: float = 0.0,
) -> tuple[np.ndarray, float]:
    """YOLOv8's random affine: centre the input at the origin, rotate/scale, shear, move to the output centre +- shift.

    M = T @ S @ R @ C with C = translate(-w/2, -h/2), R = rotation(a) * s, s ~ U(1 - scale, 1 + scale),
    a ~ U(-degrees, degrees), S = shear by U(-shear, shear) degrees on each axis, T = translate by
    U(0.5 - translate, 0.5 + translate) * out_size on each axis. Six numbers are always drawn.

    Args:
        in_hw: (h, w) of the input image.
        out_size: output side S.
        rng: per-sample generator.
        scale, translate, degrees, shear: ranges as above.

    Returns:
        (M [3, 3] float64 mapping input pixel coordinates to output pixel coordinates, s).
    """
    h, w = in_hw
    centre = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]], dtype=np.float64)
    angle, s = rng.uniform(-degrees, degrees), rng.uniform(1 - scale, 1 + scale)
    rotate = np.eye(3)
    rotate[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=s)
    shear_m = np.eye(3)
    shear_m[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    shear_m[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_size
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_size
    return move @ shear_m @ rotate @ centre, float(s)


def warp_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Transform boxes by their four corners and take the enclosing axis-aligned box.

    Args:
        boxes: [n, 4] xyxy.
        matrix: [3, 3] affine.

    Returns:
        [n, 4] float32 xyxy (not clipped).
    """
    n = len(boxes)
    if n == 0:
        return np.zeros((0, 4), dtype=np.float32)
    corners = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2).astype(np.float64)  # [4n, 2] x1y1 x2y2 x1y2 x2y1
    xy = corners @ matrix[:2, :2].T + matrix[:2, 2]  # [4n, 2]
    xy = xy.reshape(n, 4, 2)  # [n, 4 corners, 2]
    return np.concatenate((xy.min(1), xy.max(1)), axis=1).astype(np.float32)  # [n, 4]


def box_candidates(
    before: np.ndarray,
    after: np.ndarray,
    wh_thr: float = 2.0,
    ar_thr: float = 100.0,
    area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """YOLOv8's filter after a geometric transform: keep boxes wider and taller than `wh_thr` px, with aspect ratio
    below `ar_thr` and area at least `area_thr` of the area `before` (already scaled by the affine's scale).

    Args:
        before: [n, 4] xyxy boxes before the transform, multiplied by the scale factor.
        after: [n, 4] xyxy boxes after the transform and clipping.

    Returns:
        [n] bool, True for boxes to keep.
    """
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def random_affine(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    out_size: int,
    rng: np.random.Generator,
    scale: float = 0.5,
    translate: float = 0.1,
    degrees: float = 0.0,
    shear: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warp `image` to out_size x out_size by `affine_matrix`; boxes by corners, clipped, filtered by `box_candidates`.

    The image is warped with the matrix conjugated by a half-pixel shift (cv2.warpAffine puts pixel centres at
    integer coordinates, boxes put them at i + 0.5), so pixels and boxes agree to interpolation accuracy; Ultralytics
    skips this and is off by up to half a pixel. Borders are filled with grey 114, interpolation is bilinear.

    Args:
        image: [H, W, 3] uint8 (a Mosaic canvas 2S x 2S or a single image with its long side S).
        boxes: [n, 4] xyxy pixels of `image`.
        labels: [n] int64.
        out_size: output side S.
        rng: per-sample generator.
        scale, translate, degrees, shear: see `affine_matrix`.

    Returns:
        (image [S, S, 3] uint8, boxes [m, 4] float32 inside [0, S], labels [m]), m <= n.
    """
    matrix, s = affine_matrix(image.shape[:2], out_size, rng, scale, translate, degrees, shear)
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    pixel_matrix = np.linalg.inv(half) @ matrix @ half  # centres (i, j) -> (i + 0.5, j + 0.5) -> M -> back
    warped = cv2.warpAffine(
        image,
        pixel_matrix[:2],
        dsize=(out_size, out_size),
        flags=cv2.INTER_LINEAR,
        borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    new_boxes = warp_boxes(boxes, matrix).clip(0, out_size)
    keep = box_candidates(boxes * np.float32(s), new_boxes)
    return warped, new_boxes[keep], np.asarray(labels)[keep]
