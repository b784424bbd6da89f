"""Locks between the shards of a sweep, and the tools they run: `fcntl.flock` on files in OUTPUT/locks/.

Shards share nothing but the output folder, so they take turns through lock files in it: one per backbone's
pretraining (`cls__<backbone>`), one per cell (`cell__<cell>`), one for the report and one for generating the default
data. The kernel (or the NFS server) drops a lock when its holder dies, however it dies, so a killed shard never
leaves a stale one.

A lock the sweep holds while it starts a tool is held by the tool too: the tool inherits the locked file descriptor
(`held_fds()`, given to `subprocess.Popen(pass_fds=...)`), and flock keeps the lock until every descriptor of it is
closed. So when a shard is killed by SIGKILL, its cell's or pretraining's lock stays taken until the tool it ran
(stopped by SIGTERM, see `runner._stop_with_parent`) has saved its last.pt and exited, and a shard started again
resumes from that last.pt instead of running beside the dying tool in the same folder.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from backbones.errors import UserError

_held: dict[int, Path] = {}  # file descriptor -> lock file, for every lock this process holds now


@contextlib.contextmanager
def file_lock(path: Path, wait: bool) -> Iterator[IO[str] | None]:
    """An exclusive lock on `path` (created if needed) for the block; yields the locked file, or None when `wait` is
    False and another process holds it.

    Raises:
        UserError: the file system refuses locks (NFS mounted with `nolock`, Lustre without `-o flock`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        except OSError as exc:
            raise UserError(f"cannot lock {path} ({exc.strerror or exc}): the sweep's shards take turns through "
                            "file locks in its output_dir; put output_dir on a file system with working flock (local "
                            "disk, NFS with lock support, Lustre mounted with -o flock)") from None  # fmt: skip
        _held[handle.fileno()] = path
        try:
            yield handle
        finally:
            del _held[handle.fileno()]
            fcntl.flock(handle, fcntl.LOCK_UN)


def held_fds() -> tuple[int, ...]:
    """The file descriptors of the locks this process holds now (a tool started meanwhile inherits them)."""
    return tuple(_held)
