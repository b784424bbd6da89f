"""Faults of one rank of a `torchrun` run, for tests/test_distributed_setup_faults.py; plugdet itself is not edited.

Named by `imports=[tests/plugins/rank_faults.py]`, it registers a data format `rank_fault_cub` (the CUB reader) and a
loss `rank_fault_yolo` (YOLOv8's), which do what the environment variable PLUGDET_RANK_FAULT="<kind>:<rank>" says on
that rank only (RANK is torchrun's):

- `setup`: the data format raises a `UserError` while the datasets are built (a data root missing on one node);
- `hang`: the loss never returns from its first call (a rank stuck, its process alive);
- `die`: the loss kills its own process with SIGKILL at its 6th call (epoch 2, batch 2 of 4 steps an epoch);
- `slow_eval`: once training has begun, each validation image takes `SLOW_IMAGE_S` seconds to load (an evaluation
  longer than train.ddp_timeout, as on a big data set).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from backbones.errors import UserError
from detect.data.formats import FORMATS, register_format
from detect.losses.registry import LOSSES, register_loss

DIE_AT_CALL = 6
SLOW_IMAGE_S = 2.0
_losses_called = [0]


def _fault() -> tuple[str, int]:
    """The fault kind and the rank it is meant for ("", -1: none)."""
    kind, _, rank = os.environ.get("PLUGDET_RANK_FAULT", "").partition(":")
    return kind, int(rank) if rank else -1


def _here(kind: str) -> bool:
    """Whether fault `kind` is meant for this process's rank."""
    wanted, rank = _fault()
    return wanted == kind and rank == int(os.environ.get("RANK", "0"))


@register_format("rank_fault_cub", keys=("root", "labels"))
def rank_fault_cub(data: Any, split: str) -> Any:
    """The CUB reader; with the `setup` fault, a missing data root on this rank."""
    if _here("setup"):
        raise UserError(f"data.root {data.root} not found (on this node)")
    source = FORMATS.get("cub")(data, split)
    if _here("slow_eval") and split == "val":

        class SlowSource(type(source)):  # the reader's own class (a DetectionSource), loading its images slowly
            def load_image(self, index: int) -> Any:
                if _losses_called[0]:
                    time.sleep(SLOW_IMAGE_S)
                return super().load_image(index)

        source.__class__ = SlowSource
    return source


@register_loss("rank_fault_yolo")
def rank_fault_yolo(head: Any, loss: dict, assign: dict) -> Any:
    """YOLOv8's criterion; with the `hang` fault it never returns from its first call, with `die` the process is
    killed at call `DIE_AT_CALL`."""
    criterion, calls = LOSSES.get("yolo")(head, loss, assign), [0]

    def faulty(outputs: Any, targets: Any) -> Any:
        calls[0] += 1
        _losses_called[0] += 1
        if _here("hang") and calls[0] == 1:
            while True:  # alive, never answering: only a SIGKILL ends it
                time.sleep(1.0)
        if _here("die") and calls[0] == DIE_AT_CALL:
            os.kill(os.getpid(), signal.SIGKILL)
        return criterion(outputs, targets)

    return faulty
