"""The YOLO26 head family: YOLO11's decoupled head with raw box distances (reg_max 1, no DFL) and a one-to-one copy
of both branches, decoded by top-k without NMS (Ultralytics 8.4.190, `Detect` with `end2end` in yolo26.yaml).

Two sets of branches read the neck's maps:

- one-to-many (`box_branch`, `cls_branch`, YOLO11's): trained with TaskAligned assignment of 10 anchors per object;
  it shapes the features and is only used in training.
- one-to-one (`one2one_box_branch`, `one2one_cls_branch`, a copy at init): trained to give one anchor per object
  (the end-to-end matching of YOLOv10, Wang et al., "YOLOv10: Real-Time End-to-End Object Detection", NeurIPS 2024,
  arXiv:2405.14458). In training it reads detached features, so only the one-to-many loss shapes the backbone and
  the neck. Inference decodes this branch alone.

The box branch predicts the four ltrb distances directly (in grid units of the level), so a side is one number and
the DFL integral of YOLOv8 / YOLO11 is gone. The decode is `YoloDecoder`'s (anchors, split, dist2bbox) with the
identity for the distances (`EndToEndDecoder`), then a top-k over the anchors by their best class and over
(anchor, class) pairs of those (`EndToEndDecoder.top_k`): `[B, K, 6]` rows (x1, y1, x2, y2, score, label), K =
min(max_det, A), by decreasing score. `postprocess` keeps the rows above `conf` (no NMS; `iou` is ignored). The
decode traces (`traceable_decode`): anchors and K come from the maps' sizes in the graph and the top-k is ONNX TopK,
so an exported file outputs these rows (`end_to_end`, read by `detect.interop.runners.ExportedDetector`).
`fuse()` drops the one-to-many branches for inference, as Ultralytics' fused model does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from backbones.errors import UserError
from detect.models.heads.yolo import Yolo11Head, YoloDecoder, tracing
from detect.models.registry import register_head

MAX_DET = 300  # Ultralytics' `Detect.max_det`: rows of the end-to-end decode
BOX_BIAS = 2.0  # Ultralytics 8.4.190's `Detect.bias_init` prior on the box outputs (raw distances: 2 grid cells)


class EndToEndDecoder(YoloDecoder):
    """`YoloDecoder` for raw distances (reg_max 1: the box output is the ltrb distances, no softmax over bins), plus
    the top-k selection of the end-to-end decode.

    Args:
        num_classes: C.
        strides: stride of each level in input pixels, shallow to deep.
    """

    def __init__(self, num_classes: int, strides: Sequence[int]) -> None:
        super().__init__(num_classes, strides, reg_max=1)

    def box_distances(self, box_logits: torch.Tensor, bins: torch.Tensor | None = None) -> torch.Tensor:
        """The ltrb distances as predicted: [B, A, 4] in, the same [B, A, 4] out (grid units)."""
        return box_logits

    @staticmethod
    def top_k(decoded: torch.Tensor, max_det: int) -> torch.Tensor:
        """The end-to-end detections of dense decoded outputs, without NMS.

        First the K = min(max_det, A) anchors with the best top class score, then the K best (anchor, class) pairs
        among those K x C, so one anchor may give several classes (Ultralytics' `Detect.get_topk_index`).

        Args:
            decoded: [B, A, 4 + C] xyxy input pixels then class scores.
            max_det: most rows per image.

        Returns:
            [B, K, 6] rows (x1, y1, x2, y2, score, label as a float), by decreasing score.
        """
        scores = decoded[..., 4:]  # [B, A, C]
        num_classes = scores.shape[-1]
        # K = min(max_det, A): while tracing, in the graph from A (an int would freeze the export size's K, and an
        # input with fewer anchors than max_det would fail ONNX TopK)
        k = min(int(max_det), scores.shape[1])
        if tracing():
            k = torch._shape_as_tensor(scores)[1].clamp(max=int(max_det))  # [] in the graph
        anchors = scores.amax(dim=-1).topk(k, dim=1).indices  # [B, K] anchors by their best class
        candidates = scores.gather(1, anchors.unsqueeze(-1).expand(-1, -1, num_classes))  # [B, K, C]
        top_scores, flat = candidates.flatten(1).topk(k, dim=1)  # [B, K] over the K * C pairs
        anchors = anchors.gather(1, flat // num_classes)  # [B, K] the anchor of each pair
        labels = (flat % num_classes).to(decoded.dtype)  # [B, K]
        # whole rows, then the box: ONNX GatherElements on a [B, A, 4] slice gets its data as the [B, A, 4 + C] rows
        # with [B, K, 4] indices, which onnxruntime runs but OpenVINO refuses (its non-axis sizes must be equal)
        rows = decoded.gather(1, anchors.unsqueeze(-1).expand(-1, -1, decoded.shape[-1]))  # [B, K, 4 + C]
        top_boxes = rows[..., :4]  # [B, K, 4]
        return torch.cat((top_boxes, top_scores.unsqueeze(-1), labels.unsqueeze(-1)), dim=-1)  # [B, K, 6]


def end_to_end_detections(decoded: torch.Tensor, conf: float, max_det: int) -> list[dict[str, torch.Tensor]]:
    """Per image, the rows of an end-to-end decode scored above `conf`, at most `max_det`: `Yolo26Head.postprocess`
    and the runners of an exported YOLO26 file (`detect.interop.runners.ExportedDetector`), whose output it is too.

    Args:
        decoded: [B, K, 6] rows (x1, y1, x2, y2, score, label), by decreasing score.

    Returns:
        Per image dict(boxes [K', 4] xyxy input pixels, scores [K'], labels [K'] int64).
    """
    results = []
    for rows in decoded.float():  # [K, 6]
        rows = rows[rows[:, 4] > conf][:max_det]
        results.append({"boxes": rows[:, :4], "scores": rows[:, 4], "labels": rows[:, 5].long()})
    return results


class Yolo26Head(Yolo11Head):
    """YOLO26's head: `Yolo11Head`'s branches at reg_max 1 (no DFL bins), a one-to-one copy of them, and the NMS-free
    top-k decode of the one-to-one branch.

    Hidden widths are Ultralytics': box max(16, c0 // 4, 4), class max(c0, min(C, 100)), c0 the shallowest width.

    Args:
        num_classes: C.
        in_channels: channels of each input level (shallow to deep).
        strides: stride of each level in input pixels.
        max_det: rows of the eval-mode decode (Ultralytics: 300).

    Raw outputs (`forward`): `{"one2many": [...], "one2one": [...]}` in training, each one `[B, 4 + C, H_l, W_l]` map
    per level (distances, then class logits); in eval mode (and once fused) only `"one2one"`.
    """

    default_loss = "yolo26"
    # The decode traces (anchors and K from the maps' sizes, top-k as ONNX TopK); what exports is the end-to-end
    # [B, K, 6], which a runner of the file reads by `end_to_end` (detect.interop.export), no NMS after it.
    traceable_decode = True
    end_to_end = True

    def __init__(
        self, num_classes: int, in_channels: Sequence[int], strides: Sequence[int], max_det: int = MAX_DET
    ) -> None:
        super().__init__(num_classes, in_channels, strides, reg_max=1)
        del self.dfl_bins  # reg_max 1: no bins (Ultralytics' DFL is an Identity without parameters)
        if max_det < 1:
            raise UserError(f"model.head_kwargs.max_det={max_det}: must be >= 1")
        self.max_det = int(max_det)
        self.decoder = EndToEndDecoder(self.num_classes, self.strides)
        self.one2one_box_branch = copy.deepcopy(self.box_branch)  # Ultralytics' init: a copy of the one-to-many
        self.one2one_cls_branch = copy.deepcopy(self.cls_branch)
        self.fused = False

    def branch_pairs(self) -> list[tuple[nn.ModuleList, nn.ModuleList]]:
        """The (box, class) branch lists present: one-to-many (unless fused away), then one-to-one."""
        pairs = [(getattr(self, "box_branch", None), getattr(self, "cls_branch", None)),
                 (getattr(self, "one2one_box_branch", None), getattr(self, "one2one_cls_branch", None))]  # fmt: skip
        return [(box, cls) for box, cls in pairs if box is not None and cls is not None]

    @torch.no_grad()
    def reset_bias(self) -> None:
        """Ultralytics 8.4.190's priors on both branch pairs: box distances 2.0; class log(5 / C / (640 / stride)^2)
        (about 5 objects per 640x640 image over the level's cells, RetinaNet's focal-loss prior, Lin et al. 2017)."""
        for box_branch, cls_branch in self.branch_pairs():
            for box, cls, stride in zip(box_branch, cls_branch, self.strides, strict=True):
                box.pred.bias.fill_(BOX_BIAS)
                cls.pred.bias.fill_(math.log(5 / self.num_classes / (640 / stride) ** 2))

    def _levels(
        self, features: Sequence[torch.Tensor], box_branch: nn.ModuleList, cls_branch: nn.ModuleList
    ) -> list[torch.Tensor]:
        """One [B, 4 + C, H_l, W_l] map per level: distances then class logits."""
        pairs = zip(features, box_branch, cls_branch, strict=True)
        return [torch.cat((box(x), cls(x)), dim=1) for x, box, cls in pairs]  # [B, 4 + C, H_l, W_l] each

    def forward(
        self,
        features: Sequence[torch.Tensor],
        image_size: tuple[int, int] | None = None,
        targets: torch.Tensor | None = None,
    ) -> dict[str, list[torch.Tensor]]:
        """Raw per-level predictions of both branch pairs in training, of the one-to-one pair in eval mode.

        Args:
            features: one map per level, [B, in_channels[l], H_l, W_l].

        Returns:
            {"one2many": [B, 4 + C, H_l, W_l] per level (training only), "one2one": the same layout}; the one-to-one
            maps are computed on detached features in training.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"Yolo26Head: expected {len(self.strides)} feature maps, got {len(features)}")
        if not self.training:
            return {"one2one": self._levels(features, self.one2one_box_branch, self.one2one_cls_branch)}
        detached = [x.detach() for x in features]  # the one-to-one loss does not reach the backbone and the neck
        return {
            "one2many": self._levels(features, self.box_branch, self.cls_branch),
            "one2one": self._levels(detached, self.one2one_box_branch, self.one2one_cls_branch),
        }

    def decode(self, raw: dict[str, Sequence[torch.Tensor]], image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The end-to-end detections of the one-to-one branch, float32 whatever the autocast state.

        Returns:
            [B, K, 6] rows (x1, y1, x2, y2 input pixels, score, label), K = min(max_det, A), by decreasing score.
        """
        return self.decoder.top_k(self.decoder.decode(raw["one2one"]), self.max_det)

    def postprocess(
        self, decoded: torch.Tensor, conf: float, iou: float, max_det: int, multi_label: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """The rows of the end-to-end decode with a score above `conf`, at most `max_det` per image; no NMS, so `iou`
        and `multi_label` (every (anchor, class) pair is already a candidate) do not apply.

        Args:
            decoded: [B, K, 6] (`decode`), by decreasing score.

        Returns:
            Per image dict(boxes [K', 4] xyxy input pixels, scores [K'], labels [K'] int64).
        """
        return end_to_end_detections(decoded, conf, max_det)

    def fuse(self) -> Yolo26Head:
        """Drop the one-to-many branches, which inference never reads (Ultralytics' fused model drops them too);
        inference only: the head can no longer be trained. Returns self."""
        self.box_branch = None
        self.cls_branch = None
        self.fused = True
        return self

    def train(self, mode: bool = True) -> Yolo26Head:
        """Set train/eval mode; a head whose one-to-many branches were dropped (`fuse`) refuses train mode."""
        if mode and self.fused:
            raise RuntimeError("this YOLO26 head was fused for inference (one-to-many branches dropped)")
        return super().train(mode)


@register_head("yolo26")
def yolo26_head(
    num_classes: int, in_channels: Sequence[int], strides: Sequence[int], reg_max: int = 1, max_det: int = MAX_DET
) -> Yolo26Head:
    """YOLO26's head (`Detect` of yolo26*.yaml, end-to-end); `reg_max` must be 1 (raw distances, no DFL)."""
    if reg_max != 1:
        raise UserError(f"the yolo26 head predicts raw box distances: reg_max must be 1, got {reg_max}")
    return Yolo26Head(num_classes, in_channels, strides, max_det)
