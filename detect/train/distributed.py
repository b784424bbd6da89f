"""Devices and torchrun: process-group set-up, rank-0 helpers, SyncBN, DDP wrapping and metric all-reduce (DESIGN §7);
how the ranks stop together when one of them fails is `detect.train.group_faults`.

Under `torchrun --nproc_per_node=N tools/train_*.py ...` the environment holds RANK, LOCAL_RANK and WORLD_SIZE;
`init_distributed` joins the group (gloo on CPU; on CUDA, NCCL for CUDA tensors and gloo for the small CPU ones the
loops exchange). Without them everything here degrades to the single process case, so training code calls the same
functions either way. Only rank 0 writes files and shows progress.

A fault on one rank stops every rank at the same step, and rank 0 alone says which rank and what (issues 12, 17): a
batch that fails to load or a Ctrl-C / SIGTERM is announced at the next `agree` (one small all-reduce per step); a fault
during set-up at the end of its step (`setup_step`); a rank that died is noticed by the others' next collective (a
closed connection) and a hung one after `train.ddp_timeout`, and `group_stop_error` turns either into one line naming
the rank, found by a roll call on the group's store. Rank 0's work alone (its evaluation, checkpoints, the run folder)
is not under that timeout: the other ranks wait for it on the store while rank 0 beats (`main_alone`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from backbones.errors import UserError

# How long a collective waits for a rank that neither answers nor closes its connection (hung, or its node gone):
# `train.ddp_timeout`, in minutes. 5 minutes is far more than the ranks of a healthy run ever wait for each other in a
# collective (a step's skew, a loader stall), yet a hung rank costs minutes, not torch's default half hour. Rank 0's
# evaluation and files are not under it (`main_alone`), so it needs no room for a big data set's evaluation.
DEFAULT_TIMEOUT_MIN = 5.0
BEAT_S = 1.0  # rank 0's beat while it works alone, and how often the others look at it
GROUP = {"timeout": timedelta(minutes=DEFAULT_TIMEOUT_MIN), "generation": 0, "serial": 0}


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: its rank among `world_size`, its `local_rank` on the node, and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA if present else CPU; `cuda` without a GPU is a UserError; `cpu` -> CPU.

    Args:
        name: "auto", "cpu", "cuda" or "cuda:K".
        local_rank: the GPU index used for "auto"/"cuda" under torchrun.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device={name} but CUDA is not available here: use train.device=cpu or auto")
        return torch.device(name) if ":" in name else torch.device("cuda", local_rank)
    raise UserError(f"unknown device {name!r}: choose auto, cpu or cuda")


def init_distributed(device_name: str = "auto", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA), else a single process.

    Args:
        device_name: as for `select_device`.
        timeout_min: how long a collective waits for a rank that does not answer (`train.ddp_timeout`).

    Returns:
        This process's `DistInfo`; on CUDA the current device is set to LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # CPU tensors (the step's fault flags, the loss sums) go over gloo under NCCL too
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        GROUP["timeout"] = timedelta(minutes=timeout_min)
        dist.init_process_group(backend=backend, timeout=GROUP["timeout"])
        GROUP["generation"], GROUP["serial"] = GROUP["generation"] + 1, 0  # keys of this group on the store
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed(stop: BaseException | None = None) -> None:
    """Leave the process group (if any).

    After a stop every rank agreed on (`stop` marked `rank0_reports`), rank 0 leaves it by exiting and the other ranks
    wait for that first: torchrun ends the remaining processes as soon as one has ended, so rank 0, which saves last.pt
    and says why the run stopped, must be the first to end (the wait is bounded by `train.ddp_timeout`). After a
    timeout gloo has closed every connection: then they wait for rank 0's mark on the store.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if stop is not None and getattr(stop, "rank0_reports", False) and get_world_size() > 1:
        if get_rank() == 0:  # the other ranks wait for its connections to close: once it has said why it stopped
            atexit.register(_destroy_group)
            return
        if not getattr(stop, "rank0_lost", False):
            start = time.monotonic()
            with contextlib.suppress(Exception):  # raised once rank 0's connection closes
                dist.recv(torch.zeros(1), src=0)
            if time.monotonic() - start < BEAT_S:  # no connection left to wait on
                wait_for_key(f"{store_prefix()}ended", GROUP["timeout"].total_seconds())
    dist.destroy_process_group()


def _destroy_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            group_store().set(f"{store_prefix()}ended", "1")
        dist.destroy_process_group()


def group_store() -> Any:
    """The process group's key-value store (torchrun's own, which outlives any rank): what must not wait in a
    collective goes through it."""
    return dist.distributed_c10d._get_default_store()


def store_prefix() -> str:
    return f"plugdet/{GROUP['generation']}/"


def wait_for_key(key: str, seconds: float) -> bool:
    """Whether `key` appeared on the store within `seconds` (False also when the store is gone)."""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(Exception):
        while not group_store().check([key]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True
    return False


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes, in place, and return it (single process: unchanged)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s Python object on every process (e.g. the run directory chosen by rank 0)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def prepare_model(model: nn.Module, info: DistInfo, sync_bn: bool = False) -> nn.Module:
    """Move to the device; under torchrun optionally convert BatchNorm to SyncBatchNorm and wrap in DDP.

    Args:
        model: the model (already holding its final requires_grad flags).
        info: from `init_distributed`.
        sync_bn: SyncBatchNorm across processes (only when distributed on CUDA; a warning on CPU).

    Returns:
        The model to train: the module itself, or a DistributedDataParallel wrapper (see `unwrap`).
    """
    model = model.to(info.device)
    if not info.distributed:
        return model
    if sync_bn and info.device.type == "cuda":
        timm_layers = sys.modules.get("timm.layers")  # a timm backbone was built: timm's converter keeps the
        if timm_layers is not None:  # activation inside its BatchNormAct2d, which torch's drops
            model = timm_layers.convert_sync_batchnorm(model)
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn and info.is_main:
        print("warning: sync_bn needs CUDA (no CPU SyncBatchNorm); keeping per-process BatchNorm", file=sys.stderr)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------------------------------
# A fault on one rank: every rank stops at the same point, rank 0 says which rank and what
# ----------------------------------------------------------------------------------------------------------------------
def fetch(loader: Iterable) -> Iterator[tuple[Any, BaseException | None]]:
    """`(batch, None)` for each batch of `loader`. Under DDP an exception while fetching one (an unreadable image, a
    loader worker that raised or died) ends the iteration with `(None, exc)`, for `agree` to tell every rank; in a
    single process it is raised as it is.

    Under DDP a loader worker's death is also held to the next fetch: torch's SIGCHLD handler would raise it wherever
    the main process is, in the middle of a step, where this rank can no longer tell the others.
    """
    batches, deaths, distributed = iter(loader), [], get_world_size() > 1
    hold = distributed and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGCHLD, lambda signum, frame: deaths.append(signum)) if hold else None
    try:
        while True:
            try:
                if deaths:  # raises what torch's handler would have: "DataLoader worker (pid N) is killed by ..."
                    deaths.clear()
                    torch.utils.data._utils.signal_handling._error_if_any_worker_fails()
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:
                if not distributed:
                    raise
                yield None, exc
                return
            yield batch, None
    finally:
        if hold:
            signal.signal(signal.SIGCHLD, previous)
