"""Classifier: a backbone with global average pooling, dropout and a linear head, for CUB pretraining."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """Global-average-pools the deepest backbone map and classifies it with one linear layer.

    The backbone stays the child `backbone`, so `classifier.backbone.state_dict()` has exactly the keys of a
    detector's `backbone.*` and transfers with `load_backbone_weights`.

    Args:
        backbone: any registered backbone (three maps; `out_channels[-1]` channels in the deepest).
        num_classes: number of classes.
        dropout: dropout probability before the linear layer.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.out_channels[-1], num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x [B, 3, H, W]. Returns: logits [B, num_classes]."""
        deepest = self.backbone(x)[-1]  # [B, C5, H/32, W/32]
        pooled = deepest.mean(dim=(2, 3))  # [B, C5]
        return self.head(self.dropout(pooled))
