"""Registries of the detector's parts: necks and head families (the shape of `backbones.registry`; the losses' is
`detect.losses.registry`).

A part of your own registers in your own module, and the config key `imports: [your_module]` imports it before
anything is built (`detect.plugins.import_plugins`); plugdet is never edited. The contracts (DESIGN §3):

- **Neck factory** `(in_channels: tuple[int, ...], strides: tuple[int, ...], **kwargs) -> nn.Module`: the module maps
  the backbone's list of maps to its own list and has `out_channels` and `strides` (it may add levels). A factory
  that takes a `scale` argument gets `model.scale`.
- **Head factory** `(num_classes: int, in_channels: tuple[int, ...], strides: tuple[int, ...], **kwargs) ->
  DetectionHead` (see `detect.models.heads.base`): the head owns its modules, names its default loss, decodes its
  raw outputs and turns them into detections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from backbones.errors import UserError
from backbones.registry import Registry, check_keywords, keyword_errors

NECKS = Registry("neck")
HEADS = Registry("head")
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


def list_necks() -> list[str]:
    return NECKS.names()


def list_heads() -> list[str]:
    return HEADS.names()


def build_neck(name: str, in_channels: Sequence[int], strides: Sequence[int], **kwargs: Any) -> nn.Module:
    """A registered neck on maps of `in_channels` at `strides`; an unknown name lists the registered ones."""
    factory, what = NECKS.get(name), f"model.neck_kwargs of neck {name!r}"
    check_keywords(factory, kwargs, what, skip=2)
    with keyword_errors(what):
        return factory(tuple(in_channels), tuple(strides), **kwargs)


def build_head(
    name: str, num_classes: int, in_channels: Sequence[int], strides: Sequence[int], **kwargs: Any
) -> nn.Module:
    """A registered head family for `num_classes` classes on maps of `in_channels` at `strides`."""
    factory, what = HEADS.get(name), f"model.head_kwargs of head {name!r}"
    check_keywords(factory, kwargs, what, skip=3)
    with keyword_errors(what):
        return factory(int(num_classes), tuple(in_channels), tuple(strides), **kwargs)
