"""The tool runner every tool shares: one-line errors with exit code 2, Ctrl-C / SIGTERM exit codes (DESIGN §8).

`run_tool(main)` runs a tool's `main(argv)`: a `UserError`, a config error or a missing file prints
`error: <one line>` on stderr and exits 2 (a traceback only with `--debug`); a `RunError` (a full disk, a loader
worker killed) prints its line and exits 1; Ctrl-C exits 130 and SIGTERM 143, after the run has saved what it had
(`detect.train.lifecycle` catches `KeyboardInterrupt`, writes `last.pt`, and re-raises). The signal machinery is
`detect.train.signals`, the one-line failures `detect.train.failures`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from omegaconf.errors import OmegaConfBaseException

from backbones.errors import RunError, UserError
from detect.train.failures import error_message, loader_failure, memory_advice, one_line, os_failure
from detect.train.signals import install_signal_handlers, reset_signals, restore_signal_handlers, terminated

# `--imports` of the tools that read a checkpoint (predict, export): the plugin modules the user names; a checkpoint's
# own list is never imported (`detect.checkpoints.consent_to_plugins`).
IMPORTS_OPTION: dict[str, Any] = {
    "nargs": "+",
    "default": [],
    "metavar": "MODULE",
    "help": "plugin modules the weights need (your own parts); never taken from the file",
}

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")  # `detect.precision.CHOICES`, without importing torch here


def inference_precision(precision: str | None, bf16: bool, default: str | None = "fp32") -> str | None:
    """`--precision` of predict / val_det, with the older `--bf16` flag meaning `--precision bf16`; both given and
    different is one line. Neither: `default` (val_det: None, the checkpoint's training precision)."""
    if bf16 and precision not in (None, "bf16"):
        raise UserError(f"--bf16 and --precision {precision} disagree: give one of them")
    return "bf16" if bf16 else precision or default


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
    reset_signals()
    show_plugdet_logs()
    previous = install_signal_handlers()
    try:
        code = main(argv)
    except (UserError, OmegaConfBaseException, FileNotFoundError) as exc:
        if debug:
            traceback.print_exc()
        if not _others_report(exc):
            print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2
    except RunError as exc:
        if debug:
            traceback.print_exc()
        if not _others_report(exc):
            print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        message = loader_failure(exc) or os_failure(exc)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        advice = f"; {memory_advice()}" if message.startswith("loader worker") else ""
        print(f"error: {message}{advice}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        by_sigterm = terminated()
        if not _others_report(exc):
            print("stopped by SIGTERM" if by_sigterm else "interrupted", file=sys.stderr)
        return 143 if by_sigterm else 130
    finally:
        restore_signal_handlers(previous)
    return 0 if code is None else int(code)


def exit_process(code: int) -> NoReturn:
    """End a tool's process with `code` (what `run_tool` returned) without the interpreter's teardown.

    Python's shutdown then frees every module and object one by one; with torch, torchvision and a trained model
    loaded that took 1-2 s of a short run's wall time on the project's CPU (bench/bench_phases.py, "process exit"),
    and buys nothing: the tools write every file inside `with` blocks or by atomic rename, and close their writers.
    What shutdown would still do that matters runs here first, in its order: threading's exit calls (an idle
    `ThreadPoolExecutor` that a library left open is told to stop) and the non-daemon threads are joined, the
    atexit handlers run (logging's flush, multiprocessing's worker clean-up, the process group's destruction), the
    standard streams are flushed. Only the `python tools/X.py` entry points call it; in-process callers of
    `run_tool` (tests, the API) keep their interpreter.
    """
    threading._shutdown()  # the interpreter's own first step: threading's atexit calls, then the non-daemon joins
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to deliver
            stream.flush()
    os._exit(code)
