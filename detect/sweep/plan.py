"""What a sweep runs: its cells, folders and tools (`SweepPlan`), and the exact tool command of each run.

Kept apart from `detect.sweep.runner` (which starts the tools) so that what a cell would run can be computed, and
compared with what a finished cell did run, without running anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detect.sweep.cells import CELL_DONE, Cell, SweepLayout, make_cells, read_marker
from detect.sweep.config import HeadEntry

OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "YOLO_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Tools:
    """The tool scripts the sweep runs and the interpreter that runs them (`tools/sweep.py` passes its folder)."""

    folder: Path
    python: str = sys.executable

    def command(self, tool: str, *args: str) -> list[str]:
        return [self.python, str(self.folder / f"{tool}.py"), *args]


@dataclass
class SweepPlan:
    """A checked sweep: its config, head entries, every cell, its folders and its tools.

    Attributes:
        failed_pretraining: backbones whose pretraining failed in this process (their cells fail at once).
        warned: backbones whose reused pretraining was said to differ from the config (said once).
    """

    cfg: Any
    heads: dict[str, HeadEntry]
    cells: list[Cell]
    layout: SweepLayout
    tools: Tools
    failed_pretraining: dict[str, str] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def env(self) -> dict[str, str]:
        """The tools' environment: offline, unbuffered, OMP_NUM_THREADS=threads, this plugdet importable."""
        env = {**OFFLINE_ENV, **os.environ}
        if self.cfg.threads:
            env["OMP_NUM_THREADS"] = str(self.cfg.threads)
        repo = str(self.tools.folder.resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
        return env

    def common(self) -> list[str]:
        """Overrides every fresh run gets first (data root) and last (threads, no stray resume)."""
        return [f"data.root={self.cfg.data_root}"] if self.cfg.data_root else []

    def tail(self) -> list[str]:
        return ["train.resume=null", *([f"train.threads={self.cfg.threads}"] if self.cfg.threads else [])]


def make_plan(cfg: Any, heads: Sequence[HeadEntry], tools: Tools) -> SweepPlan:
    """The plan of a config `check_sweep` accepted: every cell in the fixed order, under `cfg.output_dir`."""
    cells = make_cells(list(cfg.backbones), [h.name for h in heads], list(cfg.init), list(cfg.seeds))
    return SweepPlan(cfg, {h.name: h for h in heads}, cells, SweepLayout(Path(cfg.output_dir).absolute()), tools)


def det_command(plan: SweepPlan, cell: Cell, weights: Path | None) -> list[str]:
    """The train_det command of a fresh start of the cell: the head's config, `det.overrides`, the head's overrides,
    then what the cell sets (backbone, head, initial weights, seed, its folder)."""
    entry, cfg, run_dir = plan.heads[cell.head], plan.cfg, plan.layout.cell_dir(cell)
    config = [entry.config] if entry.config else []
    return plan.tools.command("train_det", *config, *plan.common(), *cfg.det.overrides, *entry.overrides,
                              f"model.backbone={cell.backbone}", f"model.head={entry.head}",
                              f"model.backbone_weights={weights if weights is not None else 'null'}",
                              f"seed={cell.seed}", f"output_dir={run_dir}", *plan.tail())  # fmt: skip


def cls_command(plan: SweepPlan, backbone: str) -> list[str]:
    """The train_cls command of a fresh pretraining of `backbone`."""
    cfg = plan.cfg
    config = [cfg.cls.config] if cfg.cls.config else []
    return plan.tools.command("train_cls", *config, *plan.common(), *cfg.cls.overrides, f"model.backbone={backbone}",
                              f"output_dir={plan.layout.cls_dir(backbone)}", *plan.tail())  # fmt: skip


def planned_weights(plan: SweepPlan, cell: Cell) -> Path | None:
    """Where the cell's initial backbone weights are (or will be), without making them."""
    if cell.init == "scratch":
        return None
    if cell.init == "imagenet":
        return plan.layout.imagenet_weights(cell.backbone)
    return plan.layout.cls_dir(cell.backbone) / "backbone.pt"


def settings_changed(record: dict[str, Any], fresh: list[str]) -> bool:
    """Whether a finished run was started with other arguments than the sweep would give it now (the interpreter
    and the tool's path aside: they differ between nodes)."""
    return record.get("fresh") is not None and list(record["fresh"]) != fresh[2:]


def cell_record(plan: SweepPlan, cell: Cell) -> dict[str, Any] | None:
    """A finished cell's record, or None."""
    return read_marker(plan.layout.cell_dir(cell) / CELL_DONE)


def list_cells(plan: SweepPlan, n: int) -> None:
    """One line per cell: index, shard, status, what it crosses, its folder."""
    for cell in plan.cells:
        status = "done" if cell_record(plan, cell) else "pending"
        print(f"{cell.index:4d}  shard {cell.index % n}/{n}  {status:<7}  {cell.describe():<50}  "
              f"{plan.layout.cell_dir(cell)}")  # fmt: skip
