"""torchvision's detector families as plugdet heads: RetinaNet, FCOS and Faster R-CNN on any backbone and neck.

Each head holds a real torchvision model (`torchvision.models.detection.RetinaNet`, `FCOS`, `FasterRCNN`) built
with torchvision's own heads, anchor generator, box coder, matcher / centre sampling, RPN and RoI heads, and calls
its methods: `head`, `anchor_generator`, `compute_loss` and `postprocess_detections` (RetinaNet, FCOS), `rpn` and
`roi_heads` (Faster R-CNN). Nothing of those is re-implemented here. What the torchvision model does not get to do
is its own `forward`: plugdet's backbone and neck (any registered ones) run before the head, and torchvision's
resize / normalise transform is not used, because the input is plugdet's [0, 1] letterboxed batch (DESIGN §5). The
glue that remains is what torchvision's `forward` does between those calls: the targets as per-image dicts, an
`ImageList` of the batch's size, and the split of the outputs per level. `tests/test_torchvision_heads.py` proves
that the loss parts and the detections equal those of torchvision's own model with its transform made an identity.

Conventions, so that a family is a config key away (`model.head=retinanet | fcos | faster_rcnn`):

- The neck: each family names its own (`register_head(..., neck=...)`): torchvision's FPN (`detect/models/necks/
  fpn.py`) with P6/P7 for RetinaNet and FCOS (P3-P7) and with the max-pool level for Faster R-CNN (P3-P6: plugdet
  backbones start at stride 8, so there is no P2).
- Anchors per level follow torchvision's defaults from the level's stride, so at torchvision's strides they are
  torchvision's anchors: RetinaNet 4 x stride x (1, 2^(1/3), 2^(2/3)) at ratios (0.5, 1, 2); FCOS one point of
  size = stride; Faster R-CNN 8 x stride at ratios (0.5, 1, 2).
- Labels: plugdet's 0..C-1. RetinaNet and FCOS score C classes with sigmoids, so they take them as they are; Faster
  R-CNN's softmax keeps class 0 for the background, so it is built for C + 1 classes and sees labels + 1.
- Inference: `postprocess(decoded, conf, iou, max_det)` is torchvision's `postprocess_detections` with
  score_thresh = conf, nms_thresh = iou and detections_per_img = max_det; torchvision's candidates are already one
  per (box, class), so `multi_label` changes nothing. torchvision's own defaults (RetinaNet 0.05 / 0.5 / 300, FCOS
  0.2 / 0.6 / 100, Faster R-CNN 0.05 / 0.5 / 100) are what its configs set for `eval.*`.
- Losses are means over the batch (`reduction = "mean"`, see `detect.losses.torchvision`).

torchvision's detection modules are imported where a family is built, not when this module registers the names:
`torchvision.models.detection` pulls in `torchvision.ops` and torch._dynamo (~1.5 s), which a tool that never
builds one of these heads (train_cls, a YOLO run until its first NMS) need not pay at start-up.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from backbones.errors import UserError
from detect.models.heads.base import DetectionHead
from detect.models.registry import register_head

RETINANET_OCTAVES = (1.0, 2 ** (1.0 / 3), 2 ** (2.0 / 3))
ASPECT_RATIOS = (0.5, 1.0, 2.0)


class NoBackbone(nn.Module):
    """What the torchvision model holds as its backbone: only `out_channels`, which its constructor reads. plugdet's
    backbone and neck run before the head, so calling this is a programming error."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> None:
        raise RuntimeError("the torchvision model inside a plugdet head has no backbone: run the plugdet Detector")


def target_dicts(targets: torch.Tensor, batch_size: int, label_offset: int = 0) -> list[dict[str, torch.Tensor]]:
    """plugdet's targets [N, 6] (image_index, class_id, x1, y1, x2, y2) as torchvision's per-image dicts
    (boxes [n, 4] float xyxy, labels [n] int64 + `label_offset`)."""
    index = targets[:, 0].long()
    return [{"boxes": targets[index == i, 2:6].float(), "labels": targets[index == i, 1].long() + label_offset}
            for i in range(batch_size)]  # fmt: skip


def image_list(features: Sequence[torch.Tensor], image_size: tuple[int, int]) -> Any:
    """An `ImageList` of the batch's size for torchvision's anchor generators, which read only the images' shape,
    count, dtype and device (an empty tensor stands in for the pixels, which the head never sees)."""
    from torchvision.models.detection.image_list import ImageList

    batch = int(features[0].shape[0])
    return ImageList(features[0].new_empty((batch, 0, *image_size)), [tuple(image_size)] * batch)


@contextlib.contextmanager
def thresholds(owner: Any, **values: Any) -> Iterator[None]:
    """Set torchvision's postprocess settings (score_thresh, nms_thresh, detections_per_img) for one call."""
    saved = {name: getattr(owner, name) for name in values}
    for name, value in values.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


def _equal_channels(family: str, in_channels: Sequence[int]) -> int:
    """torchvision's heads share their convolutions across levels, so every level must have the same channels."""
    if len(set(in_channels)) != 1:
        raise UserError(f"the {family} head needs the same channels on every level, got {tuple(in_channels)}: use "
                        "model.neck=fpn (or leave model.neck unset for the family's own)")  # fmt: skip
    return int(in_channels[0])


def _anchor_sizes(strides: Sequence[int], per_stride: float, octaves: Sequence[float]) -> tuple[tuple[int, ...], ...]:
    """torchvision's anchor sizes from the levels' strides: int(per_stride * stride * octave) per octave."""
    return tuple(tuple(int(per_stride * stride * octave) for octave in octaves) for stride in strides)


class TorchvisionFamily(DetectionHead):
    """What the three families share: the torchvision model (`self.net`), the loss and the label offset."""

    default_loss = "torchvision"
    label_offset = 0  # added to plugdet's labels on the way in, taken off the detections on the way out

    def __init__(self, net: nn.Module, num_classes: int, strides: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.strides = tuple(int(s) for s in strides)

    def losses(self, raw: Any, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss parts, by torchvision's names, from the training forward's raw outputs."""
        raise NotImplementedError

    def _detections(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"boxes": boxes.float(), "scores": scores.float(), "labels": labels.long() - self.label_offset}


class DenseFamily(TorchvisionFamily):
    """RetinaNet and FCOS: one dense head over every level, anchors, torchvision's `compute_loss` and
    `postprocess_detections` (they differ only in whether the loss needs the anchors per level)."""

    loss_takes_level_sizes = False

    def forward(
        self, features: list[torch.Tensor], image_size: tuple[int, int], targets: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Raw outputs: torchvision's head outputs ([B, HWA, C] and [B, HWA, 4] (+ [B, HWA, 1] centerness)), the
        anchors per image, and the anchors per level."""
        head_outputs = self.net.head(features)
        anchors = self.net.anchor_generator(image_list(features, image_size), features)
        locations = [int(f.shape[-2] * f.shape[-1]) for f in features]
        per_location = int(head_outputs["cls_logits"].shape[1]) // sum(locations)
        return {"head_outputs": head_outputs, "anchors": anchors, "level_sizes": [n * per_location for n in locations],
                "image_size": tuple(image_size)}  # fmt: skip

    def losses(self, raw: dict[str, Any], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        head_outputs = {name: value.float() for name, value in raw["head_outputs"].items()}  # autocast: fp32 losses
        anchors = [a.float() for a in raw["anchors"]]
        per_image = target_dicts(targets, len(anchors), self.label_offset)
        extra = (raw["level_sizes"],) if self.loss_takes_level_sizes else ()
        return self.net.compute_loss(per_image, head_outputs, anchors, *extra)

    def decode(self, raw: dict[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
        """The outputs split per level, as torchvision's forward splits them before its postprocess."""
        sizes = raw["level_sizes"]
        split = {name: list(value.float().split(sizes, dim=1)) for name, value in raw["head_outputs"].items()}
        return {"head_outputs": split, "anchors": [list(a.float().split(sizes)) for a in raw["anchors"]],
                "image_sizes": [tuple(image_size)] * len(raw["anchors"])}  # fmt: skip

    def postprocess(
        self, decoded: dict[str, Any], conf: float, iou: float, max_det: int, multi_label: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        with thresholds(self.net, score_thresh=conf, nms_thresh=iou, detections_per_img=max_det):
            found = self.net.postprocess_detections(decoded["head_outputs"], decoded["anchors"], decoded["image_sizes"])
        return [self._detections(d["boxes"], d["scores"], d["labels"]) for d in found]


class RetinaNetFamily(DenseFamily):
    """torchvision's RetinaNet (focal loss, smooth-L1 box regression, 9 anchors per location, IoU matcher 0.5 / 0.4
    with low-quality matches).

    Args:
        num_classes, in_channels, strides: the head contract (every level must have the same channels).
        anchor_sizes: per level; None: 4 x stride x (1, 2^(1/3), 2^(2/3)), torchvision's at strides 8-128.
        aspect_ratios: per location (torchvision: 0.5, 1, 2).
        group_norm: GroupNorm(32) in the head's convolutions (torchvision's v2 RetinaNet); False: v1 (no norm).
        fg_iou_thresh, bg_iou_thresh, topk_candidates: torchvision's RetinaNet arguments.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int],
        strides: Sequence[int],
        anchor_sizes: Sequence[Sequence[int]] | None = None,
        aspect_ratios: Sequence[float] = ASPECT_RATIOS,
        group_norm: bool = False,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        topk_candidates: int = 1000,
    ) -> None:
        from torchvision.models.detection import RetinaNet
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.retinanet import RetinaNetHead

        channels = _equal_channels("retinanet", in_channels)
        sizes = anchor_sizes or _anchor_sizes(strides, 4, RETINANET_OCTAVES)
        anchors = AnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(aspect_ratios),) * len(sizes))
        norm = partial(nn.GroupNorm, 32) if group_norm else None
        head = RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
        net = RetinaNet(NoBackbone(channels), num_classes, anchor_generator=anchors, head=head,
                        fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh,
                        topk_candidates=topk_candidates)  # fmt: skip
        super().__init__(net, num_classes, strides)


class FCOSFamily(DenseFamily):
    """torchvision's FCOS (focal loss, GIoU box loss, centerness, centre sampling radius 1.5, one point per
    location, GroupNorm in the head).

    Args:
        num_classes, in_channels, strides: the head contract (every level must have the same channels).
        anchor_sizes: per level; None: the stride (torchvision's 8-128 at strides 8-128).
        center_sampling_radius, topk_candidates, num_convs: torchvision's FCOS arguments.
    """

    loss_takes_level_sizes = True

    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int],
        strides: Sequence[int],
        anchor_sizes: Sequence[Sequence[int]] | None = None,
        center_sampling_radius: float = 1.5,
        topk_candidates: int = 1000,
        num_convs: int = 4,
    ) -> None:
        from torchvision.models.detection import FCOS
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.fcos import FCOSHead

        channels = _equal_channels("fcos", in_channels)
        sizes = anchor_sizes or _anchor_sizes(strides, 1, (1.0,))
        anchors = AnchorGenerator(tuple(tuple(s) for s in sizes), ((1.0,),) * len(sizes))
        head = FCOSHead(channels, anchors.num_anchors_per_location()[0], num_classes, num_convs=num_convs)
        net = FCOS(NoBackbone(channels), num_classes, anchor_generator=anchors, head=head,
                   center_sampling_radius=center_sampling_radius, topk_candidates=topk_candidates)  # fmt: skip
        super().__init__(net, num_classes, strides)


class FasterRCNNFamily(TorchvisionFamily):
    """torchvision's Faster R-CNN: its RPN (anchors 8 x stride at ratios 0.5, 1, 2) and RoI heads (MultiScaleRoIAlign
    7x7, TwoMLPHead, FastRCNNPredictor), trained with their own sampling and losses.

    Two-stage: the RPN's and the RoI heads' training forwards need the targets (`needs_targets`), so the losses
    come out of the forward and the criterion only sums them.

    Args:
        num_classes, in_channels, strides: the head contract (every level must have the same channels).
        anchor_sizes: per level; None: 8 x stride (torchvision's 32-512 at strides 4-64).
        roi_max_stride: the RoI pooler reads the levels up to this stride (torchvision pools P2-P5, not the RPN's
            extra max-pool level).
        representation_size: TwoMLPHead's width (torchvision: 1024).
        **kwargs: torchvision's FasterRCNN arguments (rpn_*, box_*), e.g. box_batch_size_per_image.
    """

    needs_targets = True
    label_offset = 1

    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int],
        strides: Sequence[int],
        anchor_sizes: Sequence[Sequence[int]] | None = None,
        aspect_ratios: Sequence[float] = ASPECT_RATIOS,
        roi_max_stride: int = 32,
        representation_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.ops import MultiScaleRoIAlign

        channels = _equal_channels("faster_rcnn", in_channels)
        sizes = anchor_sizes or _anchor_sizes(strides, 8, (1.0,))
        anchors = AnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(aspect_ratios),) * len(sizes))
        self_names = [str(k) for k in range(len(strides))]
        pooled = [name for name, stride in zip(self_names, strides, strict=True) if stride <= roi_max_stride]
        if not pooled:
            raise UserError(f"faster_rcnn: no level at a stride <= roi_max_stride={roi_max_stride} in {tuple(strides)}")
        pool = MultiScaleRoIAlign(featmap_names=pooled, output_size=7, sampling_ratio=2)
        # num_classes=None: torchvision takes the classes (C + 1, background first) from the predictor given here.
        net = FasterRCNN(NoBackbone(channels), None, rpn_anchor_generator=anchors, box_roi_pool=pool,
                         box_head=TwoMLPHead(channels * 7 * 7, representation_size),
                         box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
                         **kwargs)  # fmt: skip
        super().__init__(net, num_classes, strides)
        self.level_names = self_names

    def _features(self, features: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(zip(self.level_names, features, strict=True))

    def forward(
        self, features: list[torch.Tensor], image_size: tuple[int, int], targets: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Training: the four losses of the RPN and the RoI heads (the targets are needed here). Eval: the RoI heads'
        class logits and box regression for the RPN's proposals."""
        maps, images = self._features(features), image_list(features, image_size)
        if self.training:
            if targets is None:
                raise RuntimeError("faster_rcnn's training forward needs the targets: detector(images, targets)")
            per_image = target_dicts(targets, len(images.image_sizes), self.label_offset)
            proposals, rpn_losses = self.net.rpn(images, maps, per_image)
            _, roi_losses = self.net.roi_heads(maps, proposals, images.image_sizes, per_image)
            return {**roi_losses, **rpn_losses}  # torchvision's order (GeneralizedRCNN.forward)
        proposals, _ = self.net.rpn(images, maps)
        roi = self.net.roi_heads
        pooled = roi.box_roi_pool(maps, proposals, images.image_sizes)
        class_logits, box_regression = roi.box_predictor(roi.box_head(pooled))
        return {"class_logits": class_logits.float(), "box_regression": box_regression.float(),
                "proposals": [p.float() for p in proposals], "image_sizes": images.image_sizes}  # fmt: skip

    def losses(self, raw: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: value.float() for name, value in raw.items()}

    def decode(self, raw: dict[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
        return raw

    def postprocess(
        self, decoded: dict[str, Any], conf: float, iou: float, max_det: int, multi_label: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        roi = self.net.roi_heads
        with thresholds(roi, score_thresh=conf, nms_thresh=iou, detections_per_img=max_det):
            boxes, scores, labels = roi.postprocess_detections(
                decoded["class_logits"], decoded["box_regression"], decoded["proposals"], decoded["image_sizes"]
            )
        return [self._detections(*found) for found in zip(boxes, scores, labels, strict=True)]


P6P7 = {"name": "fpn", "kwargs": {"extra": "p6p7"}}


@register_head("retinanet", neck=P6P7)
def retinanet_head(
    num_classes: int, in_channels: Sequence[int], strides: Sequence[int], **kwargs: Any
) -> DetectionHead:
    """torchvision's RetinaNet on the neck's levels (its own: FPN P3-P7)."""
    return RetinaNetFamily(num_classes, in_channels, strides, **kwargs)


@register_head("fcos", neck=P6P7)
def fcos_head(num_classes: int, in_channels: Sequence[int], strides: Sequence[int], **kwargs: Any) -> DetectionHead:
    """torchvision's FCOS on the neck's levels (its own: FPN P3-P7)."""
    return FCOSFamily(num_classes, in_channels, strides, **kwargs)


@register_head("faster_rcnn", neck={"name": "fpn", "kwargs": {"extra": "pool"}})
def faster_rcnn_head(
    num_classes: int, in_channels: Sequence[int], strides: Sequence[int], **kwargs: Any
) -> DetectionHead:
    """torchvision's Faster R-CNN on the neck's levels (its own: FPN P3-P5 plus the RPN's max-pool level)."""
    return FasterRCNNFamily(num_classes, in_channels, strides, **kwargs)
