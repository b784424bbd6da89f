"""Run directories: a fresh folder per run (never overwriting another), `results.csv` and the resolved config.

A run writes everything under one folder (DESIGN §6): `config.yaml` (resolved), `results.csv` (one row per epoch),
curves, checkpoints. `make_run_dir("runs/cls/default")` returns that folder if it is new or empty, else
`runs/cls/default-2`, `-3`, ...; a resumed run reuses its own folder and `ResultsCSV.truncate` drops the rows written
after the checkpoint it resumes from.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from backbones.checkpoint import atomic_write_bytes
from backbones.errors import UserError
from detect.config import config_to_yaml
from detect.train.distributed import DistInfo, barrier, broadcast_object


def _is_free(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


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
    try:
        candidate.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=candidate):
            pass
    except OSError as exc:
        raise UserError(f"cannot create run directory {candidate} (output_dir): {exc.strerror or exc}") from None
    return candidate


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
        """Add a row (floats written with 6 significant digits); its keys must match the header."""
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists:
            with self.path.open(newline="") as handle:
                header = next(csv.reader(handle), [])
            if header != list(row):
                raise ValueError(f"{self.path}: row keys {list(row)} differ from the header {header}")
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if not exists:
                writer.writerow(list(row))
            writer.writerow([_format(value) for value in row.values()])

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
