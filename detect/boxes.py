"""Box formats, IoU variants, anchor points and distance encodings.

Formats used in plugdet (all in pixels unless said otherwise):

- ``xyxy``: ``(x1, y1, x2, y2)`` corners — the one internal format.
- ``xywh``: ``(x, y, w, h)`` with ``(x, y)`` the top-left corner (COCO's ``bbox``).
- ``cxcywh``: ``(cx, cy, w, h)`` with ``(cx, cy)`` the centre.

Conversions and elementwise functions accept any leading shape ``[..., 4]``; all keep the dtype and device of their
input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "xyxy2xywh",
    "xywh2xyxy",
    "xyxy2cxcywh",
    "cxcywh2xyxy",
    "box_area",
    "box_iou",
    "bbox_iou",
    "make_anchors",
    "dist2bbox",
    "bbox2dist",
    "scale_boxes_to_original",
]


def xyxy2xywh(boxes: Tensor) -> Tensor:
    """Corners to top-left corner + size (COCO ``bbox``).

    Args:
        boxes: ``[..., 4]`` xyxy.

    Returns:
        ``[..., 4]`` xywh (top-left x, top-left y, width, height).
    """
    x1y1, x2y2 = boxes[..., :2], boxes[..., 2:]
    return torch.cat((x1y1, x2y2 - x1y1), dim=-1)


def xywh2xyxy(boxes: Tensor) -> Tensor:
    """Top-left corner + size (COCO ``bbox``) to corners.

    Args:
        boxes: ``[..., 4]`` xywh (top-left x, top-left y, width, height).

    Returns:
        ``[..., 4]`` xyxy.
    """
    x1y1, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat((x1y1, x1y1 + wh), dim=-1)


def xyxy2cxcywh(boxes: Tensor) -> Tensor:
    """Corners to centre + size.

    Args:
        boxes: ``[..., 4]`` xyxy.

    Returns:
        ``[..., 4]`` cxcywh.
    """
    x1y1, x2y2 = boxes[..., :2], boxes[..., 2:]
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim=-1)


def cxcywh2xyxy(boxes: Tensor) -> Tensor:
    """Centre + size to corners.

    Args:
        boxes: ``[..., 4]`` cxcywh.

    Returns:
        ``[..., 4]`` xyxy.
    """
    centre, half = boxes[..., :2], boxes[..., 2:] / 2
    return torch.cat((centre - half, centre + half), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes; boxes with x2 < x1 or y2 < y1 have area 0.

    Args:
        boxes: ``[..., 4]`` xyxy.

    Returns:
        ``[...]`` areas.
    """
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise IoU between two sets of xyxy boxes.

    Args:
        boxes1: ``[N, 4]`` xyxy.
        boxes2: ``[M, 4]`` xyxy.
        eps: added to the union so that two empty boxes give 0, not NaN.

    Returns:
        ``[N, M]`` IoU in [0, 1].
    """
    lo = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    hi = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    wh = (hi - lo).clamp(min=0)  # [N, M, 2]
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter / (union + eps)


def bbox_iou(
    boxes1: Tensor,
    boxes2: Tensor,
    ciou: bool = False,
    giou: bool = False,
    diou: bool = False,
    eps: float = 1e-7,
) -> Tensor:
    """Elementwise IoU, GIoU, DIoU or CIoU between two broadcastable sets of xyxy boxes.

    - IoU = |A ∩ B| / |A ∪ B|.
    - GIoU = IoU - |C \\ (A ∪ B)| / |C|, C the smallest enclosing box
      (Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019, arXiv:1902.09630).
    - DIoU = IoU - ρ²(centres) / c², c the diagonal of C
      (Zheng et al., "Distance-IoU Loss", AAAI 2020, arXiv:1911.08287).
    - CIoU = DIoU - α·v with v = 4/π² (atan(w_B/h_B) - atan(w_A/h_A))² and α = v / (1 - IoU + v), α held constant
      for the gradient (same paper, "Complete IoU").

    ``eps`` is added to both heights (so the aspect-ratio term of a flat box is finite), to the union, to c² and to the
    enclosing area — the convention of YOLOv8, kept so that assignments match it to the last bit. At most one of
    ``ciou``, ``diou``, ``giou`` applies, in that order of precedence.

    Args:
        boxes1: ``[..., 4]`` xyxy.
        boxes2: ``[..., 4]`` xyxy, broadcastable with ``boxes1``.
        ciou: return Complete IoU.
        giou: return Generalized IoU.
        diou: return Distance IoU.
        eps: numerical guard, see above.

    Returns:
        ``[...]`` the chosen overlap: IoU in [0, 1]; GIoU and DIoU in [-1, 1]; CIoU in [-1.5, 1].
    """
    ax1, ay1, ax2, ay2 = boxes1.unbind(-1)
    bx1, by1, bx2, by2 = boxes2.unbind(-1)
    aw, ah = ax2 - ax1, ay2 - ay1 + eps
    bw, bh = bx2 - bx1, by2 - by1 + eps

    inter = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0) * (
        torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    ).clamp(min=0)
    union = aw * ah + bw * bh - inter + eps
    iou = inter / union
    if not (ciou or diou or giou):
        return iou

    enclose_w = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
    enclose_h = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    if ciou or diou:
        diag2 = enclose_w.pow(2) + enclose_h.pow(2) + eps
        # squared distance between centres, from corner sums to avoid two halvings
        centre2 = ((bx1 + bx2 - ax1 - ax2).pow(2) + (by1 + by2 - ay1 - ay2).pow(2)) / 4
        if not ciou:
            return iou - centre2 / diag2
        v = (4 / math.pi**2) * ((bw / bh).atan() - (aw / ah).atan()).pow(2)
        with torch.no_grad():
            alpha = v / (1 - iou + v + eps)
        return iou - (centre2 / diag2 + v * alpha)
    enclose_area = enclose_w * enclose_h + eps
    return iou - (enclose_area - union) / enclose_area


IOU_KINDS = ("ciou", "diou", "giou", "iou")


def box_overlap(boxes1: Tensor, boxes2: Tensor, kind: str = "ciou") -> Tensor:
    """Elementwise overlap of the named kind ("ciou", "diou", "giou" or "iou"; see `bbox_iou`).

    Args:
        boxes1: ``[..., 4]`` xyxy.
        boxes2: ``[..., 4]`` xyxy, broadcastable with ``boxes1``.
        kind: one of `IOU_KINDS`.

    Returns:
        ``[...]`` the overlap.
    """
    if kind not in IOU_KINDS:
        raise ValueError(f"box_overlap: unknown IoU kind {kind!r}; choose one of {', '.join(IOU_KINDS)}")
    return bbox_iou(boxes1, boxes2, ciou=kind == "ciou", diou=kind == "diou", giou=kind == "giou")


def make_anchors(
    feature_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int | float],
    offset: float = 0.5,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Anchor points at the cell centres of every level, in grid units of their own level.

    The order is level by level (shallow first), then row-major inside a level (x fastest), which is the order of
    ``head_output.flatten(2)`` concatenated over levels — the order YOLOv8 uses.

    Args:
        feature_shapes: ``(H_l, W_l)`` of each level.
        strides: stride of each level in input pixels.
        offset: added to integer cell indices; 0.5 gives cell centres.
        device: device of the outputs.
        dtype: dtype of the outputs (default float32).

    Returns:
        points: ``[A, 2]`` (x, y) in grid units, A = sum of H_l * W_l; multiply by ``stride_per_anchor`` for pixels.
        stride_per_anchor: ``[A, 1]`` the stride of each anchor's level.
    """
    if len(feature_shapes) != len(strides):
        raise ValueError(f"make_anchors: {len(feature_shapes)} feature shapes but {len(strides)} strides")
    dtype = dtype or torch.float32
    points, stride_rows = [], []
    for (height, width), stride in zip(feature_shapes, strides, strict=True):
        xs = torch.arange(width, device=device, dtype=dtype) + offset
        ys = torch.arange(height, device=device, dtype=dtype) + offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each
        points.append(torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2))  # [H*W, 2]
        stride_rows.append(torch.full((height * width, 1), float(stride), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_rows)


def dist2bbox(distance: Tensor, points: Tensor) -> Tensor:
    """Decode (left, top, right, bottom) distances from anchor points into xyxy boxes.

    Args:
        distance: ``[..., 4]`` ltrb distances (same unit as ``points``).
        points: ``[..., 2]`` (x, y) anchor points, broadcastable with ``distance[..., :2]``.

    Returns:
        ``[..., 4]`` xyxy boxes.
    """
    left_top, right_bottom = distance[..., :2], distance[..., 2:]
    return torch.cat((points - left_top, points + right_bottom), dim=-1)


def bbox2dist(points: Tensor, boxes: Tensor, max_dist: float | None = None) -> Tensor:
    """Encode xyxy boxes as (left, top, right, bottom) distances from anchor points; inverse of ``dist2bbox``.

    Args:
        points: ``[..., 2]`` (x, y) anchor points.
        boxes: ``[..., 4]`` xyxy boxes, same unit as ``points``.
        max_dist: if given, distances are clamped to ``[0, max_dist]`` (YOLOv8's DFL uses ``reg_max - 1 - 0.01`` so
            that the upper of the two interpolated bins stays a valid index).

    Returns:
        ``[..., 4]`` ltrb distances.
    """
    dist = torch.cat((points - boxes[..., :2], boxes[..., 2:] - points), dim=-1)
    if max_dist is not None:
        dist = dist.clamp(0, max_dist)
    return dist


def scale_boxes_to_original(
    boxes: Tensor,
    ratio: Sequence[float],
    pad: Sequence[float],
    orig_size: Sequence[int],
) -> Tensor:
    """Undo a letterbox: map xyxy boxes from network-input pixels back to original-image pixels.

    Args:
        boxes: ``[..., 4]`` xyxy in input pixels.
        ratio: ``(rw, rh)`` the resize factors applied to the original image.
        pad: ``(left, top)`` padding added after resizing, in input pixels.
        orig_size: ``(h, w)`` of the original image.

    Returns:
        ``[..., 4]`` xyxy in original pixels, clipped to ``[0, w] x [0, h]``.
    """
    shift = boxes.new_tensor([pad[0], pad[1], pad[0], pad[1]])
    scale = boxes.new_tensor([ratio[0], ratio[1], ratio[0], ratio[1]])
    out = (boxes - shift) / scale
    height, width = orig_size
    limit = boxes.new_tensor([width, height, width, height])
    return torch.minimum(out.clamp(min=0), limit)
