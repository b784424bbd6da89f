"""Train a detector: `python tools/train_det.py [CONFIG.yaml] [key=value ...] [--debug]`.

With no CONFIG: `configs/det/default.yaml`, the synthetic mini-CUB (bird labels, 256 px, YOLOv8 at scale n) from the
backbone that `tools/train_cls.py` pretrained (runs/cls/default/backbone.pt; `model.backbone_weights=null` for
none). Any registered parts plug in by name: `model.backbone=resnet50 model.neck=yolo11 model.head=yolo11`, and a
part of your own registers in a module named by `imports=[my_parts]`. Writes to a fresh run directory (`output_dir`,
or `output_dir-2`, ...): config.yaml, val_gt.json (COCO ground truth), results.csv (one column per loss part),
curves.png, last.pt, best.pt (best COCO AP), val_predictions.jpg, pr_curve.png, and TensorBoard events when
tensorboard is installed. `train.resume=RUN/last.pt` continues that run exactly. Ctrl-C / SIGTERM saves last.pt.
Under `torchrun --nproc_per_node=N` the processes train with DDP (train.batch_size is the global batch); rank 0
evaluates and writes, and a fault on one rank (a bad sample, a signal, a non-finite loss, a process that died) stops
every rank at the same step with one line from rank 0 naming that rank. Bad input: one line on stderr, exit code 2,
before any work; a full disk or a killed loader worker: one line saying which last.pt survived, exit code 1.
`--print-config` prints the resolved config and exits.
"""

# ruff: noqa: E402  (the imports below come after the light --help answer)
from __future__ import annotations

import sys

USAGE = ("usage: train_det.py [CONFIG.yaml] [key=value ...] [--print-config] [--debug]   "
         "(e.g. train.epochs=5 model.backbone=resnet50)")  # fmt: skip

if __name__ == "__main__":  # --help is answered from the schema alone, without importing torch
    from detect.config.help import exit_with_help_if_asked

    exit_with_help_if_asked(__doc__, USAGE, "DetConfig")

from detect.cli import exit_process, run_tool
from detect.config import DetConfig, answer_info_flags, split_config_args
from detect.train.detection import resolve_det_config, train_detector


def main(argv: list[str] | None = None) -> int:
    """`tools/train_det.py [CONFIG] [key=value ...]`; the run is `detect.train.detection.train_detector`."""
    argv = sys.argv[1:] if argv is None else argv
    if answer_info_flags(
        argv, __doc__, USAGE, DetConfig, lambda rest: resolve_det_config(*split_config_args(rest, USAGE), False)[0]
    ):
        return 0
    train_detector(*split_config_args(argv, USAGE))
    return 0


if __name__ == "__main__":
    exit_process(run_tool(main))
