"""The loss registry (the shape of `backbones.registry`): a head family names its default loss, and `loss.name`
picks another. A loss of your own registers in your own module, named by the config key `imports`.

- **Loss factory** `(head, loss: dict, assign: dict) -> criterion`: built from the head's plain numbers and the
  config's `loss.*` / `assign.*` sections; it builds its own assigner and hands it to the criterion. A criterion is
  `criterion(raw_outputs, targets [N, 6]) -> (total, parts: dict[str, Tensor])`; the engine sums nothing itself.
  A criterion's optional attribute `reduction` says what `total` is over the process's batch: "sum" (the default,
  YOLO's: the engine multiplies it by the world size, so DDP's gradient average is the global sum) or "mean"
  (torchvision's families: back-propagated as it is, so DDP's average is the global mean).
  `detect.losses.build_criterion` picks the factory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from backbones.errors import UserError
from backbones.registry import Registry

LOSSES = Registry("loss")
SETTINGS: dict[str, tuple[frozenset[str], frozenset[str]]] = {}  # loss -> the loss.* and assign.* keys it reads


def register_loss(
    name: str, loss_keys: Iterable[str] | None = None, assign_keys: Iterable[str] | None = None
) -> Callable:
    """Decorator registering a loss factory `(head, loss: dict, assign: dict) -> criterion` under `name`.

    Args:
        name: the name `loss.name` takes (and a head's `default_loss`).
        loss_keys: the `loss.*` / `loss.kwargs.*` keys the factory reads; assign_keys: the `assign.*` keys. Declared,
            a setting the loss does not read is refused in one line (`check_loss_settings`); None: not checked.
    """
    if loss_keys is not None or assign_keys is not None:
        SETTINGS[name] = (frozenset(loss_keys or ()), frozenset(assign_keys or ()))
    return LOSSES.register(name)


def check_loss_settings(
    name: str, loss: Mapping[str, Any], kwargs: Mapping[str, Any], assign: Mapping[str, Any], head: str
) -> None:
    """No setting is dropped in silence: a `loss.*` or `assign.*` key given to a loss that does not read it is one
    UserError line naming the key and what that loss takes.

    Args:
        name: the registered loss.
        loss: the `loss.*` settings the user changed from their defaults.
        kwargs: every `loss.kwargs.*` setting (a plugin loss's own).
        assign: the `assign.*` settings the user changed from their defaults.
        head: the head family, for the message.
    """
    if name not in SETTINGS:
        return
    loss_keys, assign_keys = SETTINGS[name]
    for section, given, takes in (("loss", loss, loss_keys), ("loss.kwargs", kwargs, loss_keys),
                                  ("assign", assign, assign_keys)):  # fmt: skip
        unknown = sorted(set(given) - takes)
        if unknown:
            group = section.split(".")[0]
            accepted = ", ".join(f"{group}.{k}" for k in sorted(takes)) or f"no {group}.* settings"
            raise UserError(f"{section}.{unknown[0]}={given[unknown[0]]!r} is not read by loss {name!r} (of head "
                            f"{head!r}): it takes {accepted}")  # fmt: skip


def list_losses() -> list[str]:
    return LOSSES.names()
