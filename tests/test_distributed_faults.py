"""A fault on one rank of `torchrun --nproc_per_node=2` (gloo, CPU): every rank stops at the same step, rank 0 alone
says which rank and what, last.pt survives and the run resumes from it (issue 12).

The faults are injected into rank 1 by a small driver that loads the tool as a module and wraps its criterion (a NaN,
a SIGKILL of its own process, a SIGINT to itself, at its 5th training step: epoch 2, batch 2 of 12 images at a global
batch of 4; for train_cls its step, a SIGINT) or the dataset (a `UserError` from a loader worker for an image of
epoch 2, as when a file becomes unreadable mid-run). Each rank's stderr is also written to `<dump>/rank<R>.err`, and
its exit code and the loss parts of every step to `<dump>/rank<R>.pt`, so the tests can tell which rank said what.
The five runs share the two cores at the same time (one fixture), which costs less than one after the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import load_tool

from backbones.checkpoint import load_checkpoint
from detect.cli import run_tool
from detect.train.distributed import init_distributed

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 240  # "bounded time": a hang would end here; a stop takes seconds

DRIVER = """
import importlib.util, os, signal, sys
from pathlib import Path

import torch

from backbones.errors import UserError
from detect.cli import run_tool

repo, fault, dump, argv = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
rank = int(os.environ["RANK"])
log = open(dump / f"rank{rank}.err", "w")


class Tee:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        log.write(text)
        log.flush()
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


sys.stderr = Tee(sys.stderr)
name = "train_cls" if fault.startswith("cls_") else "train_det"
spec = importlib.util.spec_from_file_location(name, repo / "tools" / f"{name}.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
import detect.train.detection  # the run the tool calls
real_criterion, parts_seen = detect.train.detection.build_det_criterion, []


def build(cfg, model):
    criterion, calls = real_criterion(cfg, model), [0]

    def faulty(outputs, targets):
        calls[0] += 1
        total, parts = criterion(outputs, targets)
        parts_seen.append({name: float(value) for name, value in parts.items()})
        if rank == 1 and calls[0] == 5:  # epoch 2, batch 2
            if fault == "nan":
                return total * float("nan"), {**parts, "cls": parts["cls"] * float("nan")}
            if fault == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
        return total, parts

    return faulty


detect.train.detection.build_det_criterion = build
if fault == "bad_sample":
    from detect.data.detection import DetectionDataset

    real_getitem = DetectionDataset.__getitem__

    def getitem(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        if rank == 1 and epoch == 1 and self.unreadable is not None:
            raise UserError(f"cannot read image {self.source.image_path(index)}: it vanished")
        return real_getitem(self, item)

    DetectionDataset.__getitem__ = getitem
if fault == "cls_sigint":
    import detect.train.classify as classify

    real_step = classify.ClsStepper.step

    def step(self, model, images, labels, where):
        loss, logits = real_step(self, model, images, labels, where)
        n = labels.numel()
        parts_seen.append([loss.item() * n, float((logits.argmax(1) == labels).sum()), float(n)])
        if rank == 1 and len(parts_seen) == 5:  # epoch 2, batch 2
            os.kill(os.getpid(), signal.SIGINT)
        return loss, logits

    classify.ClsStepper.step = step
code = run_tool(tool.main, argv)
torch.save({"code": code, "parts": parts_seen}, dump / f"rank{rank}.pt")
sys.exit(code)
"""


@pytest.fixture(scope="module")
def faults(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, float]]:
    """train_det (and train_cls for "cls_sigint") under `torchrun --standalone --nproc_per_node=2` with each fault on
    rank 1, all at the same time; {fault: (work folder, torchrun's exit code, seconds)}."""
    det = ["data.img_size=64", "train.close_mosaic=0", "model.backbone_weights=null", "eval.interval=3"]
    extra = {"nan": det, "bad_sample": [*det, "train.workers=1"], "die": det, "sigint": det,
             "cls_sigint": ["data.img_size=32", "data.resize_size=36"]}  # fmt: skip
    procs, starts, results = {}, {}, {}
    for fault, args in extra.items():
        work = tmp_path_factory.mktemp(fault)
        driver, dump = work / "driver.py", work / "dump"
        driver.write_text(textwrap.dedent(DRIVER))
        dump.mkdir()
        argv = [f"data.root={synth_cub_root}", "train.workers=0", "train.device=cpu", "train.epochs=3",
                "train.batch_size=4", f"output_dir={work / 'run'}", *args]  # fmt: skip
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
                   str(REPO), fault, str(dump), *argv]  # fmt: skip
        starts[fault] = time.monotonic()
        procs[fault] = (work, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                               env={**os.environ, "OMP_NUM_THREADS": "1"}))  # fmt: skip
    for fault, (work, proc) in procs.items():
        try:
            _, err = proc.communicate(timeout=max(LIMIT_S - (time.monotonic() - starts[fault]), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        (work / "torchrun.err").write_text(err)
        results[fault] = (work, proc.returncode, time.monotonic() - starts[fault])
    return results


def said(work: Path, rank: int, start: str) -> list[str]:
    """The lines of `rank`'s stderr that begin with `start`."""
    return [line for line in (work / "dump" / f"rank{rank}.err").read_text().splitlines() if line.startswith(start)]


def codes(work: Path) -> list[int | None]:
    """Each rank's exit code as its `run_tool` returned it (None: the process died before)."""
    dumps = [work / "dump" / f"rank{rank}.pt" for rank in (0, 1)]
    return [torch.load(path)["code"] if path.is_file() else None for path in dumps]


def stopped(faults: dict[str, tuple[Path, int, float]], fault: str) -> Path:
    """The fault's work folder, once torchrun failed (exit code != 0) within the time limit."""
    work, code, seconds = faults[fault]
    assert code != 0 and seconds < LIMIT_S, (work / "torchrun.err").read_text()[-3000:]
    return work


def resumable(last: Path) -> None:
    """`last` goes back into a run as `train.resume` does (here in one process): config, data, model, optimizer, EMA
    and the position after epoch 1 restored (the interrupt test below runs such a resume to its end)."""
    from detect.train.detection import build_det_run, resolve_det_config

    cfg, ckpt = resolve_det_config(None, [f"train.resume={last}"])
    run = build_det_run(cfg, ckpt, init_distributed("cpu"))
    run.close()
    assert run.state.position == (1, 0) and run.run_dir == last.parent


@pytest.mark.train
def test_non_finite_loss_on_rank_1_stops_both_ranks_with_one_message(faults: dict) -> None:
    work = stopped(faults, "nan")
    errors = said(work, 0, "error: ")
    assert len(errors) == 1 and not said(work, 1, "error: "), errors
    assert "non-finite loss (cls) on rank 1 at epoch 2, batch 2" in errors[0], errors
    assert codes(work) == [2, 2]
    last = load_checkpoint(work / "run" / "last.pt")
    assert last["epoch"] == 1 and (last["train_state"]["epoch"], last["train_state"]["batch"]) == (1, 0)
    resumable(work / "run" / "last.pt")


@pytest.mark.train
def test_a_bad_sample_on_rank_1_stops_both_ranks_with_one_message(faults: dict) -> None:
    """A loader worker of rank 1 raises a UserError for an image of epoch 2: both ranks stop before that step."""
    work = stopped(faults, "bad_sample")
    errors, last = said(work, 0, "error: "), work / "run" / "last.pt"
    assert len(errors) == 1 and not said(work, 1, "error: "), errors
    assert errors[0].startswith("error: rank 1, loading epoch 2, batch 1: cannot read image "), errors
    assert f": it vanished; {last} (after epoch 1) survived: continue with train.resume={last}" in errors[0], errors
    assert codes(work) == [2, 2]  # bad input
    resumable(last)


@pytest.mark.train
def test_a_rank_that_dies_stops_the_other_with_one_message(faults: dict) -> None:
    """SIGKILL of rank 1 mid-step: rank 0 does not wait for it, names it and says which last.pt survived."""
    work = stopped(faults, "die")
    errors, last = said(work, 0, "error: "), work / "run" / "last.pt"
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: lost rank 1: its process ended"), errors
    assert errors[0].endswith(f"; {last} (after epoch 1) survived: continue with train.resume={last}"), errors
    assert "Traceback" not in (work / "dump" / "rank0.err").read_text()
    assert codes(work) == [1, None]
    resumable(last)


@pytest.mark.train
def test_an_interrupt_on_rank_1_stops_both_ranks_at_the_same_step(faults: dict) -> None:
    """SIGINT to rank 1 during its step 5: both stop after it, and last.pt holds both ranks' loss sums."""
    work = stopped(faults, "sigint")
    last = work / "run" / "last.pt"
    lines = said(work, 0, "interrupted")
    assert lines == [f"interrupted by SIGINT on rank 1: saved {last} (epoch 2, batch 2); continue with "
                     f"train.resume={last}", "interrupted"], lines  # fmt: skip
    assert not said(work, 1, "interrupted") and not said(work, 0, "error: ")
    assert codes(work) == [130, 130]
    state = load_checkpoint(last)["train_state"]
    assert (state["epoch"], state["batch"]) == (1, 2)
    # the sums of epoch 2's two steps (the criterion's calls 4 and 5) over both ranks
    parts = [torch.load(work / "dump" / f"rank{rank}.pt")["parts"][3:5] for rank in (0, 1)]
    expected = {name: sum(step[name] for steps in parts for step in steps) for name in parts[0][0]}
    assert state["sums"]["batches"] == 4
    assert state["sums"]["parts"] == pytest.approx(expected, rel=1e-12)
    # ... and the run goes on from there (here in one process) to the end of epoch 2
    assert run_tool(load_tool("train_det").main, [f"train.resume={last}", "train.epochs=2"]) == 0
    assert load_checkpoint(last)["epoch"] == 2


@pytest.mark.train
def test_train_cls_interrupt_on_rank_1_saves_both_ranks_sums(faults: dict) -> None:
    """The same for classification: both ranks stop after step 5, last.pt's [loss * n, correct, n] are both ranks'."""
    work = stopped(faults, "cls_sigint")
    last = work / "run" / "last.pt"
    assert said(work, 0, "interrupted") == [f"interrupted by SIGINT on rank 1: saved {last} (epoch 2, batch 2); "
                                            f"continue with train.resume={last}", "interrupted"]  # fmt: skip
    assert not said(work, 1, "interrupted") and codes(work) == [130, 130]
    ckpt = load_checkpoint(last)
    steps = [torch.load(work / "dump" / f"rank{rank}.pt")["parts"][3:5] for rank in (0, 1)]
    expected = [sum(step[k] for rank in steps for step in rank) for k in range(3)]
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 2) and ckpt["sums"] == pytest.approx(expected, rel=1e-12)
