"""What every tool shares: one-line errors with exit code 2, Ctrl-C / SIGTERM handling (DESIGN §8).

`run_tool(main)` runs a tool's `main(argv)`: a `UserError`, a config error or a missing file prints
`error: <one line>` on stderr and exits 2 (a traceback only with `--debug`); Ctrl-C exits 130 and SIGTERM 143, after
the tool has saved what it had (training catches `KeyboardInterrupt`, writes `last.pt`, and re-raises).

`deferred_interrupts()` holds Ctrl-C / SIGTERM back until the block ends or the code reaches `check_interrupt()`, so
a training step (forward, backward, optimizer step, EMA update) or a checkpoint write is never cut in half and the
`last.pt` written after the interrupt is consistent. Pressing Ctrl-C twice stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from backbones.errors import UserError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # signals turned into KeyboardInterrupt, latest last (SIGTERM -> exit 143)
_pending: list[int] = []  # signals recorded inside `deferred_interrupts`, not raised yet
_depth = [0]  # nesting of `deferred_interrupts`


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a `train_one_epoch`, raised between steps, with the position reached.

    Attributes:
        epoch: the epoch in progress (0-based).
        batch: batches of that epoch completed (the next one to run on resume).
        sums: this process's running sums of the epoch so far, for its results row (classification: [loss * n,
            correct, n]; detection: {"parts": {name: sum}, "batches": n}).
    """

    def __init__(self, epoch: int, batch: int, sums: Any) -> None:
        super().__init__(f"interrupted at epoch {epoch + 1}, batch {batch}")
        self.epoch = epoch
        self.batch = batch
        self.sums = sums


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """Signal handler: SIGINT and SIGTERM both become KeyboardInterrupt, so one code path saves `last.pt`."""
    _received.append(signum)
    raise KeyboardInterrupt(_name(signum))


def _record_interrupt(signum: int, frame: FrameType | None) -> None:
    """Signal handler inside `deferred_interrupts`: remember the first signal; a second one stops at once."""
    if _pending:
        _received.append(signum)
        raise KeyboardInterrupt(_name(signum))
    _pending.append(signum)


def install_signal_handlers() -> dict[int, object]:
    """Make SIGTERM (and SIGINT) raise KeyboardInterrupt in the main thread; returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in _SIGNALS:
        signal.signal(signum, _raise_interrupt)
    return previous


def check_interrupt() -> None:
    """Raise KeyboardInterrupt here if a Ctrl-C / SIGTERM was held back by `deferred_interrupts` (a safe point)."""
    if _pending:
        signum = _pending.pop()
        _pending.clear()
        _received.append(signum)
        raise KeyboardInterrupt(_name(signum))


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM back inside the block: they raise KeyboardInterrupt at its end or at a
    `check_interrupt()` call, never in the middle of a step or a file write. A second signal raises at once.

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


def run_tool(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run `main(argv)` the way every tool does and return the process exit code.

    Args:
        main: the tool's entry point; it receives argv without `--debug` and returns an exit code or None (= 0).
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        0 (or main's own code) on success, 2 on bad input (`UserError`, a config error, a missing file; one line
        `error: ...` on stderr, the traceback only with `--debug`), 130 on Ctrl-C, 143 on SIGTERM.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    _received.clear()
    _pending.clear()
    show_plugdet_logs()
    previous = install_signal_handlers()
    try:
        code = main(argv)
    except (UserError, OmegaConfBaseException, FileNotFoundError) as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        terminated = bool(_received) and _received[-1] == signal.SIGTERM
        print("stopped by SIGTERM" if terminated else "interrupted", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if code is None else int(code)
