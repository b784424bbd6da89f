"""What every head family is: the contract `Detector`, the engine, evaluation and predict rely on (DESIGN §3).

A head family owns everything specific to it: its modules, the name of its default loss (registered in
`detect.losses.registry.LOSSES`), how it decodes raw outputs, and how those become detections. Nothing outside a
family names its loss parts or its internals (reg_max, anchors, ...): export, too, only calls `decode`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class DetectionHead(nn.Module):
    """Base class of head families.

    Class attributes:
        default_loss: the registered loss `build_criterion` uses when the config names none (`loss.name`).
        needs_targets: True for a family whose training forward needs the targets (two-stage RPN / RoI sampling);
            `Detector` then passes them in, and its criterion reads the losses from the raw outputs.
        traceable_decode: True for a family whose eval forward and `decode` trace (torch.jit.trace, ONNX) with the
            sizes read from the maps in the graph, and decode to the dense `[B, A, 4 + C]` (xyxy input pixels, then
            scores) that `detect.postprocess` and the exported NMS read. Only such a family exports
            (`detect.interop.export`), with dynamic sizes and optional NMS in the graph.
        end_to_end: True for a family whose eval output is final detections, `[B, K, 6]` rows (xyxy, score, label)
            from a top-k decode with no NMS (YOLO26's one-to-one branch); exports and runners read it as rows.

    Attributes a subclass sets:
        num_classes, strides (of its input levels).
    """

    default_loss: ClassVar[str] = ""
    needs_targets: ClassVar[bool] = False
    traceable_decode: ClassVar[bool] = False
    end_to_end: ClassVar[bool] = False
    num_classes: int
    strides: tuple[int, ...]

    def forward(
        self, features: list[torch.Tensor], image_size: tuple[int, int], targets: torch.Tensor | None = None
    ) -> Any:
        """Raw outputs (what the criterion consumes) from the neck's maps of a batch of `image_size` (H, W) inputs;
        `targets` [N, 6] only for `needs_targets` families in training."""
        raise NotImplementedError

    def decode(self, raw: Any, image_size: tuple[int, int]) -> Any:
        """What the eval-mode detector returns (and, with `traceable_decode`, exports) for these raw outputs."""
        raise NotImplementedError

    def postprocess(
        self, decoded: Any, conf: float, iou: float, max_det: int, multi_label: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Final detections per image: dict(boxes [K, 4] xyxy input pixels, scores [K], labels [K] int64), sorted by
        decreasing score, K <= max_det, scores > conf. `iou` is the NMS threshold and `multi_label` (one candidate
        per class above `conf`, the validation setting) applies to families that run NMS over class scores."""
        raise NotImplementedError
