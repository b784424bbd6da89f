"""Devices and torchrun: process-group set-up, rank-0 helpers, SyncBN, DDP wrapping and metric all-reduce (DESIGN §7).

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

from backbones.errors import RunError, UserError
from detect.train.failures import failure_line
from detect.train.signals import check_interrupt, leaving, pending_interrupt, raise_agreed_interrupt

# How long a collective waits for a rank that neither answers nor closes its connection (hung, or its node gone):
# `train.ddp_timeout`, in minutes. 5 minutes is far more than the ranks of a healthy run ever wait for each other in a
# collective (a step's skew, a loader stall), yet a hung rank costs minutes, not torch's default half hour. Rank 0's
# evaluation and files are not under it (`main_alone`), so it needs no room for a big data set's evaluation.
DEFAULT_TIMEOUT_MIN = 5.0
BEAT_S = 1.0  # rank 0's beat while it works alone, and how often the others look at it
LOST_ROLL_CALL_S = 5.0  # after a closed connection every survivor knows at once: a short roll call finds the lost
HUNG_ROLL_CALL_S = 30.0  # after a timeout the survivors time out within a step's skew of each other (or the timeout)
ENDED = "its process ended (killed, out of memory, or crashed; the launcher's log names its exit code)"
_group = {"timeout": timedelta(minutes=DEFAULT_TIMEOUT_MIN), "generation": 0, "serial": 0}


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
        _group["timeout"] = timedelta(minutes=timeout_min)
        dist.init_process_group(backend=backend, timeout=_group["timeout"])
        _group["generation"], _group["serial"] = _group["generation"] + 1, 0  # keys of this group on the store
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
                _wait_for_key(f"{_prefix()}ended", _group["timeout"].total_seconds())
    dist.destroy_process_group()


def _destroy_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            _store().set(f"{_prefix()}ended", "1")
        dist.destroy_process_group()


def _store() -> Any:
    """The process group's key-value store (torchrun's own, which outlives any rank): what must not wait in a
    collective goes through it."""
    return dist.distributed_c10d._get_default_store()


def _prefix() -> str:
    return f"plugdet/{_group['generation']}/"


def _wait_for_key(key: str, seconds: float) -> bool:
    """Whether `key` appeared on the store within `seconds` (False also when the store is gone)."""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(Exception):
        while not _store().check([key]):
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


def _group_failure(exc: BaseException) -> str | None:
    """ "closed" when a collective failed because a peer's connection closed, "timeout" when a peer did not answer
    within the group's timeout, else None (not a failure of the group, or a single process)."""
    text = str(exc)
    if get_world_size() == 1 or not isinstance(exc, RuntimeError):
        return None
    if not (isinstance(exc, dist.DistError) or any(word in text for word in ("gloo", "NCCL", "c10d", "pair closure"))):
        return None
    return "timeout" if "timed out" in text.lower() or "timeout" in text.lower() else "closed"


def _roll_call(saw: str) -> tuple[list[int], bool] | None:
    """Which ranks are gone: every survivor marks itself present on the group's store, with what it saw ("closed" or
    "timeout"), and looks for the others' marks; a rank other than 0 stops looking once rank 0 is there (rank 0
    reports). Returns the ranks not present and whether any survivor saw a timeout (a hung rank rather than a dead
    one); None if the store cannot be reached."""
    world, rank, prefix = get_world_size(), get_rank(), f"{_prefix()}roll/"
    seconds = LOST_ROLL_CALL_S if saw == "closed" else min(HUNG_ROLL_CALL_S, _group["timeout"].total_seconds())
    deadline, missing, seen = time.monotonic() + seconds, set(range(world)) - {rank}, [saw]
    try:
        store = _store()
        store.set(prefix + str(rank), saw)
        while missing and time.monotonic() < deadline and not (rank != 0 and 0 not in missing):
            for other in sorted(missing):
                if store.check([prefix + str(other)]):
                    missing.discard(other)
                    seen.append(store.get(prefix + str(other)).decode())
            time.sleep(0.1)
    except Exception:
        return None
    return sorted(missing), "timeout" in seen


def _lost_peer(exc: BaseException) -> tuple[str, list[int] | None] | None:
    """What a collective that failed because another rank is gone or hung says about it ("lost rank 1: ...",
    "rank 1 did not answer within 5 min ..."), with the ranks found missing (None: not known), else None."""
    saw = _group_failure(exc)
    if saw is None:
        return None
    world, rank = get_world_size(), get_rank()
    called = ([1 - rank], saw == "timeout") if world == 2 else _roll_call(saw)
    missing, hung = called if called is not None else (None, saw == "timeout")
    who = f"rank {', '.join(map(str, missing))}" if missing else "another rank"  # not known: no store to call on
    if hung:
        minutes = f"{_group['timeout'].total_seconds() / 60:g}"
        return f"{who} did not answer within {minutes} min (train.ddp_timeout: hung, or its machine is gone)", missing
    return f"lost {who}: {ENDED}", missing


def _reporting(error: BaseException, missing: list[int] | None) -> BaseException:
    """Mark which survivor prints `error`: rank 0, else (rank 0 lost) the lowest rank still there."""
    rank = get_rank()
    if missing is None:  # unknown: as before the roll call, rank 1 of two reports a lost rank 0
        error.rank0_reports = not (get_world_size() == 2 and rank == 1)
        error.rank0_lost = not error.rank0_reports
        return error
    present = [r for r in range(get_world_size()) if r not in missing]
    error.rank0_lost = 0 in missing
    error.rank0_reports = rank == 0 or rank != present[0]  # run_tool prints it on rank 0 only; True silences others
    return error


def group_stop_error(exc: BaseException, survivor: str, memory_advice: str = "") -> Exception | None:
    """The error a training tool raises when the DDP group stopped for one rank's fault: a batch that failed to
    load there (`agree`), a fault of rank 0 working alone (`main_alone`), or a rank that is gone or hung; None for any
    other error (and in a single process).

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
    leaving()  # torchrun's SIGTERM to the ranks still running must not cut this message short
    lost = _lost_peer(exc)
    if lost is None:
        return None
    return _reporting(RunError(f"{lost[0]}; {survivor}"), lost[1])


# ----------------------------------------------------------------------------------------------------------------------
# Set-up and rank 0's work alone: a fault on any rank stops all of them; nobody waits in a collective for rank 0's work
# ----------------------------------------------------------------------------------------------------------------------
class _Beat:
    """While rank 0 works alone: a thread that counts up key `key` on the store every `BEAT_S` seconds (the other
    ranks wait as long as it moves: rank 0's process is alive)."""

    def __init__(self, key: str) -> None:
        self.key, self.done = key, threading.Event()
        self.thread = threading.Thread(target=self._run, name="plugdet-beat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # a store gone: the others find out by themselves
            while not self.done.wait(BEAT_S):
                _store().add(self.key, 1)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def _wait_for_main(key: str) -> tuple[int, str] | None:
    """On a rank other than 0: wait until rank 0 has published the outcome of its work alone under `key` (None: it
    went well; else its exit code and line); it may take as long as rank 0 beats. Raises a `RunError` naming rank 0
    when its beat stops for `train.ddp_timeout`, or when the store is gone with it."""
    timeout, last, moved = _group["timeout"].total_seconds(), -1, time.monotonic()
    try:
        store = _store()
        while not store.check([key]):
            beat = store.add(f"{key}/beat", 0)
            if beat != last:
                last, moved = beat, time.monotonic()
            elif time.monotonic() - moved > timeout:
                minutes = f"{timeout / 60:g}"
                raise _reporting(RunError(f"rank 0 did not answer within {minutes} min (train.ddp_timeout: hung, or "
                                          "its machine is gone)"), [0])  # fmt: skip
            time.sleep(BEAT_S / 4)
        outcome = store.get(key).decode()
    except RunError:
        raise
    except Exception as exc:
        raise _reporting(RunError(f"lost rank 0: {ENDED}"), [0]) from exc
    if not outcome:
        return None
    code, line = outcome.split("\t", 1)
    return int(code), line


@contextlib.contextmanager
def main_alone(what: str) -> Iterator[None]:
    """A block in which rank 0 works alone (its evaluation and files: `what`, e.g. "evaluating epoch 3"), and which the
    other ranks leave only once rank 0 has: every rank runs the block (the others' part may be empty, or hold
    collectives with rank 0), then they wait for rank 0 on the store, not in a collective, for as long as rank 0's
    beat moves: an evaluation that lasts longer than `train.ddp_timeout` on a big data set is not a hung rank.

    An error rank 0 raises in the block goes on as it is; the other ranks raise a `RunError` (`UserError` for bad
    input) that rank 0 reports (`rank0_reports`, with `rank_fault`, see `group_stop_error`). A single process just
    runs the block.
    """
    if get_world_size() == 1:
        yield
        return
    _group["serial"] += 1
    key = f"{_prefix()}alone/{_group['serial']}"
    if get_rank() != 0:
        yield
        failed = _wait_for_main(key)
        if failed is not None:
            leaving()  # torchrun's SIGTERM must not cut rank 0's message short
            code, line = failed
            error = (UserError if code == 2 else RunError)(f"rank 0, {what}: {line}")
            error.rank0_reports, error.rank_fault = True, line
            raise error
        return
    beat = _Beat(f"{key}/beat")
    try:
        yield
    except BaseException as exc:
        beat.stop()
        code, line = failure_line(exc) if isinstance(exc, Exception) else (1, "stopped by a signal")
        with contextlib.suppress(Exception):
            _store().set(key, f"{code}\t{line}")
        raise
    beat.stop()
    _store().set(key, "")


@contextlib.contextmanager
def setup_step(what: str, alone: bool = False) -> Iterator[None]:
    """One step of a run's set-up (`what`, e.g. "building the datasets"), run by every rank; a fault on any rank
    stops all of them at the step's end with the same error, "rank 2, during set-up (building the datasets): <its
    line>" (`UserError` for bad input, exit code 2, else `RunError`), which rank 0 alone prints: no rank goes on to
    the next step's collectives, where it would wait for one that stopped. `alone`: rank 0's work alone (the synthetic
    data, the run folder), which the others wait for as `main_alone` does. A rank that does not come to the step's
    agreement within `train.ddp_timeout` is named as not answering. A single process raises its error as it is.
    """
    if get_world_size() == 1:
        yield
        return
    where = f"during set-up ({what})"
    if alone:
        try:
            with main_alone(where):
                yield
        except Exception as exc:
            if getattr(exc, "rank_fault", None) is not None or getattr(exc, "rank0_lost", False):
                raise  # said by rank 0 (another rank), or rank 0 is gone
            code, line = failure_line(exc)
            raise _agreed_stop(0, [], code, line, where) from exc
        return
    failure = None
    try:
        yield
    except Exception as exc:
        failure = exc
    world, rank = get_world_size(), get_rank()
    flags = torch.zeros(world, dtype=torch.float64)  # [ranks]: 1 where the step failed
    flags[rank] = float(failure is not None)
    try:
        all_reduce_sum(flags)
    except Exception as exc:
        leaving()
        lost = _lost_peer(exc)
        if lost is None:
            raise
        raise _reporting(RunError(f"{lost[0]}, {where}"), lost[1]) from exc
    failed = [r for r in range(world) if flags[r]]
    if failed:
        code, line = broadcast_object(failure_line(failure) if rank == failed[0] else None, src=failed[0])
        raise _agreed_stop(failed[0], failed[1:], code, line, where) from failure


def _agreed_stop(rank: int, also: list[int], code: int, line: str, where: str) -> Exception:
    """The error every rank raises when the set-up stops for rank `rank`'s fault (and `also`'s); rank 0 prints it."""
    leaving()  # torchrun's SIGTERM to the ranks still running must not cut rank 0's message short
    more = f" (rank {', '.join(map(str, also))} as well)" if also else ""
    who = "every rank" if len(also) + 1 == get_world_size() > 1 else f"rank {rank}{more}"  # the same fault on each
    error = (UserError if code == 2 else RunError)(f"{who}, {where}: {line}")
    error.rank0_reports = True
    return error
