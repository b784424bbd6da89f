"""Devices and torchrun: process-group set-up, rank-0 helpers, SyncBN, DDP wrapping and metric all-reduce (DESIGN §7).

Under `torchrun --nproc_per_node=N tools/train_*.py ...` the environment holds RANK, LOCAL_RANK and WORLD_SIZE;
`init_distributed` joins the group (gloo on CPU; on CUDA, NCCL for CUDA tensors and gloo for the small CPU ones the
loops exchange). Without them everything here degrades to the single process case, so training code calls the same
functions either way. Only rank 0 writes files and shows progress.

A fault on one rank stops every rank at the same step, and rank 0 alone says which rank and what (issue 12): a batch
that fails to load or a Ctrl-C / SIGTERM is announced at the next `agree` (one small all-reduce per step), and a rank
that died is noticed by the others' next collective (a closed connection; a hung rank after `GROUP_TIMEOUT`), which
`group_stop_error` turns into one line naming the lost rank.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from backbones.errors import RunError, UserError
from detect.train.failures import failure_line
from detect.train.signals import check_interrupt, leaving, pending_interrupt, raise_agreed_interrupt

# How long a collective waits for a rank that neither answers nor closes its connection (hung, or its node gone). It
# must outlast rank 0's evaluation, which the other ranks wait through.
GROUP_TIMEOUT = timedelta(minutes=30)


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


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA), else a single process.

    Args:
        device_name: as for `select_device`.

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
        dist.init_process_group(backend=backend, timeout=GROUP_TIMEOUT)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed(stop: BaseException | None = None) -> None:
    """Leave the process group (if any).

    After a stop every rank agreed on (`stop` marked `rank0_reports`), rank 0 leaves it by exiting and the other ranks
    wait for that first: torchrun ends the remaining processes as soon as one has ended, so rank 0, which saves last.pt
    and says why the run stopped, must be the first to end (the wait is bounded by `GROUP_TIMEOUT`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if stop is not None and getattr(stop, "rank0_reports", False) and get_world_size() > 1:
        if get_rank() == 0:  # the other ranks wait for its connections to close: once it has said why it stopped
            atexit.register(_destroy_group)
            return
        with contextlib.suppress(Exception):  # raised once rank 0's connection closes
            dist.recv(torch.zeros(1), src=0)
    dist.destroy_process_group()


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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


def agree(failure: BaseException | None = None, where: str = "") -> None:
    """Every rank's go or stop before a step: a rank whose batch failed to load, or that holds a Ctrl-C / SIGTERM,
    stops all of them here, at the same step.

    Under DDP one all-reduce of [failed, held signal] per rank tells every rank about every other, then all raise
    together: the first failing rank's error (its line sent to all, so that rank 0 can say it; exit code 2 for bad
    input, else 1), or `AgreedInterrupt` (exit code 130, or 143 for SIGTERM). A rank that stopped alone would leave the
    others waiting in their next collective. In a single process the failure is raised as it is and a held signal
    at once (`check_interrupt`). Call it inside the whole run's `cli.interrupts_for_group`.

    Args:
        failure: what fetching this rank's batch raised (`fetch`), or None.
        where: the position for the message, e.g. "epoch 2, batch 3".
    """
    world, rank = get_world_size(), get_rank()
    if world == 1:
        if failure is not None:
            raise failure
        check_interrupt()
        return
    status = torch.zeros(world, 2, dtype=torch.float64)  # [ranks, (failed, number of the held signal)]
    status[rank, 0], status[rank, 1] = float(failure is not None), float(pending_interrupt())
    all_reduce_sum(status)
    failed = [r for r in range(world) if status[r, 0]]
    signalled = [r for r in range(world) if status[r, 1]]
    if failed or signalled:
        leaving()  # torchrun's SIGTERM to the ranks still running must not cut rank 0's save or message short
    if failed:
        code, line = broadcast_object(failure_line(failure) if rank == failed[0] else None, src=failed[0])
        also = f" (rank {', '.join(map(str, failed[1:]))} as well)" if failed[1:] else ""
        error = (UserError if code == 2 else RunError)(f"rank {failed[0]}{also}, loading {where}: {line}")
        error.rank0_reports, error.rank_fault = True, line  # every rank raises it; run_tool prints it on rank 0 only
        raise error from failure
    if signalled:  # Ctrl-C in a terminal, or torchrun passing on its SIGTERM, reaches every rank
        ranks = "every rank" if len(signalled) == world else f"rank {', '.join(map(str, signalled))}"
        raise_agreed_interrupt(int(status[signalled[0], 1]), ranks)


def _lost_peer(exc: BaseException) -> str | None:
    """What a collective that failed because another rank is gone says about it ("lost rank 1 ..."), else None."""
    text = str(exc)
    if get_world_size() == 1 or not isinstance(exc, RuntimeError):
        return None
    if not (isinstance(exc, dist.DistError) or any(word in text for word in ("gloo", "NCCL", "c10d"))):
        return None
    who = f"rank {1 - get_rank()}" if get_world_size() == 2 else "another rank"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"{who} did not answer for {GROUP_TIMEOUT.total_seconds() / 60:.0f} min (hung, or its machine is gone)"
    return f"lost {who}: its process ended (killed, out of memory, or crashed; the launcher's log names its exit code)"


def group_stop_error(exc: BaseException, survivor: str, memory_advice: str = "") -> Exception | None:
    """The error a training tool raises when the DDP group stopped for one rank's fault: a batch that failed to
    load there (`agree`), or a rank that is gone; None for any other error (and in a single process).

    Args:
        exc: what the training loop raised.
        survivor: which last.pt survived and how to resume (`runs.survivor_note`).
        memory_advice: added when a loader worker failed (what uses less memory).

    Returns:
        An error of `exc`'s kind (`UserError` for bad data, else `RunError`) saying what, where, on which rank, and
        `survivor`; rank 0 alone prints it (`rank0_reports`) unless rank 0 is the one lost.
    """
    fault = getattr(exc, "rank_fault", None)
    if fault is not None:
        advice = f"; {memory_advice}" if memory_advice and fault.startswith("loader worker") else ""
        error = type(exc)(f"{exc}; {survivor}{advice}")
        error.rank0_reports = True
        return error
    lost = _lost_peer(exc)
    if lost is None:
        return None
    leaving()  # torchrun's SIGTERM to the ranks still running must not cut this message short
    error = RunError(f"{lost}; {survivor}")
    error.rank0_reports = not (get_world_size() == 2 and get_rank() == 1)  # rank 1 reports a lost rank 0
    return error
