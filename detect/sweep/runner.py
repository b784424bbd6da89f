"""Running a shard of the sweep: each cell is `tools/train_det.py` in a subprocess, in its fixed folder.

Per cell (`run_cell`): a cell with `sweep_cell.json` is finished and skipped; a folder with `last.pt` was stopped
(Ctrl-C, SIGTERM, a killed node) and resumes with `train.resume=<folder>/last.pt`, exactly where it stopped (a run
that had finished its epochs resumes into nothing and just exits); a folder without `last.pt` died in its first
epoch, holds nothing worth keeping, and is deleted and started again. The tools never see an existing output_dir
(they would write to `output_dir-2`).

Pretraining is one `tools/train_cls.py` run per backbone (`cls/<backbone>/`), shared by every cell of that backbone
and run by the first shard that needs it. Two shards needing the same backbone serialise on a lock file
(`locks/cls__<backbone>.lock`, `fcntl.flock`): the first trains, the second runs its other cells meanwhile and waits
only when nothing else is left, then reuses the result. A cell runs under its own lock too (`locks/cell__<cell>.lock`),
so two processes never work in one cell folder. The kernel drops a dead process's lock, so a killed shard never
leaves a stale one (across nodes this needs a file system with working locks: see `detect.sweep.locks`).

The tools' own output goes to `logs/<cell>.log` (appended per attempt); the sweep prints one line per cell, and on a
failure the log's path and its last lines. A Ctrl-C or SIGTERM reaching the sweep is passed to the running tool,
which saves its last.pt; the sweep waits for it, then stops (a re-run continues). On Linux a tool also gets SIGTERM
when the sweep dies by kill -9, so no orphaned training keeps writing into a cell; it holds the cell's lock until it
has saved its last.pt and exited, so a shard started again at once waits for it, then resumes from that last.pt.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backbones.errors import UserError
from detect.sweep.cells import CELL_DONE, CLS_DONE, Cell, cell_result, read_marker, write_marker
from detect.sweep.locks import file_lock, held_fds
from detect.sweep.plan import (
    SweepPlan,
    cell_record,
    cls_command,
    det_command,
    planned_weights,
    settings_changed,
)
from detect.train.signals import shielded_from_signals, signals_received


def ensure_default_data(plan: SweepPlan, roots: set[str]) -> None:
    """Generate the synthetic mini-CUB once, under a lock, when a run reads its default root and it is absent (the
    tools would each generate it, and two shards starting at once would write it together)."""
    from detect.config.schema import DetDataConfig

    default = DetDataConfig.root
    if default not in roots or Path(default).exists():
        return
    with file_lock(plan.layout.lock("data"), wait=True):
        if not Path(default).exists():
            from detect.data.synth import make_synth_cub

            print(f"[sweep] generating the synthetic mini-CUB in {default} ...", flush=True)
            make_synth_cub(default)


class StepFailed(Exception):
    """A tool run of the sweep exited with an error; the message names the log and quotes its tail."""


def format_duration(seconds: float) -> str:
    """45s, 2m10s, 1h05m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def log_tail(log: Path, count: int = 15) -> str:
    """The last `count` non-empty lines of a log (progress bars' carriage returns count as line ends)."""
    try:
        text = log.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(f"    {line[:300]}" for line in lines[-count:])


def _stop_with_parent() -> None:
    """In the tool's process before exec: SIGTERM when the sweep dies, even by kill -9 (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """Run a tool with its output appended to `log`; returns its exit code.

    A Ctrl-C / SIGTERM that stops the sweep meanwhile is passed on to the tool (which saves its last.pt), and the
    sweep waits for the tool to finish before it stops too. The tool inherits the locks the sweep holds (its cell's
    or its pretraining's), so they stay taken until the tool has exited, even if the sweep is killed first.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"\n$ {shlex.join(cmd)}\n")
        handle.flush()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, pass_fds=held_fds(),
                                preexec_fn=_stop_with_parent if sys.platform == "linux" else None)  # fmt: skip
        try:
            return proc.wait()
        except KeyboardInterrupt:
            with shielded_from_signals():
                if proc.poll() is None:
                    proc.send_signal((signals_received() or [signal.SIGINT])[-1])
                proc.wait()
            raise


def run_in(plan: SweepPlan, run_dir: Path, fresh: list[str], tool: str, log: Path) -> tuple[list[str], float]:
    """Run `fresh` into `run_dir`, or resume the run already there (see the module docstring); returns the command
    run and its wall seconds. Raises StepFailed when the tool fails."""
    last = run_dir / "last.pt"
    if last.is_file():
        cmd = plan.tools.command(tool, f"train.resume={last}")
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # stopped before its first epoch ended: nothing in it to keep
        cmd = fresh
    start = time.perf_counter()
    code = run_logged(cmd, log, plan.env())
    if code != 0:
        raise StepFailed(f"{tool}.py exited with code {code}; log {log}:\n{log_tail(log)}")
    return cmd, time.perf_counter() - start


def pretrained_weights(plan: SweepPlan, backbone: str, wait: bool = True) -> Path | None:
    """The backbone.pt train_cls pretrained for `backbone` (pretraining it first, under the backbone's lock); None
    when `wait` is False and another shard is pretraining it right now."""
    run_dir = plan.layout.cls_dir(backbone)
    marker = read_marker(run_dir / CLS_DONE)
    if marker is not None:
        if backbone not in plan.warned and settings_changed(marker, cls_command(plan, backbone)):
            plan.warned.add(backbone)
            print(f"[sweep] warning: the pretraining of {backbone} ({run_dir}) finished with other settings than the "
                  "sweep config gives now; it is reused: delete that folder to pretrain again", flush=True)  # fmt: skip
        return run_dir / "backbone.pt"
    if backbone in plan.failed_pretraining:
        raise StepFailed(f"pretraining {backbone} failed earlier in this sweep; {plan.failed_pretraining[backbone]}")
    lock = plan.layout.lock(f"cls__{backbone}")
    with file_lock(lock, wait=False) as locked:
        if locked:
            return _pretrain(plan, backbone)
    if not wait:
        return None
    print(f"[sweep] waiting for another shard to pretrain {backbone} (lock {lock}) ...", flush=True)
    with file_lock(lock, wait=True):
        return _pretrain(plan, backbone)


def _pretrain(plan: SweepPlan, backbone: str) -> Path:
    """Under the backbone's lock: pretrain (or resume the pretraining) unless another shard has just finished it."""
    run_dir, fresh = plan.layout.cls_dir(backbone), cls_command(plan, backbone)
    if read_marker(run_dir / CLS_DONE):
        return run_dir / "backbone.pt"
    log = plan.layout.cls_log(backbone)
    print(f"[sweep] pretraining {backbone} (tools/train_cls.py -> {run_dir}) ...", end="", flush=True)
    try:
        cmd, seconds = run_in(plan, run_dir, fresh, "train_cls", log)
    except StepFailed as exc:
        plan.failed_pretraining[backbone] = f"log {log}"
        print(" failed", flush=True)
        raise StepFailed(f"pretraining {backbone}: {exc}") from None
    from backbones.checkpoint import load_checkpoint

    metrics = load_checkpoint(run_dir / "backbone.pt").get("metrics") or {}
    record = {"backbone": backbone, "top1": metrics.get("top1"), "top5": metrics.get("top5"),
              "best_epoch": metrics.get("epoch"), "wall_s": seconds, "command": cmd, "fresh": fresh[2:]}  # fmt: skip
    write_marker(run_dir / CLS_DONE, record)
    top1 = f", top-1 {metrics['top1']:.3f}" if metrics.get("top1") is not None else ""
    print(f" done in {format_duration(seconds)}{top1}", flush=True)
    return run_dir / "backbone.pt"


def imagenet_weights(plan: SweepPlan, backbone: str) -> Path:
    """A backbone.pt made once from the sweep config's `imagenet.<backbone>` file, which any loader of the backbone
    factory accepts (a torchvision state dict with its classifier keys, a backbone.pt); train_det loads it strictly."""
    out = plan.layout.imagenet_weights(backbone)
    if out.is_file():
        return out
    from backbones.checkpoint import load_backbone_weights, save_backbone
    from backbones.registry import build_backbone

    source = str(plan.cfg.imagenet[backbone])
    try:
        body = build_backbone(backbone, weights=source)  # the factory's own loader (drops e.g. torchvision's fc.*)
    except TypeError:  # a factory without a `weights` argument: the file must hold the backbone's own keys
        body = build_backbone(backbone)
        load_backbone_weights(body, source, arch=backbone)
    save_backbone(out, body, backbone, {}, {}, {"imagenet": source})
    return out


def weights_ready(plan: SweepPlan, cell: Cell) -> bool:
    """Whether the cell can start now without waiting for another shard's pretraining."""
    if cell.init != "pretrained" or read_marker(plan.layout.cls_dir(cell.backbone) / CLS_DONE):
        return True
    with file_lock(plan.layout.lock(f"cls__{cell.backbone}"), wait=False) as free:
        return free is not None


def initial_weights(plan: SweepPlan, cell: Cell) -> tuple[Path | None, float | None]:
    """The cell's `model.backbone_weights` (None: scratch) and the cls top-1 of that backbone.pt (pretrained only)."""
    if cell.init == "scratch":
        return None, None
    if cell.init == "imagenet":
        return imagenet_weights(plan, cell.backbone), None
    path = pretrained_weights(plan, cell.backbone)
    marker = read_marker(path.parent / CLS_DONE) or {}
    return path, marker.get("top1")


def run_cell(plan: SweepPlan, cell: Cell, weights: Path | None, cls_top1: float | None) -> dict[str, Any]:
    """Train (or resume) the cell's detector under the cell's lock and record its result in `sweep_cell.json`;
    returns that record.

    The lock is busy while another process works in the cell's folder: the tool of a killed shard still saving its
    last.pt (it holds the lock until it exits), or a second shard given the same cell. The cell waits for it, then
    resumes what it left, or takes the record it wrote.
    """
    lock = plan.layout.lock(f"cell__{cell.name}")
    with file_lock(lock, wait=False) as held:
        if held is not None:
            return _train_cell(plan, cell, weights, cls_top1)
    print(f" (waiting: another process holds {lock}) ...", end="", flush=True)
    with file_lock(lock, wait=True):
        return _train_cell(plan, cell, weights, cls_top1)


def _train_cell(plan: SweepPlan, cell: Cell, weights: Path | None, cls_top1: float | None) -> dict[str, Any]:
    """Under the cell's lock: train or resume it unless it finished meanwhile; returns its record."""
    finished = cell_record(plan, cell)
    if finished is not None:
        return finished
    run_dir, fresh = plan.layout.cell_dir(cell), det_command(plan, cell, weights)
    cmd, seconds = run_in(plan, run_dir, fresh, "train_det", plan.layout.cell_log(cell))
    if not (run_dir / "best.pt").is_file():
        raise StepFailed(f"train_det.py left no best.pt in {run_dir}; log {plan.layout.cell_log(cell)}")
    record = {"cell": cell.index, "backbone": cell.backbone, "head": cell.head, "init": cell.init, "seed": cell.seed,
              **cell_result(run_dir), "cls_top1": cls_top1, "backbone_weights": str(weights or ""),
              "run_dir": str(run_dir), "wall_s": seconds, "command": cmd, "fresh": fresh[2:]}  # fmt: skip
    write_marker(run_dir / CELL_DONE, record)
    return record


class Progress:
    """The sweep's one progress line per cell: position, what it crosses, its time and AP, and the ETA."""

    def __init__(self, cells: Sequence[Cell], total: int, shard: tuple[int, int]) -> None:
        self.position = {cell.index: k + 1 for k, cell in enumerate(cells)}
        self.count, self.total, self.shard = len(cells), total, shard
        self.start, self.ran, self.remaining = time.perf_counter(), 0, 0

    def label(self, cell: Cell) -> str:
        k, n = self.shard
        where = f" ({self.position[cell.index]}/{self.count} of shard {k} of {n})" if n > 1 else ""
        return f"[sweep] cell {cell.index + 1}/{self.total}{where} {cell.describe()}"

    def finished(self) -> str:
        """`eta 18m`: the time per cell run so far (pretraining included) times the cells left."""
        self.ran += 1
        self.remaining -= 1
        if self.remaining <= 0:
            return "shard done" if self.shard[1] > 1 else "last cell"
        per_cell = (time.perf_counter() - self.start) / self.ran
        return f"eta {format_duration(per_cell * self.remaining)}"


def run_cells(plan: SweepPlan, cells: Sequence[Cell], shard: tuple[int, int] = (0, 1)) -> list[tuple[Cell, str]]:
    """Run every unfinished cell of `cells` (finished ones are skipped); returns the failed cells with why.

    Cells whose pretraining another shard holds are postponed while other cells can run.
    """
    progress = Progress(cells, len(plan.cells), shard)
    pending = []
    for cell in cells:
        record = cell_record(plan, cell)
        if record is None:
            pending.append(cell)
            continue
        changed = settings_changed(record, det_command(plan, cell, planned_weights(plan, cell)))
        note = "; it ran with other settings than the sweep config gives now: delete its folder to run it again"
        note = note if changed else ""
        print(f"{progress.label(cell)}: finished earlier, AP {record['AP']:.3f} (skipped{note})", flush=True)
    progress.remaining, progress.start, failed = len(pending), time.perf_counter(), []
    while pending:
        cell = next((c for c in pending if weights_ready(plan, c)), pending[0])
        pending.remove(cell)
        started = False
        try:
            weights, top1 = initial_weights(plan, cell)
            print(f"{progress.label(cell)} ...", end="", flush=True)
            started = True
            start = time.perf_counter()
            record = run_cell(plan, cell, weights, top1)
            print(f" done in {format_duration(time.perf_counter() - start)}, AP {record['AP']:.3f} "
                  f"({progress.finished()})", flush=True)  # fmt: skip
        except (StepFailed, UserError) as exc:
            progress.finished()
            end_of_line = "\n" if started else ""  # the cell's line was left open for its result
            print(f"{end_of_line}[sweep] cell {cell.index + 1} ({cell.describe()}) failed: {exc}", flush=True)
            failed.append((cell, str(exc).splitlines()[0]))
        except KeyboardInterrupt:
            print(f"\n[sweep] stopped during cell {cell.index + 1} ({cell.describe()}); what it saved is kept: run "
                  "the same command again to continue", file=sys.stderr, flush=True)  # fmt: skip
            raise
    return failed


def run_shard(plan: Any, cfg: Any, heads: Sequence[str], mine: list, shard: tuple[int, int], roots: Any
              ) -> tuple[list, int]:  # fmt: skip
    """A shard's part of a sweep: sweep.yaml, the default data if asked for, its cells; returns (the failed cells
    with why, how many cells of the whole sweep are finished now)."""
    from backbones.checkpoint import atomic_write_bytes
    from detect.config import config_to_yaml
    from detect.sweep.plan import cell_record

    atomic_write_bytes(config_to_yaml(cfg).encode("utf-8"), plan.layout.root / "sweep.yaml")
    where = f"; shard {shard[0]} of {shard[1]}: {len(mine)} of them" if shard[1] > 1 else ""
    print(f"[sweep] {len(plan.cells)} cells ({len(cfg.backbones)} backbones x {len(heads)} heads x "
          f"{len(cfg.init)} inits x {len(cfg.seeds)} seeds){where} -> {plan.layout.root}; tool output in "
          f"{plan.layout.root / 'logs'}", flush=True)  # fmt: skip
    ensure_default_data(plan, roots)
    failed = run_cells(plan, mine, shard)
    if failed:
        print(f"[sweep] {len(failed)} cell(s) failed: " + "; ".join(f"{c.name}: {why}" for c, why in failed),
              file=sys.stderr)  # fmt: skip
    return failed, sum(cell_record(plan, cell) is not None for cell in plan.cells)
