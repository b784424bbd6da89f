"""Pretrain a backbone on CUB classification: `python tools/train_cls.py [CONFIG.yaml] [key=value ...] [--debug]`.

Writes to a fresh run directory (`output_dir`, or `output_dir-2`, ...): config.yaml, results.csv, curves.png,
confusion_matrix.png, per_class_accuracy.csv, last.pt, best.pt (best top-1) and backbone.pt (the best weights'
backbone, ready for `model.backbone_weights=` of the detector). `train.resume=RUN/last.pt` continues that run in its
own directory, exactly. Ctrl-C / SIGTERM saves last.pt first. Bad input: one line on stderr, exit code 2, before any
work; a full disk or a killed loader worker: one line saying which last.pt survived, exit code 1. `--print-config`
prints the resolved config and exits. Under torchrun (`torchrun --nproc_per_node=N tools/train_cls.py ...`) the
processes train with DDP; rank 0 writes, and a fault on one rank (a bad sample, a signal, a non-finite loss, a process
that died) stops every rank at the same step with one line from rank 0 naming that rank.
"""

# ruff: noqa: E402  (the imports below come after the light --help answer)
from __future__ import annotations

import sys

USAGE = ("usage: train_cls.py [CONFIG.yaml] [key=value ...] [--print-config] [--debug]   "
         "(e.g. train.epochs=5 model.backbone=resnet18)")  # fmt: skip

if __name__ == "__main__":  # --help is answered from the schema alone, without importing torch
    from detect.config.help import exit_with_help_if_asked

    exit_with_help_if_asked(__doc__, USAGE, "ClsConfig")

from detect.cli import exit_process, run_tool
from detect.config import ClsConfig, answer_info_flags, split_config_args
from detect.train.classification import pretrain_backbone, resolve_cls_config


def main(argv: list[str] | None = None) -> int:
    """`tools/train_cls.py [CONFIG] [key=value ...]`; the run is `detect.train.classification.pretrain_backbone`."""
    argv = sys.argv[1:] if argv is None else argv
    if answer_info_flags(
        argv, __doc__, USAGE, ClsConfig, lambda rest: resolve_cls_config(*split_config_args(rest, USAGE), False)[0]
    ):
        return 0
    pretrain_backbone(*split_config_args(argv, USAGE))
    return 0


if __name__ == "__main__":
    exit_process(run_tool(main))
