"""The sweep's report, from whatever cells have finished: `sweep.csv`, `sweep.md` and the two pictures.

A row of `sweep.md` is one backbone x head x init over its seeds. AP and AP50 are the mean ± sample standard
deviation over the finished seeds (no sd from one seed). The AP gained from pretraining is paired by seed: for each
seed where both cells finished, the init's AP minus the scratch cell's AP of the same backbone, head and seed; then
mean ± sd of those differences, so that the noise a seed shares between its two cells cancels. Parameters, GFLOPs
and latency are measured once per backbone x head (`detect.sweep.measure`), in the process that writes the report.

`summarise`, `csv_rows` and `markdown` take plain records (the cells' `sweep_cell.json` content) and measurements,
so the arithmetic is tested without training anything.

Shards finishing together: every shard that sees the last cell finished asks for the report (`report_once`), under
the report's lock, and only the first writes it. It then stamps `locks/report.json` with what the report was made
from (the title and a digest of each finished cell's record), and a later asker with the same cells and title finds
the report up to date and writes nothing. The stamp is written after the four files, so a writer killed halfway
leaves no stamp and the next asker writes the report again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detect.sweep.cells import CELL_DONE, Cell, read_marker, write_marker
from detect.sweep.locks import file_lock
from detect.sweep.rows import GroupRow, mean_sd

if TYPE_CHECKING:
    from detect.sweep.plan import SweepPlan

Costs = Mapping[tuple[str, str], Mapping[str, Any]]  # (backbone, head) -> params, gflops, latency_ms, img_size, threads
_FIRST = ["cell", "backbone", "head", "init", "seed", "status"]
_COCO = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
_LAST = ["best_AP", "best_epoch", "epochs", "img_size", "cls_top1", "params", "gflops", "eval_size", "latency_ms",
         "latency_threads", "train_s", "train_img_per_s", "wall_s", "run_dir", "backbone_weights"]  # fmt: skip


def summarise(cells: Sequence[Cell], records: Mapping[int, Mapping[str, Any]], costs: Costs) -> list[GroupRow]:
    """The rows of sweep.md, in the sweep's cell order; `records` maps a finished cell's index to its record."""
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.backbone, cell.head, cell.init), []).append(cell)
    ap_of = {(c.backbone, c.head, c.init, c.seed): float(records[c.index]["AP"]) for c in cells if c.index in records}
    rows = []
    for (backbone, head, init), members in groups.items():
        done = [records[c.index] for c in members if c.index in records]
        gains = [ap_of[(backbone, head, init, c.seed)] - ap_of[(backbone, head, "scratch", c.seed)] for c in members
                 if init != "scratch" and (backbone, head, init, c.seed) in ap_of
                 and (backbone, head, "scratch", c.seed) in ap_of]  # fmt: skip
        top1 = [float(r["cls_top1"]) for r in done if r.get("cls_top1") is not None]
        speed = [float(r["train_img_per_s"]) for r in done if r.get("train_img_per_s") not in (None, "")]
        rows.append(GroupRow(backbone, head, init, len(done), len(members), mean_sd([r["AP"] for r in done]),
                             mean_sd([r["AP50"] for r in done]), mean_sd(gains),
                             statistics.fmean(top1) if top1 else None, costs.get((backbone, head)),
                             statistics.fmean(speed) if speed else None))  # fmt: skip
    return rows


def csv_rows(cells: Sequence[Cell], records: Mapping[int, Mapping[str, Any]], costs: Costs) -> list[dict[str, Any]]:
    """One row per cell, finished or not (status `done` / `pending`), with every number the sweep has for it."""
    rows = []
    for cell in cells:
        record, cost = records.get(cell.index, {}), costs.get((cell.backbone, cell.head)) or {}
        row = {"cell": cell.index, "backbone": cell.backbone, "head": cell.head, "init": cell.init, "seed": cell.seed,
               "status": "done" if record else "pending"}  # fmt: skip
        row.update({key: record.get(key, "") for key in _coco_names(records) + _LAST})
        if record:
            row.update(
                params=cost.get("params"),
                gflops=cost.get("gflops"),
                eval_size=cost.get("img_size"),
                latency_ms=cost.get("latency_ms"),
                latency_threads=cost.get("threads"),
            )
        rows.append({k: ("" if v is None else v) for k, v in row.items()})
    return rows


def _coco_names(records: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """The 12 COCO numbers' names as the cells recorded them (AR100, or AR300 with eval.coco_max_dets=300)."""
    first = next(iter(records.values()), {})
    names = [key for key in first if key.startswith(("AP", "AR")) and key != "best_AP"]
    return names if len(names) == 12 else _COCO


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else _FIRST, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


MD_COLUMNS = ["backbone", "head", "init", "seeds", "params", "GFLOPs", "eval px", "CPU ms", "train img/s", "cls top-1",
              "AP", "AP50", "AP gain from pretraining"]  # fmt: skip


def _cells_of(row: GroupRow) -> list[str]:
    cost, dash = row.cost or {}, "-"
    gain = row.gain.show(signed=True) if row.gain else dash
    return [row.backbone, row.head, row.init, f"{row.seeds_done}/{row.seeds_total}",
            f"{cost['params'] / 1e6:.2f} M" if cost else dash, f"{cost['gflops']:.2f}" if cost else dash,
            str(cost["img_size"]) if cost else dash, f"{cost['latency_ms']:.1f}" if cost else dash,
            f"{row.train_img_per_s:.1f}" if row.train_img_per_s is not None else dash,
            f"{row.cls_top1:.3f}" if row.cls_top1 is not None else dash, row.ap.show() if row.ap else dash,
            row.ap50.show() if row.ap50 else dash, gain if row.init != "scratch" else dash]  # fmt: skip


def markdown(rows: Sequence[GroupRow], title: str, notes: Sequence[str]) -> str:
    """sweep.md: a title, the notes (what was run, on which CPU) and the table."""
    aligns = ["---"] * 3 + ["---:"] * (len(MD_COLUMNS) - 3)
    lines = [f"# {title}", "", *[f"{note}  " for note in notes], "", "| " + " | ".join(MD_COLUMNS) + " |",
             "|" + "|".join(aligns) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(_cells_of(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def notes_for(records: Mapping[int, Mapping[str, Any]], cells: Sequence[Cell], costs: Costs, cpu: str) -> list[str]:
    """What the numbers are: cells finished, epochs and sizes trained, the AP's definition, the CPU and threads."""
    epochs = sorted({int(r["epochs"]) for r in records.values()})
    sizes = sorted({int(r["img_size"]) for r in records.values() if r.get("img_size")})
    threads = sorted({int(c["threads"]) for c in costs.values()})
    seeds = sorted({c.seed for c in cells})
    caps = "300" if any("AR300" in r for r in records.values()) else "100"
    done = f"{len(records)} of {len(cells)} cells finished"
    return [
        f"{done}{'' if len(records) == len(cells) else ' (partial report)'}; seeds {', '.join(map(str, seeds))}; "
        f"detection epochs {', '.join(map(str, epochs)) or '-'} at {', '.join(map(str, sizes)) or '-'} px.",
        f"AP, AP50: COCO AP@[.5:.95] and AP@.5 by pycocotools (maxDets {caps}) of each cell's final epoch (EMA "
        "weights) on the val split, as train_det evaluates it; mean ± sd over seeds.",
        "AP gain from pretraining: the init's AP minus scratch's (same backbone, head and seed), mean ± sd over seeds.",
        "cls top-1: of the backbone.pt the cell started from (train_cls's best val epoch).",
        "train img/s: training throughput, the median over a cell's epochs (results.csv), mean over seeds.",
        f"params, GFLOPs (multiply + add = 2) and CPU ms at the eval size; CPU ms: batch 1, fused fp32 channels_last, "
        f"forward + postprocess, median, {'/'.join(map(str, threads)) or '-'} torch thread(s).",
        f"CPU: {cpu}.",
    ]


REPORT_FILES = ("sweep.csv", "sweep.md", "ap_vs_latency.png", "transfer_gain.png")


def write_report(out_dir: Path, title: str, cells: Sequence[Cell], records: Mapping[int, Mapping[str, Any]],
                 costs: Costs, cpu: str) -> list[Path]:  # fmt: skip
    """sweep.csv, sweep.md, ap_vs_latency.png and transfer_gain.png in `out_dir` (each written atomically)."""
    from backbones.checkpoint import atomic_write_bytes
    from detect.sweep.plots import plot_ap_vs_latency, plot_transfer_gain

    rows = summarise(cells, records, costs)
    paths = [out_dir / name for name in REPORT_FILES]
    atomic_write_bytes(csv_text(csv_rows(cells, records, costs)).encode("utf-8"), paths[0])
    text = markdown(rows, title, notes_for(records, cells, costs, cpu))
    atomic_write_bytes(text.encode("utf-8"), paths[1])
    plot_ap_vs_latency(rows, paths[2])
    plot_transfer_gain(rows, paths[3])
    return paths


def finished_records(plan: SweepPlan) -> dict[int, dict[str, Any]]:
    """The record of every finished cell of `plan`, by cell index."""
    records = {}
    for cell in plan.cells:
        record = read_marker(plan.layout.cell_dir(cell) / CELL_DONE)
        if record is not None:
            records[cell.index] = record
    return records


def report_sweep(plan: SweepPlan, title: str, records: Mapping[int, Mapping[str, Any]] | None = None) -> list[Path]:
    """Write the report of the finished cells of `plan` (`records`, default: read now) into its output_dir,
    measuring each backbone x head on the best.pt of its first finished cell; returns the files written."""
    from backbones.errors import UserError
    from detect.precision import cpu_report
    from detect.sweep.measure import measure_checkpoint

    m, costs = plan.cfg.measure, {}
    records = finished_records(plan) if records is None else records
    for cell in plan.cells:
        if cell.index in records and (cell.backbone, cell.head) not in costs:
            weights = plan.layout.cell_dir(cell) / "best.pt"
            try:
                costs[(cell.backbone, cell.head)] = measure_checkpoint(weights, m.img_size, m.threads, m.runs, m.warmup)
            except (UserError, OSError) as exc:
                print(f"[sweep] warning: cannot measure {weights}: {exc}", flush=True)
    return write_report(plan.layout.root, title, plan.cells, records, costs, cpu_report())


def report_stamp(title: str, records: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """What a report is made from: its title and a digest of each finished cell's record (by cell index)."""
    digests = {str(index): hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()
               for index, record in sorted(records.items())}  # fmt: skip
    return {"title": title, "cells": digests}


def report_once(plan: SweepPlan, title: str, force: bool = False) -> tuple[list[Path], bool]:
    """Under the report's lock: write the report unless the one on disk was made from these very cell records and
    title (`force`: write it anyway); returns its files and whether this call wrote them."""
    stamp = plan.layout.report_stamp()
    with file_lock(plan.layout.lock("report"), wait=True):
        records = finished_records(plan)
        made_from = report_stamp(title, records)
        paths = [plan.layout.root / name for name in REPORT_FILES]
        if not force and read_marker(stamp) == made_from and all(path.is_file() for path in paths):
            return paths, False
        paths = report_sweep(plan, title, records)
        write_marker(stamp, made_from)
        return paths, True


def announce_report(plan: SweepPlan, sweep: str) -> int:
    """`--report`: one line saying how many cells of the sweep (`sweep`: its CONFIG and overrides, as given) have
    finished; returns that count (none: the line goes to stderr, and no report is to be written).

    Raises:
        UserError: no cell of this sweep has a folder in its output_dir: the wrong CONFIG or overrides (e.g. none
            given after running another sweep). The line names the sweeps found beside that output_dir.
    """
    from backbones.errors import UserError

    root, total = plan.layout.root, len(plan.cells)
    started = sum(plan.layout.cell_dir(cell).is_dir() for cell in plan.cells)
    finished = len(finished_records(plan))
    if not started:
        others = sorted(str(path.parent) for path in root.parent.glob("*/sweep.yaml") if path.parent != root)
        beside = f"; sweeps beside it: {', '.join(others[:5])}" if others else ""
        raise UserError(f"--report: no cell of sweep {sweep} ({total} cells) exists in {root}{beside}; give the CONFIG "
                        "and overrides it ran with: python tools/sweep.py CONFIG [key=value ...] --report")  # fmt: skip
    line = f"[sweep] {sweep}: {finished} of {total} cells finished in {root}"
    if not finished:
        print(f"{line} ({started} started): no report written", file=sys.stderr, flush=True)
    else:
        print(f"{line}; writing the report", flush=True)
    return finished
