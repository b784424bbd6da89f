"""Training run directories: `results.csv`, the resolved config, and what survives a stopped run (the folders
themselves are `detect.rundirs`).

A run writes everything under one folder (DESIGN §6): `config.yaml` (resolved), `results.csv` (one row per epoch),
curves, checkpoints. `make_run_dir("runs/cls/default")` returns that folder if it is new or empty, else
`runs/cls/default-2`, `-3`, ...; a resumed run reuses its own folder and `ResultsCSV.truncate` drops the rows written
after the checkpoint it resumes from.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from backbones.checkpoint import atomic_write_bytes
from backbones.errors import RunError
from detect.config import config_to_yaml
from detect.rundirs import make_run_dir, remove_stale_temporaries
from detect.train.distributed import DistInfo, broadcast_object
from detect.train.failures import loader_failure
from detect.train.group_faults import setup_step


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


def ensure_synthetic_data(root: str, is_default: bool, info: DistInfo) -> None:
    """Rank 0 generates the synthetic mini-CUB in `root` when the default data root is asked for (`is_default`) and
    absent, so the tools' no-argument runs work on a bare checkout; every rank waits for it (beyond
    `train.ddp_timeout`: while rank 0 works, `setup_step(alone=True)`), and a fault stops every rank."""
    with setup_step("generating the synthetic mini-CUB", alone=True):
        if info.is_main and is_default and not Path(root).exists():
            from detect.data.synth import make_synth_cub

            print(f"generating the synthetic mini-CUB in {root} ...", flush=True)
            make_synth_cub(root)


def prepare_run(cfg: DictConfig, resuming: bool, info: DistInfo) -> Path:
    """Rank 0 picks the run directory and writes config.yaml; every rank gets its path.

    A new run gets `make_run_dir(cfg.output_dir)`; a resumed run keeps the folder of `cfg.train.resume`, cleared of
    the temporary files an earlier, killed run may have left. Call it once data, model and weights have been checked,
    so that bad input leaves no run directory behind. Under DDP the other ranks wait for rank 0 outside any collective,
    and a fault of rank 0 here (a folder it cannot write) stops every rank with one line (`setup_step`).
    """
    run_dir = None
    with setup_step("creating the run folder", alone=True):
        if info.is_main:
            run_dir = Path(cfg.train.resume).parent if resuming else make_run_dir(cfg.output_dir)
            if resuming:
                remove_stale_temporaries(run_dir)
            save_config(cfg, run_dir)
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
