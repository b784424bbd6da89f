"""Registered losses and their assigners; importing the package registers plugdet's own (explicit imports,
STYLE §5), and `build_criterion` builds a head's criterion from the loss registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from detect.losses import detr, torchvision, yolo, yolo26  # noqa: F401  (registration happens on import)
from detect.losses.registry import LOSSES


def build_criterion(
    head: nn.Module,
    name: str | None = None,
    loss: Mapping[str, Any] | None = None,
    assign: Mapping[str, Any] | None = None,
) -> Callable:
    """The criterion of a head: the loss registered as `name` (None: the head's `default_loss`), from plain numbers.

    Args:
        head: the detector's head (its `num_classes`, `strides` and family-specific numbers).
        name: a registered loss, or None for the head family's own.
        loss: the loss settings (config section `loss`, a plain dict).
        assign: the assigner settings (config section `assign`, a plain dict).
    """
    factory = LOSSES.get(name or head.default_loss)
    return factory(head, dict(loss or {}), dict(assign or {}))
