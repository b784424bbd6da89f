"""Mosaic of 4 (YOLOv4/YOLOv8): four images around a random centre of a 2S x 2S canvas.

Order of the YOLOv8 train pipeline (driven by `detect.data.detection.DetectionDataset`): each image is resized so
its long side is S, `mosaic4` pastes the four onto the 2S x 2S canvas, `transforms.random_affine` warps the whole
canvas to S x S (the canvas centre lands at the output centre +- translate, scaled by 1 +- scale, which is what
YOLOv8's `border = -S/2` achieves), then HSV, then horizontal flip.

Why not `albumentations.Mosaic` (it exists in albumentations 2.0.8): it is a different Mosaic. It lays the images on
a fixed grid of fixed-size cells (each image resized to cover or fit its cell and cropped towards the centre) and
crops a `target_size` window out of that grid at once. YOLOv8 instead keeps each image at its own aspect ratio with
the long side S, places the four corners-to-centre at a random centre in [S/2, 3S/2]^2 of a 2S x 2S canvas, and
hands the *whole* canvas to the random affine, so a zoom-out (scale < 1) shows the other parts of the four images
rather than padding. Reproducing that with A.Mosaic would need target_size = 2S (the whole grid, with the centre
then fixed at S, losing the random centre) or cropping before the affine (losing content). Its boxes also pass
through albumentations' label encoders and normalisation, which is overhead for a 30-line function, and its random
state is per-Compose rather than per-sample. So the layout is implemented here with NumPy slicing.
"""

from __future__ import annotations

import numpy as np

from detect.data.transforms import PAD_VALUE


def mosaic4(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    size: int,
    centre: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste four images around `centre` on a 2S x 2S grey canvas; boxes shifted, clipped to the canvas.

    Image 0 goes top-left of the centre (its bottom-right corner at the centre), 1 top-right, 2 bottom-left,
    3 bottom-right; parts falling outside the canvas are cut, and boxes are clipped there too (an image is only ever
    cut by the canvas border, so clipping is exact). Boxes left with zero width or height are dropped.

    Args:
        items: four (image [h_k, w_k, 3] uint8 with long side <= S, boxes [n_k, 4] xyxy, labels [n_k]).
        size: S.
        centre: (xc, yc) canvas pixel, YOLOv8 draws each uniformly in [S/2, 3S/2].

    Returns:
        (canvas [2S, 2S, 3] uint8, boxes [n, 4] float32 in canvas pixels, labels [n] int64).
    """
    if len(items) != 4:
        raise ValueError(f"mosaic4 needs 4 images, got {len(items)}")
    s2 = 2 * size
    xc, yc = centre
    canvas = np.full((s2, s2, items[0][0].shape[2]), PAD_VALUE, dtype=np.uint8)
    all_boxes, all_labels = [], []
    for k, (image, boxes, labels) in enumerate(items):
        h, w = image.shape[:2]
        # top-left corner of the image on the canvas; it may be negative (the image is then cut by the border)
        x0 = xc - w if k in (0, 2) else xc
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, s2), min(y0 + h, s2)  # canvas region
        canvas[cy1:cy2, cx1:cx2] = image[cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
        shifted = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) + np.array([x0, y0, x0, y0], dtype=np.float32)
        all_boxes.append(shifted)
        all_labels.append(np.asarray(labels, dtype=np.int64).reshape(-1))
    boxes = np.concatenate(all_boxes, 0).clip(0, s2)  # [n, 4]
    labels = np.concatenate(all_labels, 0)  # [n]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return canvas, boxes[keep], labels[keep]


def random_centre(size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Mosaic centre (xc, yc), each uniform in [S/2, 3S/2) and truncated to an int, as YOLOv8.

    Args:
        size: S.
        rng: per-sample generator (two numbers drawn).

    Returns:
        (xc, yc) canvas pixel.
    """
    xc, yc = rng.uniform(size / 2, 3 * size / 2, 2)
    return int(xc), int(yc)
