"""Interruptions (DESIGN §8): SIGTERM / Ctrl-C save last.pt and exit 143 / 130; `kill -9` while a checkpoint is being
written never leaves a file that does not load; resume is bit-identical with DataLoader workers too.

The workers=0 resume cases live in tests/test_end_to_end.py (train_det) and tests/test_train_cls.py (train_cls); here
the interrupted and resumed runs use `train.workers=2` and must end exactly where an uninterrupted workers=0 run does
(which also shows that worker processes do not change a single sample).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers import load_tool

import detect.train.detection
from backbones.checkpoint import atomic_save, load_checkpoint
from detect.cli import run_tool
from detect.train.runs import ResultsCSV

REPO = Path(__file__).resolve().parents[1]


def tool(name: str) -> ModuleType:
    return load_tool(name)


# ----------------------------------------------------------------------------------------------------------------------
# Signals to a real process
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.train
def test_sigterm_and_ctrl_c_save_last_pt(synth_cub_root: Path, tmp_path: Path) -> None:
    """Two train_det processes at once: SIGTERM -> exit 143, SIGINT -> exit 130; both leave a loadable last.pt."""
    env = dict(os.environ)  # conftest set the offline switches and a shared matplotlib cache
    procs = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        out = tmp_path / signum.name
        argv = [f"data.root={synth_cub_root}", "data.img_size=64", "train.epochs=1000", "train.batch_size=4",
                "train.workers=0", "train.threads=1", "model.backbone_weights=null", f"output_dir={out}"]  # fmt: skip
        command = [sys.executable, str(REPO / "tools" / "train_det.py"), *argv]
        procs[signum] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for proc in procs.values():
            line = proc.stdout.readline()  # "train_det: ... -> RUN" is printed as the training loop starts
            assert line.startswith("train_det: "), (line, proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(1.0)  # into the first epoch
        for signum, proc in procs.items():
            proc.send_signal(signum)
        results = {signum: proc.communicate(timeout=120) for signum, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for signum, expected_code, said in (
        (signal.SIGTERM, 143, "stopped by SIGTERM"),
        (signal.SIGINT, 130, "interrupted"),
    ):
        err = results[signum][1]
        assert procs[signum].returncode == expected_code, err[-2000:]
        assert err.rstrip().endswith(said) and "Traceback" not in err
        last = load_checkpoint(tmp_path / signum.name / "last.pt")
        state = last["train_state"]
        # 12 images, batch 4: 3 steps per epoch. last.pt holds the position the message names (batch 3: every step
        # of the epoch done, its evaluation not yet), and an epoch's row in results.csv comes with its last.pt (a
        # signal waits for both), so the rows are the epochs done.
        epoch, batch = state["epoch"], state["batch"]
        assert batch in (0, 1, 2, 3), (epoch, batch)
        where = f"after epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
        assert f"interrupted: saved {tmp_path / signum.name / 'last.pt'} ({where})" in err, err[-2000:]
        assert len(ResultsCSV(tmp_path / signum.name / "results.csv").read()) == epoch, (epoch, batch)
        assert state["model"].keys() == last["model"].keys()


def _write_forever(path: str, size: int) -> None:
    """Child process: rewrite `path` atomically, each version a tensor full of its version number.

    The tensor is filled by NumPy: a forked child must not enter the OpenMP pool its parent may have started.
    """
    torch.set_num_threads(1)
    version = 0
    while True:
        version += 1
        atomic_save({"version": version, "weights": torch.from_numpy(np.full(size, version, np.float32))}, path)


def test_kill_9_while_writing_never_leaves_a_broken_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites a 32 MB checkpoint in a loop, at random moments, 8 times over the same file."""
    path = tmp_path / "last.pt"
    size = 8 * 1024 * 1024  # float32: 32 MB per write, so most kills land in the middle of one
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    versions, killed_mid_write = [], 0
    for _ in range(8):
        child = ctx.Process(target=_write_forever, args=(str(path), size), daemon=True)
        child.start()
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        leftovers = [p for p in tmp_path.iterdir() if p.name != "last.pt"]
        killed_mid_write += bool(leftovers)
        for leftover in leftovers:  # the temp file of the interrupted write; a later run never reads it
            leftover.unlink()
        checkpoint = load_checkpoint(path)  # always a complete file: the previous version or the new one
        assert (checkpoint["weights"].numpy() == checkpoint["version"]).all() and len(checkpoint["weights"]) == size
        versions.append(checkpoint["version"])
    assert min(versions) >= 1 and killed_mid_write >= 1, ("the kills did not land during writes", versions)


# ----------------------------------------------------------------------------------------------------------------------
# Resume with DataLoader workers
# ----------------------------------------------------------------------------------------------------------------------
class InterruptingLoss:
    """Wraps the detection criterion; a real SIGINT (Ctrl-C) to this process during its `at`-th call."""

    def __init__(self, criterion: object, at: int) -> None:
        self.criterion, self.at, self.calls = criterion, at, 0

    def __call__(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> tuple:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.criterion(outputs, targets)


def _det_args(root: Path, out: Path, workers: int, cache: bool = False) -> list[str]:
    return [f"data.root={root}", "data.img_size=64", "train.epochs=2", "train.batch_size=4", "train.threads=1",
            f"train.workers={workers}", "train.close_mosaic=1", "eval.interval=2", "model.backbone_weights=null",
            f"data.cache={cache}", f"output_dir={out}"]  # fmt: skip


@pytest.fixture(scope="module")
def straight_det(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two uninterrupted epochs with workers=0 (12 images, batch 4: 3 steps per epoch)."""
    out = tmp_path_factory.mktemp("straight_det") / "run"
    assert run_tool(tool("train_det").main, _det_args(synth_cub_root, out, workers=0)) == 0
    return out


@pytest.mark.train
def test_train_det_resume_with_workers_is_bit_identical(
    synth_cub_root: Path, straight_det: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the middle of epoch 2 (call 5: gradients pending), workers=2 and the RAM image cache; resume with
    both. Must end exactly where the uncached workers=0 run does."""
    train_det, run = tool("train_det"), detect.train.detection
    build = run.build_det_criterion
    monkeypatch.setattr(run, "build_det_criterion", lambda cfg, model: InterruptingLoss(build(cfg, model), 5))
    out = tmp_path / "run"
    assert run_tool(train_det.main, _det_args(synth_cub_root, out, workers=2, cache=True)) == 130
    state = load_checkpoint(out / "last.pt")["train_state"]
    assert (state["epoch"], state["batch"]) == (1, 2) and state["gradients"]
    monkeypatch.setattr(run, "build_det_criterion", build)
    assert run_tool(train_det.main, [f"train.resume={out / 'last.pt'}"]) == 0
    straight, resumed = load_checkpoint(straight_det / "last.pt"), load_checkpoint(out / "last.pt")
    assert resumed["config"]["train"]["workers"] == 2 and resumed["config"]["data"]["cache"] is True
    pairs = [(straight["model"], resumed["model"]), (straight["train_state"]["model"], resumed["train_state"]["model"]),
             (straight["train_state"]["ema"]["state_dict"], resumed["train_state"]["ema"]["state_dict"])]  # fmt: skip
    for a, b in pairs:
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert straight["metrics"]["coco_stats"] == resumed["metrics"]["coco_stats"]


def _cls_args(root: Path, out: Path, workers: int) -> list[str]:
    return [f"data.root={root}", "data.img_size=32", "data.resize_size=36", "train.batch_size=8", "train.epochs=2",
            "train.warmup_epochs=0.5", "train.ema=true", "model.dropout=0.2", f"train.workers={workers}",
            "train.threads=1", f"output_dir={out}"]  # fmt: skip


@pytest.mark.train
def test_train_cls_resume_with_workers_is_bit_identical(
    synth_cub_root: Path, tmp_path: Path, interrupt_cls_after: Callable[[int], contextlib.AbstractContextManager[None]]
) -> None:
    """Uninterrupted workers=0 vs interrupted mid-epoch 2 with workers=2 and resumed with workers=2."""
    train_cls = tool("train_cls")
    assert train_cls.main(_cls_args(synth_cub_root, tmp_path / "straight", workers=0)) == 0
    with interrupt_cls_after(3), pytest.raises(KeyboardInterrupt):  # 12 images / 8: 2 steps per epoch
        train_cls.main(_cls_args(synth_cub_root, tmp_path / "resumed", workers=2))
    partial = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (partial["epoch"], partial["batch"]) == (1, 1)
    assert train_cls.main([f"train.resume={tmp_path / 'resumed' / 'last.pt'}"]) == 0
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert b["config"]["train"]["workers"] == 2 and (b["epoch"], b["batch"]) == (2, 0)
    for part in ("model", "ema"):
        sa, sb = (a[part], b[part]) if part == "model" else (a[part]["state_dict"], b[part]["state_dict"])
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{part}.{key}"
    assert a["best"] == b["best"]
