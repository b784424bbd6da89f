"""The criterion of torchvision's families (RetinaNet, FCOS, Faster R-CNN): the sum of torchvision's own loss parts.

The losses themselves are torchvision's (`detect.models.heads.torchvision`): focal loss and smooth-L1 / GIoU /
centerness for the dense families, the RPN's objectness and box regression and the RoI heads' classification and
box regression for Faster R-CNN. Each part is a mean over the batch (its anchors or sampled RoIs), so `reduction`
is "mean": DDP's gradient average is then the global batch's mean, as in torchvision's own training. The config's
`loss.*` gains are YOLO's and do not apply here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from detect.losses.registry import register_loss


class TorchvisionLoss:
    """`criterion(raw, targets) -> (total, parts)` over a torchvision family's head: parts by torchvision's names
    (e.g. `classification`, `bbox_regression`), total their sum."""

    reduction = "mean"

    def __init__(self, head: Any) -> None:
        self.head = head

    def __call__(self, raw: Any, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = self.head.losses(raw, targets)
        return torch.stack(list(parts.values())).sum(), parts


@register_loss("torchvision", loss_keys=(), assign_keys=())  # torchvision's own settings, in its head
def torchvision_loss(head: Any, loss: Mapping[str, Any], assign: Mapping[str, Any]) -> TorchvisionLoss:
    """The loss of the retinanet, fcos and faster_rcnn heads (their `default_loss`)."""
    return TorchvisionLoss(head)
