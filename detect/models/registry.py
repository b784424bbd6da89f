"""Registries of the detector's parts: necks, head families and their losses (the shape of `backbones.registry`).

A part of your own registers in your own module, and the config key `imports: [your_module]` imports it before
anything is built (`detect.plugins.import_plugins`); plugdet is never edited. The contracts (DESIGN §3):

- **Neck factory** `(in_channels: tuple[int, ...], strides: tuple[int, ...], **kwargs) -> nn.Module`: the module maps
  the backbone's list of maps to its own list and has `out_channels` and `strides` (it may add levels). A factory
  that takes a `scale` argument gets `model.scale`.
- **Head factory** `(num_classes: int, in_channels: tuple[int, ...], strides: tuple[int, ...], **kwargs) ->
  DetectionHead` (see `detect.models.heads.base`): the head owns its modules, names its default loss, decodes its
  raw outputs and turns them into detections.
- **Loss factory** `(head, loss: dict, assign: dict) -> criterion`: built from the head's plain numbers and the
  config's `loss.*` / `assign.*` sections; it builds its own assigner and hands it to the criterion. A criterion is
  `criterion(raw_outputs, targets [N, 6]) -> (total, parts: dict[str, Tensor])`; the engine sums nothing itself.
  A criterion's optional attribute `reduction` says what `total` is over the process's batch: "sum" (the default,
  YOLO's: the engine multiplies it by the world size, so DDP's gradient average is the global sum) or "mean"
  (torchvision's families: back-propagated as it is, so DDP's average is the global mean).
  `detect.losses.build_criterion` picks the factory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from backbones.errors import UserError
from backbones.registry import Registry

NECKS = Registry("neck")
HEADS = Registry("head")
LOSSES = Registry("loss")
HEAD_NECKS: dict[str, dict[str, Any] | None] = {}  # head -> its own neck (`register_head(..., neck=...)`)


def register_neck(name: str) -> Callable:
    """Decorator registering a neck factory `(in_channels, strides, **kwargs) -> nn.Module` under `name`."""
    return NECKS.register(name)


def register_head(name: str, neck: Mapping[str, Any] | None = None) -> Callable:
    """Decorator registering a head factory `(num_classes, in_channels, strides, **kwargs) -> DetectionHead`.

    Args:
        name: the name `model.head` takes.
        neck: the family's own neck, `{"name": ..., "kwargs": {...}}`, used when `model.neck` is not set (None: the
            neck registered under the head's own name, as for yolov8 and yolo11).
    """
    register = HEADS.register(name)

    def decorator(factory: Callable) -> Callable:
        factory = register(factory)  # a duplicate name raises here, before the neck is recorded
        HEAD_NECKS[name] = {"name": str(neck["name"]), "kwargs": dict(neck.get("kwargs") or {})} if neck else None
        return factory

    return decorator


def default_neck(head: str) -> tuple[str, dict[str, Any]]:
    """The neck of a head family when `model.neck` is not set: what its registration names, else the neck
    registered under the head's name; an unknown head lists the registered ones."""
    HEADS.get(head)
    own = HEAD_NECKS.get(head)
    if own is not None:
        return own["name"], dict(own["kwargs"])
    if head not in NECKS:
        raise UserError(f"head {head!r} names no neck of its own and no neck is registered under its name: set "
                        f"model.neck (registered necks: {', '.join(NECKS.names())})")  # fmt: skip
    return head, {}


def register_loss(name: str) -> Callable:
    """Decorator registering a loss factory `(head, loss: dict, assign: dict) -> criterion` under `name`."""
    return LOSSES.register(name)


def list_necks() -> list[str]:
    return NECKS.names()


def list_heads() -> list[str]:
    return HEADS.names()


def list_losses() -> list[str]:
    return LOSSES.names()


def build_neck(name: str, in_channels: Sequence[int], strides: Sequence[int], **kwargs: Any) -> nn.Module:
    """A registered neck on maps of `in_channels` at `strides`; an unknown name lists the registered ones."""
    return NECKS.get(name)(tuple(in_channels), tuple(strides), **kwargs)


def build_head(
    name: str, num_classes: int, in_channels: Sequence[int], strides: Sequence[int], **kwargs: Any
) -> nn.Module:
    """A registered head family for `num_classes` classes on maps of `in_channels` at `strides`."""
    return HEADS.get(name)(int(num_classes), tuple(in_channels), tuple(strides), **kwargs)
