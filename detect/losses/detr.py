"""The criterion of the DETR families (RT-DETRv2, D-FINE): transformers' own loss, read from the head's output.

transformers computes the loss inside the model's training forward (the denoising queries need the labels there):
the Hungarian matcher (scipy's `linear_sum_assignment` on class, L1 and GIoU costs) and, for the final decoder
layer, every earlier layer, the encoder's top-k queries and each denoising layer, the varifocal loss (VFL), L1 and GIoU
box losses, plus D-FINE's fine-grained localisation (FGL) and decoupled distillation (DDF) losses, each already
multiplied by its weight (`weight_loss_*` of the family's config, `model.head_kwargs`). That is 39 parts for a
6-layer RT-DETRv2 and more for D-FINE; the criterion reports them summed by kind (`vfl`, `bbox`, `giou`, `fgl`,
`ddf`), and its total is transformers' own `loss` (the sum of all of them, in transformers' order).

Each part is normalised by the number of target boxes of the process's batch, so `reduction` is "mean" (DDP's
gradient average is the mean over processes). The `loss.*` gains and the `assign.*` settings are YOLO's and do not
apply here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from detect.losses.registry import register_loss

KIND = re.compile(r"^loss_([a-z]+)")  # loss_vfl, loss_bbox_aux_3, loss_giou_dn_0, loss_fgl_dn_pre -> vfl, bbox, ...


def parts_by_kind(loss_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' weighted loss parts summed by kind, in the order the kinds first appear.

    Args:
        loss_dict: transformers' parts by its names (`loss_vfl`, `loss_bbox_aux_0`, `loss_giou_dn_1`, ...), [] each.

    Returns:
        {"vfl": [], "bbox": [], "giou": [], ...}: each kind's sum over layers, encoder and denoising groups.
    """
    kinds: dict[str, list[torch.Tensor]] = {}
    for name, value in loss_dict.items():
        match = KIND.match(name)
        kinds.setdefault(match.group(1) if match else name, []).append(value)
    return {kind: torch.stack(values).sum() for kind, values in kinds.items()}


class DetrLoss:
    """`criterion(raw, targets) -> (total, parts)` over a DETR family's head: total is transformers' loss, parts its
    weighted parts by kind. The targets already went into the model's forward (`needs_targets`)."""

    reduction = "mean"

    def __init__(self, head: Any) -> None:
        self.head = head

    def __call__(self, raw: Any, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, loss_dict = self.head.losses(raw)
        return total, parts_by_kind(loss_dict)


@register_loss("detr", loss_keys=(), assign_keys=())  # the families' weights are their config's (model.head_kwargs)
def detr_loss(head: Any, loss: Mapping[str, Any], assign: Mapping[str, Any]) -> DetrLoss:
    """The loss of the rtdetr and dfine heads (their `default_loss`)."""
    return DetrLoss(head)
