"""What a backbone is worth across detection heads: `python tools/sweep.py [CONFIG.yaml] [key=value ...]`.

Crosses the sweep config's backbones x heads x initialisations (scratch; pretrained: on CUB classification by
tools/train_cls.py, one run per backbone shared by its cells; imagenet: a local weights file per backbone) x seeds.
Every cell is an ordinary tools/train_det.py run directory in OUTPUT/cells/<cell>/ (model.backbone=,
model.head=, model.backbone_weights=, seed=), its output in OUTPUT/logs/<cell>.log; one line per cell shows the
progress. With no CONFIG: configs/sweep/default.yaml (the synthetic mini-CUB, ~40 min on 2 CPU cores).

Re-running the same command continues the sweep: finished cells are skipped, a stopped cell resumes from its
last.pt, one stopped before its first epoch ended starts again. When every cell has finished, OUTPUT gets the
report: sweep.csv (one row per cell, every number), sweep.md (params, GFLOPs, CPU latency, cls top-1, AP and AP50
as mean ± sd over seeds, AP gained from pretraining), ap_vs_latency.png and transfer_gain.png.

Sharding: `--cell K --of N` runs only the cells whose index i has i % N == K (K in 0..N-1), so N independent
processes or nodes (e.g. a cluster's array job, K = the task id) share the sweep over one OUTPUT folder. A shard
pretrains the backbones its own cells need; two shards needing the same one take turns on a lock file
(OUTPUT/locks/, fcntl.flock: local disk, or NFS with working locks): one trains it, the other reuses it. The shard
that finishes the last cell writes the report (shards finishing together take turns on its lock: one writes it).
`--report` writes it at any time from the cells finished so far, and first says how many cells of which sweep (the
CONFIG and overrides given: name those the sweep ran with) have finished: none, nothing is written (exit code 1);
no folder of any of its cells, as after another sweep, one line and exit code 2.
`--list` prints the cells, their shard and status. Bad input (an unknown sweep key, a bad key in the tools'
overrides, an unknown backbone or head): one line on stderr, exit code 2, before any run. A failed cell: its log's
path and tail, the sweep goes on, exit code 1 at the end.
"""

# ruff: noqa: E402  (the imports below come after the light --help answer)
from __future__ import annotations

import sys

USAGE = ("usage: sweep.py [CONFIG.yaml] [key=value ...] [--cell K --of N] [--report] [--list] [--debug]   "
         "(e.g. seeds=[0,1] output_dir=runs/sweep/mine)")  # fmt: skip

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # answered from the schema alone, without torch
    from detect.config.help import tool_help
    from detect.sweep.config import SweepConfig

    print(tool_help(__doc__, USAGE, SweepConfig))
    sys.exit(0)

import argparse
from pathlib import Path

from backbones.errors import UserError
from detect.cli import run_tool
from detect.config import config_to_yaml, load_config
from detect.sweep.cells import shard
from detect.sweep.config import SweepConfig, check_sweep

TOOLS = Path(__file__).resolve().parent
DEFAULT_CONFIG = TOOLS.parent / "configs" / "sweep" / "default.yaml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # a usage error is one line and exit 2, as every bad input
        raise UserError(f"{message}; {USAGE}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The optional CONFIG, key=value overrides and the flags; a usage error is one line (UserError)."""
    parser = _Parser(prog="sweep.py", add_help=False)
    parser.add_argument("--cell", type=int, default=None)
    parser.add_argument("--of", type=int, default=None)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--list", action="store_true")
    args, rest = parser.parse_known_args(argv)
    paths = [arg for arg in rest if "=" not in arg]
    if len(paths) > 1 or any(p.startswith("-") for p in paths):
        raise UserError(f"unexpected arguments {' '.join(paths)}; {USAGE}")
    if (args.cell is None) != (args.of is None):
        raise UserError("--cell K and --of N go together (K in 0..N-1)")
    if args.report and args.of is not None:
        raise UserError("--report writes the whole sweep's report: drop --cell/--of")
    args.config, args.named = (paths[0], True) if paths else (str(DEFAULT_CONFIG), False)
    args.overrides = [arg for arg in rest if "=" in arg]
    args.cell, args.of = (0, 1) if args.of is None else (args.cell, args.of)
    return args


def list_cells(plan, n: int) -> None:
    """One line per cell: index, shard, status, what it crosses, its folder."""
    from detect.sweep.plan import cell_record

    for cell in plan.cells:
        status = "done" if cell_record(plan, cell) else "pending"
        print(f"{cell.index:4d}  shard {cell.index % n}/{n}  {status:<7}  {cell.describe():<50}  "
              f"{plan.layout.cell_dir(cell)}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from detect.sweep.plan import Tools, cell_record, make_plan
    from detect.sweep.report import announce_report, report_once
    from detect.sweep.runner import ensure_default_data, run_cells

    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(SweepConfig, args.config, args.overrides)
    heads, roots = check_sweep(cfg)
    plan = make_plan(cfg, heads, Tools(TOOLS))
    mine = shard(plan.cells, args.cell, args.of)
    command = " ".join([args.config, *args.overrides])  # what names this sweep: its CONFIG and overrides
    title = f"Sweep {command}"
    named = command if args.named else " ".join([f"{args.config} (no CONFIG: the default)", *args.overrides])
    if args.list:
        list_cells(plan, args.of)
        return 0
    failed = []
    if args.report and not announce_report(plan, named):
        return 1
    if not args.report:
        from backbones.checkpoint import atomic_write_bytes

        atomic_write_bytes(config_to_yaml(cfg).encode("utf-8"), plan.layout.root / "sweep.yaml")
        where = f"; shard {args.cell} of {args.of}: {len(mine)} of them" if args.of > 1 else ""
        print(f"[sweep] {len(plan.cells)} cells ({len(cfg.backbones)} backbones x {len(heads)} heads x "
              f"{len(cfg.init)} inits x {len(cfg.seeds)} seeds){where} -> {plan.layout.root}; tool output in "
              f"{plan.layout.root / 'logs'}", flush=True)  # fmt: skip
        ensure_default_data(plan, roots)
        failed = run_cells(plan, mine, (args.cell, args.of))
        finished = sum(cell_record(plan, cell) is not None for cell in plan.cells)
        if failed:
            print(f"[sweep] {len(failed)} cell(s) failed: " + "; ".join(f"{c.name}: {why}" for c, why in failed),
                  file=sys.stderr)  # fmt: skip
        if finished < len(plan.cells):
            print(f"[sweep] {finished}/{len(plan.cells)} cells finished; the report is written when all are (or now: "
                  f"python tools/sweep.py {command} --report)", flush=True)  # fmt: skip
            return 1 if failed else 0
    paths, written = report_once(plan, title, force=args.report)  # shards finishing together: one writes it
    state = "" if written else " (up to date: written earlier from these same cells, by another shard or run)"
    print(f"[sweep] report{state}: {', '.join(str(p) for p in paths)}", flush=True)
    print(paths[1].read_text(), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
