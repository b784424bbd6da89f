"""How the DDP ranks stop together when one fails (issues 12, 17): one small agreement per step (`agree`), one per
set-up step (`setup_step`), rank 0's work alone under a beat instead of the group timeout (`main_alone`), and the
one line that names the lost or hung rank (`group_stop_error`, by a roll call on the group's store). In a single
process everything here is a plain pass-through.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from backbones.errors import RunError, UserError
from detect.train.distributed import (
    BEAT_S,
    GROUP,
    all_reduce_sum,
    broadcast_object,
    get_rank,
    get_world_size,
    group_store,
    store_prefix,
)
from detect.train.failures import failure_line
from detect.train.signals import check_interrupt, leaving, pending_interrupt, raise_agreed_interrupt

LOST_ROLL_CALL_S = 5.0  # after a closed connection every survivor knows at once: a short roll call finds the lost
HUNG_ROLL_CALL_S = 30.0  # after a timeout the survivors time out within a step's skew of each other (or the timeout)
ENDED = "its process ended (killed, out of memory, or crashed; the launcher's log names its exit code)"


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
    world, rank, prefix = get_world_size(), get_rank(), f"{store_prefix()}roll/"
    seconds = LOST_ROLL_CALL_S if saw == "closed" else min(HUNG_ROLL_CALL_S, GROUP["timeout"].total_seconds())
    deadline, missing, seen = time.monotonic() + seconds, set(range(world)) - {rank}, [saw]
    try:
        store = group_store()
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
        minutes = f"{GROUP['timeout'].total_seconds() / 60:g}"
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
                group_store().add(self.key, 1)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def _wait_for_main(key: str) -> tuple[int, str] | None:
    """On a rank other than 0: wait until rank 0 has published the outcome of its work alone under `key` (None: it
    went well; else its exit code and line); it may take as long as rank 0 beats. Raises a `RunError` naming rank 0
    when its beat stops for `train.ddp_timeout`, or when the store is gone with it."""
    timeout, last, moved = GROUP["timeout"].total_seconds(), -1, time.monotonic()
    try:
        store = group_store()
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
    GROUP["serial"] += 1
    key = f"{store_prefix()}alone/{GROUP['serial']}"
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
            group_store().set(key, f"{code}\t{line}")
        raise
    beat.stop()
    group_store().set(key, "")


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
