"""The sweep's cells, where each one lives on disk, which shard runs it, and what a finished one recorded.

A cell is one detection run: (backbone, head, initialisation, seed). Cells are numbered in a fixed order (backbone,
then head, then init, then seed: the order of the sweep config's lists), and cell i belongs to shard i % N of
`--cell K --of N`, so independent processes or nodes agree on the split without talking to each other.

Every path is fixed by the cell alone (`SweepLayout`), never chosen at run time: a tool that finds its output_dir
taken writes to `output_dir-2`, so the runner hands it a folder that does not exist (a fresh run) or resumes the one
that does. A cell is finished when its folder holds `sweep_cell.json` (written atomically after train_det exited 0):
a re-run skips it, and deleting a cell's folder runs it again.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backbones.errors import UserError

CELL_DONE = "sweep_cell.json"  # in a cell's train_det run directory
CLS_DONE = "sweep_pretrain.json"  # in a backbone's train_cls run directory


def slug(name: str) -> str:
    """A part name as a folder name: `tv:resnet18` -> `tv_resnet18`."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


@dataclass(frozen=True)
class Cell:
    """One detection run of the sweep.

    Attributes:
        index: its place in the sweep's fixed order (0-based); shard `index % N` runs it.
        backbone, head, init, seed: what it crosses (`head` is the head entry's name).
    """

    index: int
    backbone: str
    head: str
    init: str
    seed: int

    @property
    def name(self) -> str:
        """`cspdarknet_n__yolov8__pretrained__seed0`: its folder and log name."""
        return f"{slug(self.backbone)}__{slug(self.head)}__{self.init}__seed{self.seed}"

    def describe(self) -> str:
        """`cspdarknet_n / yolov8 / pretrained / seed 0`, for the progress line."""
        return f"{self.backbone} / {self.head} / {self.init} / seed {self.seed}"


def make_cells(
    backbones: Sequence[str], heads: Sequence[str], inits: Sequence[str], seeds: Sequence[int]
) -> list[Cell]:
    """Every cell of the sweep, in the fixed order that numbers them."""
    combos = [(b, h, i, s) for b in backbones for h in heads for i in inits for s in seeds]
    return [Cell(k, b, h, i, int(s)) for k, (b, h, i, s) in enumerate(combos)]


def shard(cells: Sequence[Cell], k: int, n: int) -> list[Cell]:
    """The cells shard `k` of `n` runs: those whose index % n == k (every cell in exactly one shard)."""
    if n < 1 or not 0 <= k < n:
        raise UserError(f"--cell {k} --of {n}: need N >= 1 and K in 0..N-1")
    return [cell for cell in cells if cell.index % n == k]


@dataclass(frozen=True)
class SweepLayout:
    """Where everything of a sweep lives, under its output_dir.

    cells/<cell>/            train_det run directory (+ sweep_cell.json when finished)
    cls/<backbone>/          train_cls run directory (+ sweep_pretrain.json when finished), shared by its cells
    imagenet/<backbone>/     backbone.pt made from the sweep config's imagenet file
    logs/<cell>.log          the tools' output, one file per cell (cls__<backbone>.log per pretraining)
    locks/                   lock files through which shards take turns (a backbone's pretraining, a cell, the
                             report), and report.json: which cells' records the report was last written from
    sweep.yaml, sweep.csv, sweep.md, ap_vs_latency.png, transfer_gain.png
    """

    root: Path

    def cell_dir(self, cell: Cell) -> Path:
        return self.root / "cells" / cell.name

    def cell_log(self, cell: Cell) -> Path:
        return self.root / "logs" / f"{cell.name}.log"

    def cls_dir(self, backbone: str) -> Path:
        return self.root / "cls" / slug(backbone)

    def cls_log(self, backbone: str) -> Path:
        return self.root / "logs" / f"cls__{slug(backbone)}.log"

    def imagenet_weights(self, backbone: str) -> Path:
        return self.root / "imagenet" / slug(backbone) / "backbone.pt"

    def lock(self, name: str) -> Path:
        return self.root / "locks" / f"{slug(name)}.lock"

    def report_stamp(self) -> Path:
        return self.root / "locks" / "report.json"


def read_marker(path: Path) -> dict[str, Any] | None:
    """A finished marker's content, or None when there is none (or a half-written one from an older writer)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(path: Path, data: dict[str, Any]) -> None:
    """Atomically (temp file + os.replace): a reader never sees half a marker; NaN is stored as null."""
    from backbones.checkpoint import atomic_write_bytes

    plain = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}
    atomic_write_bytes(json.dumps(plain, indent=1).encode("utf-8"), path)


def cell_result(run_dir: Path) -> dict[str, Any]:
    """What a finished train_det run directory says about its cell: the final epoch's COCO numbers (from last.pt,
    as train_det evaluated them with pycocotools), the best epoch's AP, its training time and settings."""
    from backbones.checkpoint import load_checkpoint
    from detect.eval.coco import stat_names
    from detect.train.runs import ResultsCSV

    last = load_checkpoint(run_dir / "last.pt")
    metrics, config, state = last.get("metrics") or {}, last.get("config") or {}, last.get("train_state") or {}
    if "coco_stats" not in metrics:
        raise UserError(f"{run_dir / 'last.pt'} holds no final evaluation: the run did not finish")
    caps = (1, 10, int(config.get("eval", {}).get("coco_max_dets", 100)))
    rows = ResultsCSV(run_dir / "results.csv").read()
    best = state.get("best") or {}
    return {
        **dict(zip(stat_names(caps), (float(v) for v in metrics["coco_stats"]), strict=True)),
        "best_AP": float(best.get("AP", metrics["AP"])),
        "best_epoch": int(best.get("epoch", last.get("epoch", 0))),
        "epochs": int(last.get("epoch", 0)),
        "train_s": sum(float(row.get("time_s") or 0.0) for row in rows),
        # training throughput: the median of the epochs' img/s (the first epoch pays for warm-up)
        "train_img_per_s": statistics.median(float(row["img_per_s"]) for row in rows) if rows else None,
        "img_size": int(config.get("data", {}).get("img_size", 0)),
    }
