"""How much memory this process may still allocate (the host's MemAvailable and its container's cgroup limit), and
the `data.cache` decision that depends on it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from detect.data.detection import DetectionDataset

logger = logging.getLogger("plugdet")


def _read_int(path: Path) -> int | None:
    """The integer a one-line cgroup file holds; None for "max", an absent or unreadable file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_paths(proc: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and v1 memory-controller path, from `<proc>/self/cgroup`."""
    v2 = v1 = None
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def cgroup_memory_left(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's container (cgroup) still lets it allocate: the smallest limit minus usage over its own
    cgroup and the ones above it, v2 (`memory.max`, `memory.current`) or v1 (`memory.limit_in_bytes`,
    `memory.usage_in_bytes`); None without a limit.

    Args:
        proc: the proc file system (a parameter so that tests can fake one).
        cgroup_root: where the cgroup file systems are mounted.
    """
    v2, v1 = _cgroup_paths(proc)
    candidates: list[tuple[Path, str, str]] = []
    for relative, base, limit, usage in ((v2, cgroup_root, "memory.max", "memory.current"),
                                         (v1, cgroup_root / "memory", "memory.limit_in_bytes",
                                          "memory.usage_in_bytes")):  # fmt: skip
        if relative is None:
            continue
        folder = base / relative.lstrip("/")
        while True:  # the process's own cgroup, then each parent up to the mount point (a parent's limit binds too)
            candidates.append((folder, limit, usage))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    left = None
    for folder, limit_name, usage_name in candidates:
        limit = _read_int(folder / limit_name)
        if limit is None or limit >= 1 << 60:  # "max", or v1's "no limit" (a huge page-rounded number)
            continue
        room = max(limit - (_read_int(folder / usage_name) or 0), 0)
        left = room if left is None else min(left, room)
    return left


def available_memory(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory new allocations can get: the smaller of Linux's `MemAvailable` (the host's view) and what the
    container's cgroup limit leaves (`cgroup_memory_left`); None where neither can be read."""
    host = None
    try:
        with open(proc / "meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        host = None
    container = cgroup_memory_left(proc, cgroup_root)
    known = [value for value in (host, container) if value is not None]
    return min(known) if known else None


def cache_train_images(train: DetectionDataset) -> bool:
    """`data.cache=true`: decode the train images into RAM when they fit, else warn and read them from disk.

    They fit when every process on this node (`LOCAL_WORLD_SIZE` under torchrun; each caches the whole set) together
    needs at most half of the available memory, leaving the rest to models, activations and loader workers.
    """
    need = train.cache_bytes() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    free = available_memory()
    if free is not None and need > free // 2:
        logger.warning("data.cache=true: caching %d train images at %d px needs ~%.1f GB on this node, more than half "
                       "of the %.1f GB available; reading them from disk instead (data.cache=false silences this)",
                       len(train), train.img_size, need / 1e9, free / 1e9)  # fmt: skip
        return False
    start = time.perf_counter()
    size = train.cache_images()
    logger.info("cached %d train images in RAM (%.0f MB) in %.1f s (data.cache=true)", len(train), size / 2**20,
                time.perf_counter() - start)  # fmt: skip
    return True
