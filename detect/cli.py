"""What every tool shares: one-line errors with exit code 2, Ctrl-C / SIGTERM handling (DESIGN §8).

`run_tool(main)` runs a tool's `main(argv)`: a `UserError`, a config error or a missing file prints
`error: <one line>` on stderr and exits 2 (a traceback only with `--debug`); a `RunError` (a full disk, a loader
worker killed) prints its line and exits 1; Ctrl-C exits 130 and SIGTERM 143, after the tool has saved what it had
(training catches `KeyboardInterrupt`, writes `last.pt`, and re-raises).

`deferred_interrupts()` holds Ctrl-C / SIGTERM back until the block ends or the code reaches `check_interrupt()`, so
a training step (forward, backward, optimizer step, EMA update) or a checkpoint write is never cut in half and the
`last.pt` written after the interrupt is consistent. A second signal is held too (two Ctrl-C in a row still save);
a third one stops at once (`ForcedStop`), and the tool then says plainly that `last.pt` was not updated.
`shielded_from_signals()` covers the save after an interrupt: signals that arrive while it writes only count.

Under DDP one process must never stop alone: the others would wait for it in their next collective. Inside
`interrupts_for_group()` a held signal is not raised at a safe point of its own process but only where every process
agrees (`detect.train.distributed.agree`), which raises `AgreedInterrupt` in all of them at the same step. Once the
processes have agreed to stop, or one of them is gone, `leaving()` makes further signals (the launcher's SIGTERM to
the remaining processes) harmless, so rank 0 finishes its save and its message.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from backbones.errors import RunError, UserError

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
    """Ctrl-C / SIGTERM that stops every DDP process at the same step (`detect.train.distributed.agree`);
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


def install_signal_handlers() -> dict[int, object]:
    """Make SIGTERM (and SIGINT) raise KeyboardInterrupt in the main thread; returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in _SIGNALS:
        signal.signal(signum, _raise_interrupt)
    return previous


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
    agrees (`detect.train.distributed.agree`): a process that stopped alone would leave the others waiting in a
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


def failure_line(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line `run_tool` would give for `exc`, for a rank whose fault another rank reports:
    2 for bad input, else 1 (an unexpected error is named by its type, and by its sample index where known)."""
    if isinstance(exc, UserError | OmegaConfBaseException | FileNotFoundError):
        return 2, _error_message(exc)
    if isinstance(exc, RunError):
        return 1, _one_line(exc)
    known = loader_failure(exc) or _os_failure(exc)
    if known:
        return 1, known
    notes = [note for note in getattr(exc, "__notes__", []) if note.startswith("(sample index")]
    return 1, " ".join([f"{type(exc).__name__}: {_one_line(exc)}", *notes[:1]])


def _one_line(exc: BaseException) -> str:
    """The message's first line; for an error re-raised by a DataLoader worker, the original error's own line."""
    text = str(exc).strip().splitlines()
    if len(text) > 1 and text[0].startswith("Caught ") and "DataLoader worker" in text[0]:
        # torch re-raises a worker's exception with the worker's traceback as its message; its last unindented line
        # is "<module>.<Class>: <the original message>"
        last = next((line for line in reversed(text) if line and not line[0].isspace()), "")
        name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        if last.startswith(name):
            return last[len(name) :].strip() or type(exc).__name__
    return text[0] if text else type(exc).__name__


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    return _one_line(exc)


_KILLED = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited unexpectedly)"
)
_CAUGHT = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.")
_SIGNAL_NAMES = {"Killed": "SIGKILL", "Terminated": "SIGTERM", "Segmentation fault": "SIGSEGV", "Aborted": "SIGABRT",
                 "Bus error": "SIGBUS", "Interrupt": "SIGINT"}  # fmt: skip
MEMORY_ADVICE = "if memory is short, fewer loader processes (train.workers) use less"


def loader_failure(
    exc: BaseException, worker_pids: list[int] | None = None, exit_codes: dict[int, int | None] | None = None
) -> str | None:
    """One line for a DataLoader worker that died (a signal: kill -9, the out-of-memory killer) or raised, else None.

    Args:
        exc: what the DataLoader raised in the main process.
        worker_pids: the loader's worker pids in worker order, to name the worker a kill message gives by pid.
        exit_codes: the workers' exit codes by pid (negative: the signal), to name the signal torch did not.

    Returns:
        e.g. "loader worker 1 (pid 4242) was killed by signal SIGKILL (Killed: the out-of-memory killer sends it)"
        or "loader worker 0 raised ValueError: bad pixel (sample index 5)"; None for any other error. A `UserError`
        raised in a worker (bad data) is not a loader failure: it stays bad input.
    """
    text = (exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)).strip()  # KeyError: unquoted
    killed = _KILLED.search(text) if isinstance(exc, RuntimeError) else None
    if killed:
        pids = [int(p) for p in killed.group(1).replace(",", " ").split()]
        workers = [f"{worker_pids.index(p)} (pid {p})" if worker_pids and p in worker_pids else f"(pid {p})"
                   for p in pids]  # fmt: skip
        how = killed.group(2)
        signums = [-code for code in ((exit_codes or {}).get(p) for p in pids) if code is not None and code < 0]
        if not how and signums:
            how = signal.strsignal(signums[0]) or signal.Signals(signums[0]).name
        if how:
            name = _SIGNAL_NAMES.get(how.strip(), how.strip())
            cause = f"was killed by signal {name} ({how.strip()}" + (
                ": the out-of-memory killer sends it)" if name == "SIGKILL" else ")"
            )
        else:
            cause = "exited unexpectedly (killed, or crashed)"
        return f"loader worker {', '.join(workers)} {cause}"
    lines = text.splitlines()
    caught = _CAUGHT.match(lines[0]) if lines else None
    if caught is None or isinstance(exc, UserError):
        return None
    name = caught.group(1)
    message = next((line.split(":", 1)[1].strip() for line in reversed(lines)
                    if line[:1].strip() and line.split(":", 1)[0].endswith(name) and ":" in line), "")  # fmt: skip
    sample = next((line.strip() for line in lines if line.strip().startswith("(sample index")), "")
    detail = f"{name}: {message}" if message else name
    return f"loader worker {caught.group(2)} raised {detail}" + (f" {sample}" if sample else "")


def _os_failure(exc: BaseException) -> str | None:
    """One line for an OS error of the surroundings (disk full, read-only file system, quota), else None."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        cause = (exc.strerror or str(exc)).lower()
        return f"cannot write {exc.filename}: {cause}" if exc.filename else cause
    return None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (test harnesses swap it), as plain lines."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def show_plugdet_logs() -> None:
    """Show INFO and above of plugdet's loggers ("plugdet", "plugdet.data") on stderr, once per process.

    Without it Python drops INFO records (what a run caches, which backbone tensors were transferred, what froze);
    other libraries' loggers are left as they are. Records still propagate to the root logger.
    """
    log = logging.getLogger("plugdet")
    if not any(isinstance(handler, _StderrHandler) for handler in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO)


def _others_report(exc: BaseException) -> bool:
    """Whether rank 0 says it instead: every DDP process raised `exc` at the same step (`rank0_reports`), and this
    is not rank 0."""
    return getattr(exc, "rank0_reports", False) and os.environ.get("RANK", "0") != "0"


def run_tool(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run `main(argv)` the way every tool does and return the process exit code.

    Args:
        main: the tool's entry point; it receives argv without `--debug` and returns an exit code or None (= 0).
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        0 (or main's own code) on success, 2 on bad input (`UserError`, a config error, a missing file; one line
        `error: ...` on stderr, the traceback only with `--debug`), 1 when the surroundings stopped the run
        (`RunError`, a DataLoader worker that died or raised, a full disk: one line), 130 on Ctrl-C, 143 on SIGTERM.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    _received.clear()
    _pending.clear()
    _leaving[0] = False
    show_plugdet_logs()
    previous = install_signal_handlers()
    try:
        code = main(argv)
    except (UserError, OmegaConfBaseException, FileNotFoundError) as exc:
        if debug:
            traceback.print_exc()
        if not _others_report(exc):
            print(f"error: {_error_message(exc)}", file=sys.stderr)
        return 2
    except RunError as exc:
        if debug:
            traceback.print_exc()
        if not _others_report(exc):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        message = loader_failure(exc) or _os_failure(exc)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        advice = f"; {MEMORY_ADVICE}" if message.startswith("loader worker") else ""
        print(f"error: {message}{advice}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        terminated = bool(_received) and _received[-1] == signal.SIGTERM
        if not _others_report(exc):
            print("stopped by SIGTERM" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        for signum, handler in previous.items():  # after `leaving()`: ignored until the process has ended
            signal.signal(signum, signal.SIG_IGN if _leaving[0] else handler)
    return 0 if code is None else int(code)
