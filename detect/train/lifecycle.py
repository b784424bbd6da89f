"""The one run lifecycle that detection training and backbone pretraining share (DESIGN §8).

`execute(run)` runs the epochs of a built run (`detect.train.detection.DetRun`, `detect.train.classification.ClsRun`)
and owns everything around them: Ctrl-C / SIGTERM save last.pt at the exact position reached and say how to continue;
a third signal stops at once and says that last.pt was not updated; a full disk, a dead loader worker or a lost DDP
rank (dead, or hung for `train.ddp_timeout`) is one `RunError` line naming it and the last.pt that survived (with the
memory advice for a loader worker); a run folder that never reached a last.pt is removed; a finished run prints its
`done:` line. Under DDP every rank stops at the same step, whichever rank the signal or the fault reached
(`group_faults.agree`), and rank 0 alone speaks; the other ranks wait for rank 0's evaluation outside the timeout
(`group_faults.main_alone`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from backbones.checkpoint import atomic_save
from detect.rundirs import discard_run_dir
from detect.train.distributed import DistInfo, cleanup_distributed, init_distributed
from detect.train.group_faults import agree, group_stop_error, main_alone
from detect.train.runs import stopped_run_error, survivor_note
from detect.train.seeding import seed_everything
from detect.train.signals import (
    ForcedStop,
    TrainingInterrupted,
    deferred_interrupts,
    interrupts_for_group,
    shielded_from_signals,
    signals_received,
)
from detect.train.state import ResumeState

PHASES_ENV = "PLUGDET_PHASES"


def phase(name: str) -> None:
    """With PLUGDET_PHASES=1 in the environment, one stderr line `plugdet-phase <unix time> <name>` saying that the
    run reached `name`: where a short run's seconds go (bench/bench_phases.py reads them against its launch time).
    Off by default: one environment lookup."""
    if os.environ.get(PHASES_ENV) == "1":
        print(f"plugdet-phase {time.time():.6f} {name}", file=sys.stderr, flush=True)


def mark_first_batch(loader: Any, name: str) -> Any:
    """`loader` itself, or with PLUGDET_PHASES=1 a view of it that marks `phase(name)` when its first batch arrives
    (the loader workers' start-up is the time from the epoch's start to that mark)."""
    return _FirstBatchMarked(loader, name) if os.environ.get(PHASES_ENV) == "1" else loader


class _FirstBatchMarked:
    def __init__(self, loader: Any, name: str) -> None:
        self.loader, self.name = loader, name

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, key: str) -> Any:
        return getattr(self.loader, key)

    def __iter__(self) -> Any:
        for index, batch in enumerate(self.loader):
            if index == 0:
                phase(self.name)
            yield batch


class TrainingRun(Protocol):
    """What `execute` needs of a built run; the family's own module builds it and knows its files."""

    info: DistInfo
    run_dir: Path
    epochs: int
    state: ResumeState
    saved: tuple[int, int] | None  # the position last.pt holds (None: no last.pt yet)
    memory_advice: str

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch from `state.position` (raises `TrainingInterrupted` with the position reached)."""
        ...

    def end_epoch(self, epoch: int, stats: dict[str, float], start: float) -> None:
        """Evaluate, write the epoch's files and last.pt (rank 0), print the epoch's line; advance `state.position`."""
        ...

    def last_checkpoint(self, at_boundary: bool) -> dict[str, Any]:
        """What last.pt holds now (`at_boundary`: after a whole epoch's evaluation)."""
        ...

    def watched_loaders(self) -> list[Any]:
        """The loaders whose dead workers a stop is explained by."""
        ...

    def done_line(self) -> str:
        """The finished run's last line (`done: ...`)."""
        ...

    def close(self) -> None:
        """Close what the run holds open (TensorBoard's file)."""
        ...


def start(cfg: Any, ckpt: dict | None, build: Callable[[Any, dict | None, DistInfo], TrainingRun]) -> TrainingRun:
    """The process's side of a run's start: join the process group (torchrun), set the torch threads and the seed,
    then `build(cfg, ckpt, info)`; after a set-up fault every rank agreed on, rank 0 ends first (it says why)."""
    info = init_distributed(cfg.train.device, cfg.train.ddp_timeout)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    try:
        return build(cfg, ckpt, info)
    except BaseException as stop:
        cleanup_distributed(stop)
        raise


def execute(run: TrainingRun) -> None:
    """The epochs from the resume position, with every stop handled (see the module docstring); the process group
    is cleaned up after (after a DDP stop, rank 0 ends first)."""
    try:
        with interrupts_for_group(run.info.distributed):
            _guarded_epochs(run)
    except BaseException as stop:
        run.close()
        cleanup_distributed(stop)
        if run.info.is_main:
            discard_run_dir(run.run_dir)  # only a new run that never reached a last.pt
        raise
    with shielded_from_signals():  # a signal now only comes after the work: the last lines still print
        run.close()
        cleanup_distributed()
        if run.info.is_main:
            print(run.done_line(), flush=True)
            if signals_received():
                print("(the stop signal came after the last epoch was saved: the run is complete, nothing lost)",
                      file=sys.stderr)  # fmt: skip


def _guarded_epochs(run: TrainingRun) -> None:
    """The epoch loop; Ctrl-C / SIGTERM act at safe points only (after a step, a val batch, an epoch's files)."""
    try:
        with deferred_interrupts():
            for epoch in range(run.state.position[0], run.epochs):
                start = time.perf_counter()
                stats = run.train_epoch(epoch)
                # Evaluation, results.csv and checkpoints of an epoch finish together: a Ctrl-C / SIGTERM waits for
                # last.pt (a second one too; a third stops at once), so a resume never misses an epoch's row.
                with deferred_interrupts():
                    # DDP: the other ranks wait for rank 0's evaluation and files on the store, not in a collective:
                    # however long it takes on a big data set, it does not count against train.ddp_timeout
                    with main_alone(f"evaluating epoch {epoch + 1}"):
                        run.end_epoch(epoch, stats, start)
                    agree()  # DDP: a signal held by any rank while rank 0 evaluated stops all of them here
                run.saved = run.state.position  # rank 0 wrote it (the other ranks passed `agree` after that)
    except ForcedStop:
        if run.info.is_main:
            print(f"\nstopped at once by a third signal, possibly in the middle of a step: last.pt was not updated; "
                  f"{survivor_note(run.run_dir, run.saved)}", file=sys.stderr)  # fmt: skip
        raise
    except KeyboardInterrupt as stop:
        interrupted = isinstance(stop, TrainingInterrupted)
        if run.state.position[0] >= run.epochs and not interrupted:
            return  # the signal came after the last epoch's last.pt: the run is complete, nothing to save again
        if interrupted:
            run.state.position, run.state.sums = (stop.epoch, stop.batch), stop.sums
        if run.info.is_main:
            save_interrupted(run, not interrupted, getattr(stop, "origin", ""))
        raise
    except Exception as exc:
        note = survivor_note(run.run_dir, run.saved)
        error = group_stop_error(exc, note, run.memory_advice) or stopped_run_error(
            exc, run.watched_loaders(), run.run_dir, run.saved, run.memory_advice
        )
        if error is None:
            raise
        raise error from exc


def save_interrupted(run: TrainingRun, at_boundary: bool, origin: str = "") -> None:
    """Rank 0 after Ctrl-C / SIGTERM (under DDP: `origin`, the rank that received which): last.pt at the position
    reached, written whatever further signals arrive, and how to continue."""
    last = run.run_dir / "last.pt"
    with shielded_from_signals():
        atomic_save(run.last_checkpoint(at_boundary), last)
        run.saved = run.state.position
    epoch, batch = run.state.position
    where = f"after epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
    by = f" by {origin}" if origin else ""
    print(f"\ninterrupted{by}: saved {last} ({where}); continue with train.resume={last}", file=sys.stderr)
