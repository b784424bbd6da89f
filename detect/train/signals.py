"""Ctrl-C / SIGTERM during a training run: held back to safe points, agreed on by every DDP process (DESIGN §8).

`deferred_interrupts()` holds Ctrl-C / SIGTERM back until the block ends or the code reaches `check_interrupt()`, so
a training step (forward, backward, optimizer step, EMA update) or a checkpoint write is never cut in half and the
`last.pt` written after the interrupt is consistent. A second signal is held too (two Ctrl-C in a row still save);
a third one stops at once (`ForcedStop`), and the run then says plainly that `last.pt` was not updated.
`shielded_from_signals()` covers the save after an interrupt: signals that arrive while it writes only count.

Under DDP one process must never stop alone: the others would wait for it in their next collective. Inside
`interrupts_for_group()` a held signal is not raised at a safe point of its own process but only where every process
agrees (`detect.train.group_faults.agree`), which raises `AgreedInterrupt` in all of them at the same step. Once the
processes have agreed to stop, or one of them is gone, `leaving()` makes further signals (the launcher's SIGTERM to
the remaining processes) harmless, so rank 0 finishes its save and its message.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # signals turned into KeyboardInterrupt, latest last (SIGTERM -> exit 143)
_pending: list[int] = []  # signals recorded inside `deferred_interrupts`, not raised yet
_depth = [0]  # nesting of `deferred_interrupts`
_group = [False]  # inside `interrupts_for_group`: held signals wait for all processes to agree
_leaving = [False]  # after `leaving()`: Ctrl-C / SIGTERM are ignored


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a `train_one_epoch`, raised between steps, with the position reached.

    Attributes:
        epoch: the epoch in progress (0-based).
        batch: batches of that epoch completed (the next one to run on resume).
        sums: this process's running sums of the epoch so far, for its results row (classification: [loss * n,
            correct, n]; detection: {"parts": {name: sum}, "batches": n}).
    """

    def __init__(self, epoch: int, batch: int, sums: Any, origin: str = "") -> None:
        super().__init__(f"interrupted at epoch {epoch + 1}, batch {batch}")
        self.epoch = epoch
        self.batch = batch
        self.sums = sums
        self.origin = origin  # under DDP: which rank received which signal ("SIGINT on rank 1"); sums are all ranks'
        self.rank0_reports = bool(origin)


class AgreedInterrupt(KeyboardInterrupt):
    """Ctrl-C / SIGTERM that stops every DDP process at the same step (`detect.train.group_faults.agree`);
    `origin` names the rank that received it and the signal, e.g. "SIGINT on rank 1"."""

    rank0_reports = True  # every process raises it: only rank 0 says so

    def __init__(self, origin: str) -> None:
        super().__init__(origin)
        self.origin = origin


class ForcedStop(KeyboardInterrupt):
    """A third Ctrl-C / SIGTERM inside `deferred_interrupts`: raised at once, possibly in the middle of a step, so the
    training state may be half-updated and must not be saved."""


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """Signal handler: SIGINT and SIGTERM both become KeyboardInterrupt, so one code path saves `last.pt`."""
    if _leaving[0]:
        return
    _received.append(signum)
    raise KeyboardInterrupt(_name(signum))


def _record_interrupt(signum: int, frame: FrameType | None) -> None:
    """Signal handler inside `deferred_interrupts`: remember the signal; the third one in a row stops at once."""
    if _leaving[0]:
        return
    _pending.append(signum)
    if len(_pending) >= 3:
        _pending.clear()
        _received.append(signum)
        raise ForcedStop(_name(signum))


def _note_signal(signum: int, frame: FrameType | None) -> None:
    """Signal handler inside `shielded_from_signals`: the signal only counts for the exit code."""
    if not _leaving[0]:
        _received.append(signum)


@contextlib.contextmanager
def shielded_from_signals() -> Iterator[None]:
    """Run the block to its end whatever Ctrl-C / SIGTERM arrive (they only decide the exit code): the save of
    `last.pt` after an interrupt, the last lines of a finished run. Outside the main thread this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in _SIGNALS:
        signal.signal(signum, _note_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signals_received() -> list[int]:
    """The Ctrl-C / SIGTERM signals this tool run has received so far (oldest first)."""
    return list(_received)


def check_interrupt() -> None:
    """Raise KeyboardInterrupt here if a Ctrl-C / SIGTERM was held back by `deferred_interrupts` (a safe point).

    Inside `interrupts_for_group` this does nothing: there only `agree` may stop the process."""
    if _pending and not _group[0]:
        signum = _pending.pop()
        _pending.clear()
        _received.append(signum)
        raise KeyboardInterrupt(_name(signum))


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM back inside the block: they raise KeyboardInterrupt at its end or at a
    `check_interrupt()` call, never in the middle of a step or a file write. A second signal is held as well; the
    third raises `ForcedStop` at once.

    Blocks nest (a training loop, and each step inside it). Outside the main thread this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth[0] == 0:
        _pending.clear()
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in _SIGNALS:
        signal.signal(signum, _record_interrupt)
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    check_interrupt()


def pending_interrupt() -> int:
    """The number of the latest Ctrl-C / SIGTERM held back and not acted on yet (0: none)."""
    return _pending[-1] if _pending else 0


def raise_agreed_interrupt(signum: int, origin: str) -> None:
    """Stop this process at the point all DDP processes agreed on, for `signum` received by `origin`'s rank (this
    process may have received none: its exit code still follows that signal, 143 for SIGTERM)."""
    _pending.clear()
    _received.append(signum)
    raise AgreedInterrupt(f"{_name(signum)} on {origin}")


@contextlib.contextmanager
def interrupts_for_group(enabled: bool = True) -> Iterator[None]:
    """Under DDP (`enabled`): hold Ctrl-C / SIGTERM for the whole block, to be acted on only where every process
    agrees (`detect.train.group_faults.agree`): a process that stopped alone would leave the others waiting in a
    collective. A third signal still stops this process at once (`ForcedStop`); one that arrives after the last
    agreement only counts (the note that the run had already ended). Without `enabled`, nothing changes."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    with deferred_interrupts():
        previous, _group[0] = _group[0], True
        try:
            yield
        finally:
            _group[0] = previous
            _received.extend(_pending[-1:])
            _pending.clear()


def leaving() -> None:
    """From now on, Ctrl-C / SIGTERM are ignored, to the end of the process: the DDP processes agreed to stop, or one
    of them is gone, and torchrun then sends SIGTERM to the remaining ones; it must not cut short rank 0's save of
    last.pt, its one line about what happened, or its exit code (kill -9 still stops a process at once)."""
    _leaving[0] = True


def reset_signals() -> None:
    """Forget the signals of an earlier run in this process (a tool run, an API call)."""
    _received.clear()
    _pending.clear()
    _leaving[0] = False


def install_signal_handlers() -> dict[int, object]:
    """Make SIGTERM (and SIGINT) raise KeyboardInterrupt in the main thread; returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in _SIGNALS:
        signal.signal(signum, _raise_interrupt)
    return previous


def restore_signal_handlers(previous: dict[int, object]) -> None:
    """Put back the handlers `install_signal_handlers` replaced (after `leaving()`: ignored until the process ends)."""
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_IGN if _leaving[0] else handler)


def terminated() -> bool:
    """Whether the latest signal received was SIGTERM (exit code 143 rather than 130)."""
    return bool(_received) and _received[-1] == signal.SIGTERM
