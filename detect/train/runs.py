"""Run directories: a fresh folder per run (never overwriting another), `results.csv` and the resolved config.

A run writes everything under one folder (DESIGN §6): `config.yaml` (resolved), `results.csv` (one row per epoch),
curves, checkpoints. `make_run_dir("runs/cls/default")` returns that folder if it is new or empty, else
`runs/cls/default-2`, `-3`, ...; a resumed run reuses its own folder and `ResultsCSV.truncate` drops the rows written
after the checkpoint it resumes from.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from backbones.checkpoint import atomic_write_bytes
from backbones.errors import RunError, UserError
from detect.cli import loader_failure
from detect.config import config_to_yaml
from detect.train.distributed import DistInfo, barrier, broadcast_object

# Folders `make_run_dir` created in this process, by run directory: what `discard_run_dir` may remove again.
_CREATED: dict[Path, list[Path]] = {}


def _is_free(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def make_run_dir(output_dir: str | Path) -> Path:
    """Create the run directory: `output_dir` if absent or empty, else the first free `output_dir-2`, `-3`, ...

    Args:
        output_dir: the wanted folder, e.g. "runs/cls/default".

    Returns:
        The created (empty) folder.

    Raises:
        UserError: the location is not a folder or cannot be written.
    """
    wanted = Path(output_dir)
    candidate, suffix = wanted, 1
    while not _is_free(candidate):
        suffix += 1
        candidate = wanted.with_name(f"{wanted.name}-{suffix}")
    missing = _missing_folders(candidate.absolute())
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=candidate):
            pass
    except OSError as exc:
        raise UserError(f"cannot create run directory {candidate} (output_dir): {exc.strerror or exc}") from None
    _CREATED[candidate.absolute()] = missing
    return candidate


def discard_run_dir(run_dir: str | Path) -> bool:
    """Remove a run directory this process created when the run failed before leaving anything to keep.

    Only a folder made by `make_run_dir` in this process goes (never a resumed run's, never one the user had), and
    only while it holds no `last.pt`: a run that finished an epoch, or saved one when interrupted, keeps everything.
    The parent folders `make_run_dir` created go too when they are left empty. Returns True when it was removed.
    """
    run_dir = Path(run_dir).absolute()
    created = _CREATED.get(run_dir)
    if created is None or (run_dir / "last.pt").exists():
        return False
    _CREATED.pop(run_dir)
    if run_dir in created:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:  # an empty folder the user had: leave it as it was, empty
        for child in run_dir.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    for folder in created:
        if folder != run_dir and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return not run_dir.exists() or not any(run_dir.iterdir())


def require_run_dir(run_dir: Path) -> None:
    """Stop the run with a `RunError` when its folder vanished (deleted, unmounted) mid-run: writing on would quietly
    start a new, empty folder under the same name."""
    if not run_dir.is_dir():
        raise RunError(f"the run directory {run_dir} vanished during the run; nothing more can be saved there")


def survivor_note(run_dir: Path, saved: tuple[int, int] | None) -> str:
    """What a failed or interrupted run leaves to continue from: "<run>/last.pt (epoch 3, batch 0) survived:
    continue with train.resume=<run>/last.pt", or that none was written."""
    last = run_dir / "last.pt"
    if saved is None:
        return "no last.pt was written (the run stopped before its first epoch ended)"
    epoch, batch = saved
    where = f"after epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
    if not last.is_file():
        return f"{last} ({where}) is gone with its folder"
    return f"{last} ({where}) survived: continue with train.resume={last}"


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the hidden `.<name>.<random>.tmp` files `atomic_open` leaves behind when its process dies mid-write.

    A kill -9 or a power cut during a checkpoint write leaves the old checkpoint intact beside such a file; nothing
    reads it, so a resumed run (the folder's only writer) removes them. Returns the removed paths.
    """
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def ensure_synthetic_data(root: str, is_default: bool, info: DistInfo) -> None:
    """Rank 0 generates the synthetic mini-CUB in `root` when the default data root is asked for (`is_default`) and
    absent, so the tools' no-argument runs work on a bare checkout; every rank waits for it."""
    if info.is_main and is_default and not Path(root).exists():
        from detect.data.synth import make_synth_cub

        print(f"generating the synthetic mini-CUB in {root} ...", flush=True)
        make_synth_cub(root)
    barrier()


def prepare_run(cfg: DictConfig, resuming: bool, info: DistInfo) -> Path:
    """Rank 0 picks the run directory and writes config.yaml; every rank gets its path.

    A new run gets `make_run_dir(cfg.output_dir)`; a resumed run keeps the folder of `cfg.train.resume`, cleared of
    the temporary files an earlier, killed run may have left. Call it once data, model and weights have been checked,
    so that bad input leaves no run directory behind.
    """
    run_dir = None
    if info.is_main:
        run_dir = Path(cfg.train.resume).parent if resuming else make_run_dir(cfg.output_dir)
        if resuming:
            remove_stale_temporaries(run_dir)
        save_config(cfg, run_dir)
    barrier()
    return Path(broadcast_object(str(run_dir)))


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def save_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write the resolved config as `<run_dir>/config.yaml` (atomically) and return its path."""
    path = Path(run_dir) / "config.yaml"
    _atomic_write_text(path, config_to_yaml(cfg))
    return path


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class ResultsCSV:
    """`results.csv`: one row per epoch, the header written once from the first row's keys.

    Args:
        path: the CSV file (created on the first `append`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, str]]:
        """All rows as dicts of strings ([] if there is no file yet)."""
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def append(self, row: Mapping[str, Any]) -> None:
        """Add a row (floats written with 6 significant digits); its keys must match the header.

        The whole file is rewritten atomically (a few kB): a full disk leaves the previous rows, never half a row.
        """
        exists = self.path.is_file() and self.path.stat().st_size > 0
        text = ""
        if exists:
            with self.path.open(newline="") as handle:
                text = handle.read()
        if exists:
            header = next(csv.reader(io.StringIO(text)), [])
            if header != list(row):
                raise ValueError(f"{self.path}: row keys {list(row)} differ from the header {header}")
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        if not exists:
            writer.writerow(list(row))
        writer.writerow([_format(value) for value in row.values()])
        atomic_write_bytes((text + buffer.getvalue()).encode("utf-8"), self.path)

    def truncate(self, last_epoch: int, key: str = "epoch") -> None:
        """Keep only rows whose `key` column is <= last_epoch (rows of epochs after a resumed checkpoint go)."""
        if not self.path.is_file():
            return
        with self.path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            rows = [row for row in reader if int(float(row[key])) <= last_epoch]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
        _atomic_write_text(self.path, buffer.getvalue())


def _workers(loader: Any) -> list[Any]:
    """A DataLoader's worker processes, in worker order ([] without workers or before they start)."""
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    return [w for w in workers if getattr(w, "pid", None) is not None]


def describe_stop(exc: BaseException, loaders: Sequence[Any]) -> str | None:
    """One line for a run stopped by its surroundings: a file that could not be written (`OutputError`), a vanished
    run directory (`RunError`), or a DataLoader worker of one of `loaders` that was killed or raised; None for any
    other error."""
    if isinstance(exc, RunError):  # OutputError, a vanished run directory
        return str(exc)
    workers = [w for loader in loaders for w in _workers(loader)]
    exit_codes = {w.pid: w.exitcode for w in workers}  # reading exitcode reaps a dead worker
    return loader_failure(exc, [w.pid for w in workers] or None, exit_codes)


def stopped_run_error(exc: BaseException, loaders: Sequence[Any], run_dir: Path, saved: tuple[int, int] | None,
                      memory_advice: str) -> RunError | None:  # fmt: skip
    """The `RunError` a training tool raises for `describe_stop`'s cases: what happened, which last.pt survived and
    how to resume, and (for a loader worker) what uses less memory; None for any other error."""
    message = describe_stop(exc, loaders)
    if message is None:
        return None
    advice = f"; {memory_advice}" if message.startswith("loader worker") else ""
    return RunError(f"{message}; {survivor_note(run_dir, saved)}{advice}")
