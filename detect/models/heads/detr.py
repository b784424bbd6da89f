"""The real-time DETR families as plugdet heads: RT-DETRv2 (`rtdetr`) and D-FINE (`dfine`), transformers' own models.

Each head holds transformers' `RTDetrV2ForObjectDetection` / `DFineForObjectDetection` (`self.net`), built from the
family's config class (`RTDetrV2Config`, `DFineConfig`; no weights, no hub access) with its hybrid encoder (AIFI +
CCFF), query selection, decoder, denoising, Hungarian matcher, losses (VFL, L1, GIoU; FGL and DDF for D-FINE) and
post-processing. Nothing of those is re-implemented here (Lv et al., "RT-DETRv2", arXiv:2407.17140; Peng et al.,
"D-FINE", ICLR 2025, arXiv:2410.13842).

The seam is the model's backbone slot. transformers' model runs `self.backbone(pixel_values, pixel_mask)` for
`(map, mask)` pairs and projects each map with `encoder_input_proj[level]` (1x1 conv + BatchNorm to the encoder's
width). The head builds the model with transformers' `load_backbone` answering a `MapsSlot` of plugdet's channels, so
transformers builds those projections for plugdet's maps itself and no ResNet-50 is built to be thrown away; the slot
then stands in the backbone's place and hands back the maps that plugdet's backbone (and neck) computed for this
forward. (`inputs_embeds=` would be the documented entry, but transformers 5.25.0 reads `inputs_embeds.shape` of it,
modeling_rt_detr_v2.py:1516, and the projections take a list of maps.)

- Targets go in as transformers takes them, per image `{"class_labels", "boxes": cx, cy, w, h / (W, H)}` of the
  input. The denoising queries are made from them inside the model's forward, which then computes the loss
  (`needs_targets`); the criterion (`detect.losses.detr`) reads its parts from the output.
- Detections come out of transformers' own post-processing (`RTDetrImageProcessor.post_process_object_detection`,
  the processor of both families' checkpoints): sigmoid scores, the best `num_queries` (query, class) pairs, boxes in
  input pixels; no NMS. `decode` keeps every pair, `[B, Q, 6]` rows (x1, y1, x2, y2, score, label) by decreasing
  score, the end-to-end rows of YOLO26 (`end_to_end`), which `postprocess` thresholds.
- `model.head_kwargs` are the family config's own fields (transformers' names: `num_queries`, `decoder_layers`,
  `d_model`, `encoder_hidden_dim`, `num_denoising`, `weight_loss_vfl`, ...). What follows from the backbone is set
  here: `num_labels`, `encoder_in_channels`, `feat_strides`, `num_feature_levels` (and RT-DETRv2's
  `decoder_n_levels`), `decoder_in_channels` (the encoder's outputs: `encoder_hidden_dim` per level);
  `encode_proj_layers` defaults to the deepest level (the families' own choice).

transformers is imported when one of these heads is built, never when plugdet is imported; without it, building one is
one line saying `pip install -e '.[detr]'`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest import mock

import torch
from torch import nn

from backbones.errors import UserError
from detect.boxes import xyxy2cxcywh
from detect.models.heads.base import DetectionHead
from detect.models.heads.yolo26 import end_to_end_detections
from detect.models.registry import register_head

# family -> (transformers modeling module, config class, model class)
FAMILIES = {
    "rtdetr": ("transformers.models.rt_detr_v2.modeling_rt_detr_v2", "RTDetrV2Config", "RTDetrV2ForObjectDetection"),
    "dfine": ("transformers.models.d_fine.modeling_d_fine", "DFineConfig", "DFineForObjectDetection"),
}
# config fields plugdet sets from the backbone (and the classes)
DERIVED = ("num_labels", "encoder_in_channels", "feat_strides", "num_feature_levels", "decoder_in_channels",
           "decoder_n_levels")  # fmt: skip
# config fields that do not apply: plugdet's backbone is outside the model, and each batch has its own size
REFUSED = {
    "backbone_config": "the backbone is plugdet's (model.backbone)",
    "freeze_backbone_batch_norms": "the backbone is plugdet's (train.freeze_stages freezes it, BatchNorm included)",
    "anchor_image_size": "anchors follow each batch's size (rect validation, predict's rectangles)",
    "eval_size": "position embeddings follow each batch's size (rect validation, predict's rectangles)",
}
NEVER_DROPPED = -1.0  # a score threshold below every sigmoid: the post-processing keeps all num_queries pairs


def import_family(family: str) -> tuple[ModuleType, type, type]:
    """transformers' modeling module, config class and model class of a family; without transformers (or scipy, its
    Hungarian matcher's), one UserError line saying how to install them."""
    import importlib

    module_name, config_name, model_name = FAMILIES[family]
    try:
        importlib.import_module("scipy.optimize")
        modeling = importlib.import_module(module_name)
        transformers = importlib.import_module("transformers")
    except ImportError as err:
        missing = (err.name or "transformers").split(".")[0]
        raise UserError(f"the {family} head needs transformers and scipy ({missing} is missing): pip install -e "
                        "'.[detr]'") from None  # fmt: skip
    return modeling, getattr(transformers, config_name), getattr(transformers, model_name)


def family_config(
    family: str, config_class: type, num_classes: int, in_channels: Sequence[int], strides: Sequence[int],
    head_kwargs: Mapping[str, Any],
) -> Any:  # fmt: skip
    """The family's config: its defaults, `head_kwargs` (its own field names), and what follows from the backbone.

    A key that is not a field of the config, one plugdet sets, or one that does not apply is one UserError line.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import PreTrainedConfig

    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    own = {f.name for f in dataclasses.fields(config_class)} - base | set(config_class.attribute_map)
    for key in head_kwargs:
        where = f"model.head_kwargs.{key}"
        if key in DERIVED:
            raise UserError(f"{where}: plugdet sets it for the {family} head from the backbone and the classes")
        if key in REFUSED:
            raise UserError(f"{where} does not apply to the {family} head: {REFUSED[key]}")
        if key not in own:
            settable = ", ".join(sorted(own - set(DERIVED) - set(REFUSED)))
            raise UserError(f"{where} is not a field of transformers' {config_class.__name__} (the {family} head's "
                            f"settings are its fields: {settable})")  # fmt: skip
    # OmegaConf's lists (model.head_kwargs from a config) as the plain lists transformers' strict config checks
    kwargs = {key: list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
              for key, value in head_kwargs.items()}  # fmt: skip
    levels = len(strides)
    hidden = kwargs.get("encoder_hidden_dim", config_class.__dataclass_fields__["encoder_hidden_dim"].default)
    derived = {"num_labels": int(num_classes), "encoder_in_channels": [int(c) for c in in_channels],
               "feat_strides": [int(s) for s in strides], "num_feature_levels": levels,
               "decoder_in_channels": [int(hidden)] * levels}  # fmt: skip
    if "decoder_n_levels" in own:
        derived["decoder_n_levels"] = levels
    try:
        return config_class(**{"encode_proj_layers": [levels - 1], **kwargs, **derived})
    except (TypeError, ValueError, StrictDataclassError) as err:  # transformers' configs are strict dataclasses
        reason = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])  # its field and what it wants
        raise UserError(f"model.head_kwargs of head {family!r}: {reason}") from None


class MapsSlot(nn.Module):
    """What the transformers model holds as its backbone: the channels of plugdet's maps (which its constructor reads
    to build `encoder_input_proj`) and, during one forward (`holding`), the maps themselves, returned as transformers'
    backbone returns them: `(map, mask)` pairs (the mask is not read once the maps are projected: None)."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.maps: list[torch.Tensor] | None = None

    @contextlib.contextmanager
    def holding(self, maps: Sequence[torch.Tensor]) -> Iterator[None]:
        """The maps this slot hands out during the block."""
        self.maps = list(maps)
        try:
            yield
        finally:
            self.maps = None

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> list[tuple[torch.Tensor, None]]:
        if self.maps is None:
            raise RuntimeError("the DETR model inside a plugdet head has no backbone: run the plugdet Detector")
        return [(level, None) for level in self.maps]


def build_net(family: str, num_classes: int, in_channels: Sequence[int], strides: Sequence[int],
              head_kwargs: Mapping[str, Any]) -> nn.Module:  # fmt: skip
    """transformers' model of the family on maps of `in_channels`, its backbone slot a `MapsSlot`."""
    modeling, config_class, model_class = import_family(family)
    config = family_config(family, config_class, num_classes, in_channels, strides, head_kwargs)
    slot = MapsSlot(in_channels)
    # transformers' constructor asks `load_backbone(config)` for its backbone and reads `.channels`: it gets the slot
    try:
        with mock.patch.object(modeling, "load_backbone", lambda _: slot):
            net = model_class(config)
    except (TypeError, ValueError) as err:  # a config transformers accepts but cannot build (decoder_layers=1)
        reason = str(err).strip().splitlines()[0][:200]
        raise UserError(f"model.head_kwargs of head {family!r}: transformers' {model_class.__name__} cannot be "
                        f"built from them: {reason}") from None  # fmt: skip
    net.model.backbone = slot  # in place of transformers' ConvEncoder wrapper, whose only work is the masks
    return net


def detr_labels(targets: torch.Tensor, batch_size: int, image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """plugdet's targets [N, 6] (image_index, class_id, x1, y1, x2, y2 input pixels) as transformers' labels: per
    image {"class_labels": [n] int64, "boxes": [n, 4] cx, cy, w, h normalised by the input's (W, H)}."""
    height, width = image_size
    scale = targets.new_tensor([width, height, width, height], dtype=torch.float32)  # [4]
    index = targets[:, 0].long()
    boxes = xyxy2cxcywh(targets[:, 2:6].float()) / scale  # [N, 4]
    return [{"class_labels": targets[index == i, 1].long(), "boxes": boxes[index == i]} for i in range(batch_size)]


@functools.cache
def _post_processor() -> Any:
    """transformers' image processor of both families' checkpoints, for its `post_process_object_detection`."""
    from transformers.models.rt_detr.image_processing_rt_detr import RTDetrImageProcessor

    return RTDetrImageProcessor()


class DetrFamily(DetectionHead):
    """A DETR family's transformers model as a plugdet head (see the module docstring).

    Args:
        family: "rtdetr" or "dfine".
        num_classes, in_channels, strides: the head contract (any channels per level).
        **head_kwargs: fields of the family's transformers config.

    Raw outputs (`forward`): transformers' `...ObjectDetectionOutput`; in training with `loss` and `loss_dict`.
    """

    default_loss = "detr"
    needs_targets = True
    end_to_end = True
    # why `detect.interop.export` refuses it: a TorchScript trace reproduces the model only at the traced size (the
    # anchors, position embeddings and level shapes come from Python-side per-size caches), and the ONNX graph of
    # RT-DETRv2 (transformers 5.25.0, opset 17) gave other detections than the model even at that size
    export_refusal = (
        "transformers' RT-DETRv2 / D-FINE do not trace to a faithful graph: anchors and position "
        "embeddings come from per-size Python caches, and the ONNX graph's detections differ"
    )

    def __init__(
        self, family: str, num_classes: int, in_channels: Sequence[int], strides: Sequence[int], **head_kwargs: Any
    ) -> None:
        super().__init__()
        self.family = family
        self.net = build_net(family, num_classes, in_channels, strides, head_kwargs)
        self.num_classes = int(num_classes)
        self.strides = tuple(int(s) for s in strides)

    def forward(
        self, features: list[torch.Tensor], image_size: tuple[int, int], targets: torch.Tensor | None = None
    ) -> Any:
        """transformers' forward on the maps; in training with the targets as its labels (denoising and loss)."""
        locations = sum(int(f.shape[-2] * f.shape[-1]) for f in features)
        queries = int(self.net.config.num_queries)
        if locations < queries:
            raise UserError(f"the {self.family} head selects num_queries={queries} of the encoder's locations, but a "
                            f"{image_size[0]}x{image_size[1]} input has {locations}: use a larger data.img_size or "
                            "a smaller model.head_kwargs.num_queries")  # fmt: skip
        labels = None
        if self.training:
            if targets is None:
                raise RuntimeError(f"the {self.family} head's training forward needs the targets: detector(images, "
                                   "targets)")  # fmt: skip
            labels = detr_labels(targets, int(features[0].shape[0]), image_size)
        with self.net.model.backbone.holding(features):
            return self.net(pixel_values=features[0], labels=labels)

    def losses(self, raw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """transformers' total loss and its weighted parts, by transformers' names (`loss_vfl`, `loss_bbox_aux_0`,
        `loss_giou_dn_1`, ...), from a training forward's output."""
        if raw.loss_dict is None:
            raise RuntimeError(f"the {self.family} head's output holds no loss: a training forward with targets does")
        total = raw.loss
        # a part transformers leaves as a plain number (D-FINE's DDF with no matched query) becomes a tensor too
        parts = {name: torch.as_tensor(value, dtype=total.dtype, device=total.device)
                 for name, value in raw.loss_dict.items()}  # fmt: skip
        return total, parts

    def decode(self, raw: Any, image_size: tuple[int, int]) -> torch.Tensor:
        """transformers' post-processing of the eval output, every (query, class) pair it selects kept.

        Returns:
            [B, Q, 6] rows (x1, y1, x2, y2 input pixels, score, label), by decreasing score, float32.
        """
        outputs = SimpleNamespace(logits=raw.logits.float(), pred_boxes=raw.pred_boxes.float())
        sizes = [tuple(int(s) for s in image_size)] * int(raw.logits.shape[0])
        found = _post_processor().post_process_object_detection(outputs, threshold=NEVER_DROPPED, target_sizes=sizes)
        rows = [torch.cat((d["boxes"], d["scores"][:, None], d["labels"][:, None].to(d["boxes"].dtype)), dim=1)
                for d in found]  # fmt: skip
        return torch.stack(rows)  # [B, Q, 6] from [Q, 6] per image

    def postprocess(
        self, decoded: torch.Tensor, conf: float, iou: float, max_det: int, multi_label: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """The rows scored above `conf`, at most `max_det` per image; no NMS (`iou` does not apply), and every (query,
        class) pair is already a candidate (`multi_label` changes nothing)."""
        return end_to_end_detections(decoded, conf, max_det)


@register_head("rtdetr", neck={"name": "identity"})
def rtdetr_head(num_classes: int, in_channels: Sequence[int], strides: Sequence[int], **kwargs: Any) -> DetrFamily:
    """transformers' RT-DETRv2 (`RTDetrV2ForObjectDetection`) on the backbone's maps; kwargs: `RTDetrV2Config` fields
    (its defaults: the R50-sized model, hidden 256, 6 decoder layers, 300 queries)."""
    return DetrFamily("rtdetr", num_classes, in_channels, strides, **kwargs)


@register_head("dfine", neck={"name": "identity"})
def dfine_head(num_classes: int, in_channels: Sequence[int], strides: Sequence[int], **kwargs: Any) -> DetrFamily:
    """transformers' D-FINE (`DFineForObjectDetection`) on the backbone's maps; kwargs: `DFineConfig` fields (its
    defaults: hidden 256, 6 decoder layers, 300 queries)."""
    return DetrFamily("dfine", num_classes, in_channels, strides, **kwargs)
