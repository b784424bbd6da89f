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

Sharding: `--cell K --of N` runs the cells whose index i has i % N == K, so N processes or nodes (a cluster's array
job) share one OUTPUT folder, taking turns on lock files to pretrain each backbone once and write the report once
(docs/sweep.md, "On a cluster"). `--report` writes the report from the cells finished so far, after saying how many
of which sweep have finished (none: nothing written, exit 1; no cell folder of that sweep: exit 2).
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
from detect.cli import exit_process, run_tool
from detect.config import load_config
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


def main(argv: list[str] | None = None) -> int:
    from detect.sweep.plan import Tools, list_cells, make_plan
    from detect.sweep.report import announce_report, report_once
    from detect.sweep.runner import run_shard

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
        failed, finished = run_shard(plan, cfg, heads, mine, (args.cell, args.of), roots)
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
    exit_process(run_tool(main))
