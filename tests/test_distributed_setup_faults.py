"""Faults of one rank among three (`torchrun --nproc_per_node=3`, gloo, CPU): a fault during set-up, a rank that hangs,
a rank that is killed. Each stops every rank within a bounded time, with one line from rank 0 naming the rank, and no
traceback on any rank (issue 17, item 4).

The faults come from a plugin (tests/plugins/rank_faults.py, named by `imports=`) that the environment variable
PLUGDET_RANK_FAULT aims at one rank: its data format raises a `UserError` on rank 2 while the datasets are built, its
loss never returns on rank 1 (with train.ddp_timeout=0.25 min), or kills rank 1 at epoch 2, batch 2. torchrun runs a
small driver that runs the tool as `python tools/train_det.py` does (`run_tool`), with each rank's stderr in
`<dump>/rank<R>.err` and its exit code in `<dump>/rank<R>.code` (none: the process was killed). The three runs share
the two cores at the same time (one fixture).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "tests" / "plugins" / "rank_faults.py"
LIMIT_S = 200  # a hung run would end here; the hang costs ~15 s of timeout + 15 s of roll call + torchrun's 30 s
HANG_TIMEOUT_MIN = 0.25
SLOW_EVAL_TIMEOUT_MIN = 0.15  # 9 s; rank 0's evaluation of 12 images at 2 s each takes 24 s

DRIVER = """
import importlib.util, os, sys
from pathlib import Path

repo, dump, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rank = os.environ["RANK"]
sys.stderr = open(dump / f"rank{rank}.err", "w", buffering=1)
from detect.cli import run_tool

spec = importlib.util.spec_from_file_location("train_det", repo / "tools" / "train_det.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
code = run_tool(tool.main, argv)
(dump / f"rank{rank}.code").write_text(str(code))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def faults(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, float]]:
    """train_det under `torchrun --standalone --nproc_per_node=3` with each fault, all at the same time;
    {fault: (work folder, torchrun's exit code, seconds)}."""
    extra = {"setup:2": [], "hang:1": [f"train.ddp_timeout={HANG_TIMEOUT_MIN}"], "die:1": [],
             "slow_eval:0": ["train.epochs=1", f"train.ddp_timeout={SLOW_EVAL_TIMEOUT_MIN}"]}  # fmt: skip
    procs, starts, results = {}, {}, {}
    for fault, args in extra.items():
        work = tmp_path_factory.mktemp(fault.replace(":", "_"))
        driver, dump = work / "driver.py", work / "dump"
        driver.write_text(textwrap.dedent(DRIVER))
        dump.mkdir()
        argv = [f"data.root={synth_cub_root}", f"imports=[{PLUGIN}]", "data.format=rank_fault_cub",
                "loss.name=rank_fault_yolo", "data.img_size=64", "train.epochs=2", "train.batch_size=3",
                "train.workers=0", "train.threads=1", "train.close_mosaic=0", "model.backbone_weights=null",
                "eval.interval=3", "train.device=cpu", f"output_dir={work / 'run'}", *args]  # fmt: skip
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", str(driver),
                   str(REPO), str(dump), *argv]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PLUGDET_RANK_FAULT": fault}
        starts[fault] = time.monotonic()
        procs[fault] = (work, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                               env=env))  # fmt: skip
    for fault, (work, proc) in procs.items():
        try:
            _, err = proc.communicate(timeout=max(LIMIT_S - (time.monotonic() - starts[fault]), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        (work / "torchrun.err").write_text(err)
        results[fault] = (work, proc.returncode, time.monotonic() - starts[fault])
    return results


def stopped(faults: dict[str, tuple[Path, int, float]], fault: str) -> Path:
    """The fault's work folder, once torchrun failed (exit code != 0) within the time limit."""
    work, code, seconds = faults[fault]
    assert code != 0 and seconds < LIMIT_S, (work / "torchrun.err").read_text()[-3000:]
    return work


def errors(work: Path, rank: int) -> list[str]:
    """The `error: ` lines of `rank`'s stderr."""
    return [line for line in (work / "dump" / f"rank{rank}.err").read_text().splitlines() if "error: " in line]


def codes(work: Path) -> list[int | None]:
    """Each rank's exit code as its `run_tool` returned it (None: the process was killed before)."""
    paths = [work / "dump" / f"rank{rank}.code" for rank in range(3)]
    return [int(path.read_text()) if path.is_file() else None for path in paths]


def no_traceback(work: Path) -> None:
    for rank in range(3):
        assert "Traceback" not in (work / "dump" / f"rank{rank}.err").read_text(), rank


@pytest.mark.slow
@pytest.mark.train
def test_a_setup_fault_on_rank_2_stops_every_rank_with_one_line_from_rank_0(faults: dict, synth_cub_root: Path) -> None:
    """The data scan fails on rank 2 only: every rank stops at the end of that step (none waits in the next step's
    collectives), rank 0 names rank 2, the step and the cause; bad input, so exit code 2 everywhere."""
    work = stopped(faults, "setup:2")
    assert errors(work, 0) == [f"error: rank 2, during set-up (building the datasets): data.root {synth_cub_root} "
                               "not found (on this node)"]  # fmt: skip
    assert errors(work, 1) == [] and errors(work, 2) == []
    assert codes(work) == [2, 2, 2]
    no_traceback(work)
    assert not (work / "run").exists()  # the fault came before the run folder


@pytest.mark.slow
@pytest.mark.train
def test_a_hung_rank_is_named_after_the_ddp_timeout(faults: dict) -> None:
    """Rank 1 never returns from its first step: ranks 0 and 2 stop after train.ddp_timeout (not torch's 30 min)
    and rank 0 names rank 1; rank 1 itself is killed by torchrun."""
    work = stopped(faults, "hang:1")
    assert errors(work, 0) == [f"error: rank 1 did not answer within {HANG_TIMEOUT_MIN:g} min (train.ddp_timeout: "
                               "hung, or its machine is gone); no last.pt was written (the run stopped before its "
                               "first epoch ended)"]  # fmt: skip
    assert errors(work, 2) == []
    assert codes(work) == [1, None, 1]
    no_traceback(work)


@pytest.mark.slow
@pytest.mark.train
def test_a_killed_rank_among_three_is_named(faults: dict) -> None:
    """SIGKILL of rank 1 at epoch 2, batch 2: rank 0 names rank 1 (found by the roll call of the survivors) and the
    last.pt that survived."""
    work = stopped(faults, "die:1")
    last = work / "run" / "last.pt"
    assert errors(work, 0) == [f"error: lost rank 1: its process ended (killed, out of memory, or crashed; the "
                               f"launcher's log names its exit code); {last} (after epoch 1) survived: continue with "
                               f"train.resume={last}"]  # fmt: skip
    assert errors(work, 2) == []
    assert codes(work) == [1, None, 1]
    no_traceback(work)


@pytest.mark.slow
@pytest.mark.train
def test_rank_0_evaluating_longer_than_the_ddp_timeout_is_not_a_hang(faults: dict) -> None:
    """Rank 0's evaluation takes 24 s, the other ranks' timeout is 9 s: they wait for it outside any collective (its
    beat on the store), and the run ends normally with rank 0's `done:` line."""
    work, code, seconds = faults["slow_eval:0"]
    assert code == 0 and seconds < LIMIT_S, (work / "torchrun.err").read_text()[-3000:]
    assert codes(work) == [0, 0, 0]
    assert errors(work, 0) + errors(work, 1) + errors(work, 2) == []
    assert (work / "run" / "best.pt").is_file() and (work / "run" / "val_predictions.jpg").is_file()
