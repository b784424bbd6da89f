"""Why a run stopped, in one line: bad input (exit 2), the surroundings (exit 1: a full disk, a loader worker that
died) or an unexpected error named by its type; and the memory advice that goes with a dead loader worker."""

from __future__ import annotations

import errno
import re
import signal

from omegaconf.errors import OmegaConfBaseException

from backbones.errors import RunError, UserError


def failure_line(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line `run_tool` would give for `exc`, for a rank whose fault another rank reports:
    2 for bad input, else 1 (an unexpected error is named by its type, and by its sample index where known)."""
    if isinstance(exc, UserError | OmegaConfBaseException | FileNotFoundError):
        return 2, error_message(exc)
    if isinstance(exc, RunError):
        return 1, one_line(exc)
    known = loader_failure(exc) or os_failure(exc)
    if known:
        return 1, known
    notes = [note for note in getattr(exc, "__notes__", []) if note.startswith("(sample index")]
    return 1, " ".join([f"{type(exc).__name__}: {one_line(exc)}", *notes[:1]])


def one_line(exc: BaseException) -> str:
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


def error_message(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    return one_line(exc)


_KILLED = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)|exited unexpectedly)"
)
_CAUGHT = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.")
_SIGNAL_NAMES = {"Killed": "SIGKILL", "Terminated": "SIGTERM", "Segmentation fault": "SIGSEGV", "Aborted": "SIGABRT",
                 "Bus error": "SIGBUS", "Interrupt": "SIGINT"}  # fmt: skip


def memory_advice(cache: bool = False) -> str:
    """What uses less memory when a loader worker was killed; `cache`: the run can also turn off `data.cache`."""
    return "if memory is short, fewer loader processes (train.workers)" + (
        " and data.cache=false use less" if cache else " use less"
    )


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


def os_failure(exc: BaseException) -> str | None:
    """One line for an OS error of the surroundings (disk full, read-only file system, quota), else None."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        cause = (exc.strerror or str(exc)).lower()
        return f"cannot write {exc.filename}: {cause}" if exc.filename else cause
    return None
