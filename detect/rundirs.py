"""Run folders that training, validation and prediction share: a fresh folder per run (never overwriting another),
removed again when the run fails before leaving anything to keep.

`make_run_dir("runs/cls/default")` returns that folder if it is new or empty, else `runs/cls/default-2`, `-3`, ...
A folder the user named explicitly (`predict.py --out X`, `val_det.py --out X`, `Model.val(out=X)`) is never renamed:
`make_run_dir(X, exact="--out")` uses X if it is absent or empty and refuses it in one line otherwise, so the results
land where the user looks. `discarded_on_failure(run_dir)` removes a folder that a failed or interrupted
validation / prediction left empty.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from backbones.errors import RunError, UserError

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


def make_run_dir(output_dir: str | Path, exact: str | None = None) -> Path:
    """Create the run directory: `output_dir` if absent or empty, else the first free `output_dir-2`, `-3`, ...

    Args:
        output_dir: the wanted folder, e.g. "runs/cls/default".
        exact: the option that named `output_dir` explicitly (e.g. "--out"): then that folder or none, never a
            numbered neighbour (results written to `X-2` while the user looks in `X` would look lost).

    Returns:
        The created (empty) folder.

    Raises:
        UserError: the location is not a folder or cannot be written, or (`exact`) it exists and is not empty.
    """
    wanted = Path(output_dir)
    if exact is not None and not _is_free(wanted):
        what = "is not empty" if wanted.is_dir() else "is a file"
        raise UserError(f"output folder {wanted} ({exact}) already exists and {what}: choose another folder or "
                        "remove it")  # fmt: skip
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


@contextlib.contextmanager
def discarded_on_failure(run_dir: Path) -> Iterator[Path]:
    """Run the block that fills `run_dir`; when it raises (bad input, Ctrl-C) before writing a file, `discard_run_dir`
    removes the empty folder again, so a failed validation or prediction leaves nothing behind. A folder holding
    results (a prediction interrupted after some images) is kept as it is."""
    try:
        yield run_dir
    except BaseException:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            discard_run_dir(run_dir)
        raise


def require_run_dir(run_dir: Path) -> None:
    """Stop the run with a `RunError` when its folder vanished (deleted, unmounted) mid-run: writing on would quietly
    start a new, empty folder under the same name."""
    if not run_dir.is_dir():
        raise RunError(f"the run directory {run_dir} vanished during the run; nothing more can be saved there")


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the hidden `.<name>.<random>.tmp` files `atomic_open` leaves behind when its process dies mid-write.

    A kill -9 or a power cut during a checkpoint write leaves the old checkpoint intact beside such a file; nothing
    reads it, so a resumed run (the folder's only writer) removes them. Returns the removed paths.
    """
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
