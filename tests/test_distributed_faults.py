"""A fault on one rank of `torchrun --nproc_per_node=2` (gloo, CPU): every rank stops at the same step, rank 0 alone
says which rank and what, last.pt keeps the last good epoch and the run resumes from it (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from backbones.checkpoint import load_checkpoint
from detect.cli import run_tool

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import importlib.util, os, sys
from pathlib import Path

from detect.cli import run_tool

repo, argv = Path(sys.argv[1]), sys.argv[2:]
spec = importlib.util.spec_from_file_location("train_det", repo / "tools" / "train_det.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
real = tool.build_det_criterion


def build(cfg, model):
    criterion, calls = real(cfg, model), [0]

    def nan_on_rank_1(outputs, targets):
        calls[0] += 1
        total, parts = criterion(outputs, targets)
        if os.environ["RANK"] == "1" and calls[0] >= 5:  # 12 images, global batch 4: epoch 2, batch 2
            return total * float("nan"), {**parts, "cls": parts["cls"] * float("nan")}
        return total, parts

    return nan_on_rank_1


tool.build_det_criterion = build
sys.exit(run_tool(tool.main, argv))
"""


def test_non_finite_loss_on_rank_1_stops_both_ranks_with_one_message(synth_cub_root: Path, tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    out = tmp_path / "run"
    argv = [f"data.root={synth_cub_root}", "train.workers=0", "train.device=cpu", "data.img_size=64",
            "train.epochs=3", "train.batch_size=4", "train.close_mosaic=0", "model.backbone_weights=null",
            f"output_dir={out}"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
               str(REPO), *argv]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)  # fmt: skip
    assert time.monotonic() - start < 300
    errors = [line for line in proc.stderr.splitlines() if "error: " in line and "non-finite" in line]
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "non-finite loss (cls) on rank 1 at epoch 2, batch 2" in errors[0], errors
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 1 and (last["train_state"]["epoch"], last["train_state"]["batch"]) == (1, 0)
    # ... and the run resumes from it (here in one process)
    train_det = _tool()
    assert run_tool(train_det.main, [f"train.resume={out / 'last.pt'}", "train.epochs=2", "eval.interval=2"]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def _tool() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_det_ddp_faults", REPO / "tools" / "train_det.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
