"""What every tool shares: one-line errors with exit code 2, Ctrl-C / SIGTERM handling (DESIGN §8).

`run_tool(main)` runs a tool's `main(argv)`: a `UserError`, a config error or a missing file prints
`error: <one line>` on stderr and exits 2 (a traceback only with `--debug`); Ctrl-C exits 130 and SIGTERM 143, after
the tool has saved what it had (training catches `KeyboardInterrupt`, writes `last.pt`, and re-raises).

`deferred_interrupts()` holds Ctrl-C / SIGTERM back until a block ends, so a training step (forward, backward,
optimizer step, EMA update) is never cut in half and a checkpoint written after the interrupt is consistent.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from types import FrameType

from omegaconf.errors import OmegaConfBaseException

from backbones.errors import UserError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # signals seen by our handlers, latest last (SIGTERM -> exit 143)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """Signal handler: SIGINT and SIGTERM both become KeyboardInterrupt, so one code path saves `last.pt`."""
    _received.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_signal_handlers() -> dict[int, object]:
    """Make SIGTERM (and SIGINT) raise KeyboardInterrupt in the main thread; returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in _SIGNALS:
        signal.signal(signum, _raise_interrupt)
    return previous


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Delay SIGINT / SIGTERM until the block ends, then raise KeyboardInterrupt (outside the main thread: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    for signum in _SIGNALS:
        signal.signal(signum, record)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if pending:
        _received.append(pending[-1])
        raise KeyboardInterrupt(signal.Signals(pending[-1]).name)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    return _one_line(exc)


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
