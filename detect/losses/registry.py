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

from collections.abc import Callable

from backbones.registry import Registry

LOSSES = Registry("loss")


def register_loss(name: str) -> Callable:
    """Decorator registering a loss factory `(head, loss: dict, assign: dict) -> criterion` under `name`."""
    return LOSSES.register(name)


def list_losses() -> list[str]:
    return LOSSES.names()
