"""tools/train_cls.py end to end on a tiny synthetic mini-CUB: artefacts, strict backbone.pt, exact resume, errors."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import detect.train.classification
from backbones import build_backbone
from backbones.checkpoint import load_backbone_weights, load_checkpoint
from detect.cli import run_tool
from detect.data.cub import CubClassification

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "train_cls.py"
_spec = importlib.util.spec_from_file_location("train_cls_tool", TOOL)
train_cls = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cls)


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        "data.img_size=64",
        "data.resize_size=72",
        "train.batch_size=8",
        "train.workers=0",
        "train.epochs=2",
        "train.warmup_epochs=0.5",
        f"output_dir={out}",
        *extra,
    ]


@pytest.mark.train
def test_tiny_run_writes_every_artefact(synth_cub_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train_cls.main(_args(synth_cub_root, out)) == 0
    for name in ("config.yaml", "results.csv", "curves.png", "confusion_matrix.png", "per_class_accuracy.csv",
                 "last.pt", "best.pt", "backbone.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,lr,train/loss,train/acc,val/loss,val/top1,val/top5") and len(rows) == 3
    ckpt = load_checkpoint(out / "backbone.pt")
    assert ckpt["arch"] == "cspdarknet_n" and 0.0 <= ckpt["metrics"]["top1"] <= 1.0
    assert ckpt["config"]["data"]["img_size"] == 64
    fresh = build_backbone("cspdarknet_n")
    assert load_backbone_weights(fresh, out / "backbone.pt", arch="cspdarknet_n") == len(fresh.state_dict())
    best = load_checkpoint(out / "best.pt")
    assert len(best["metrics"]["per_class_acc"]) == len(best["class_names"])
    last = load_checkpoint(out / "last.pt")
    assert (last["epoch"], last["batch"]) == (2, 0)
    assert train_cls.main(_args(synth_cub_root, out, "train.epochs=1")) == 0  # a second run never overwrites
    assert (tmp_path / "run-2" / "backbone.pt").is_file()


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    for index, state in a["state"].items():
        for key, value in state.items():
            assert (
                torch.equal(value, b["state"][index][key])
                if torch.is_tensor(value)
                else value == b["state"][index][key]
            )


RESUME_EXTRA = ("train.ema=true", "model.dropout=0.2", "train.epochs=2")


@pytest.fixture(scope="module")
def straight_run(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs without interruption (EMA and dropout on, so their state and the RNG must resume too)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train_cls.main(_args(synth_cub_root, out, *RESUME_EXTRA)) == 0
    return out


def _interrupt_second_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as epoch 2 starts (after epoch 1 was evaluated and saved)."""
    real, calls = detect.train.classification.train_one_epoch, []

    def wrapped(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(detect.train.classification, "train_one_epoch", wrapped)


@pytest.mark.parametrize(
    "stop",
    [
        "epoch-boundary",
        pytest.param("before-eval", marks=pytest.mark.slow),
        pytest.param("mid-epoch", marks=pytest.mark.slow),
    ],
)
@pytest.mark.train
def test_resume_is_bit_identical(
    synth_cub_root: Path,
    straight_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interrupt_cls_after: Callable[[int], contextlib.AbstractContextManager[None]],
    stop: str,
) -> None:
    iters = -(-len(CubClassification(synth_cub_root, "train")) // 8)  # batches per epoch
    resumed = tmp_path / "resumed"
    with contextlib.ExitStack() as stack:
        if stop == "epoch-boundary":
            _interrupt_second_epoch(monkeypatch)
        else:
            stack.enter_context(interrupt_cls_after(iters if stop == "before-eval" else iters + 1))
        with pytest.raises(KeyboardInterrupt):
            train_cls.main(_args(synth_cub_root, resumed, *RESUME_EXTRA))
    monkeypatch.undo()
    partial = load_checkpoint(resumed / "last.pt")
    expected = {"epoch-boundary": (1, 0), "before-eval": (0, iters), "mid-epoch": (1, 1)}[stop]
    assert (partial["epoch"], partial["batch"]) == expected
    assert train_cls.main([f"train.resume={resumed / 'last.pt'}"]) == 0
    a, b = load_checkpoint(straight_run / "last.pt"), load_checkpoint(resumed / "last.pt")
    _same_state(a["model"], b["model"])
    _same_state(a["ema"]["state_dict"], b["ema"]["state_dict"])
    _same_optimizer(a["optimizer"], b["optimizer"])
    assert a["best"] == b["best"] and (b["epoch"], b["batch"]) == (2, 0)
    rows_a = (straight_run / "results.csv").read_text().splitlines()
    rows_b = (resumed / "results.csv").read_text().splitlines()
    assert len(rows_b) == 3 and [r.split(",")[:8] for r in rows_a] == [r.split(",")[:8] for r in rows_b]


def test_bad_input_in_process(synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = run_tool(train_cls.main, _args(synth_cub_root, tmp_path / "r", "model.backbone=nope_net"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: unknown backbone 'nope_net'") and "cspdarknet_n" in err[0]
    code = run_tool(train_cls.main, _args(synth_cub_root, tmp_path / "r", "train.finetune=freeze"))
    assert code == 2 and "freeze_stages" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data.root=/nonexistent/cub"], "/nonexistent/cub"),
        (["train.epochz=3"], "unknown config key 'train.epochz'"),
    ],
)
@pytest.mark.subprocess
def test_bad_input_subprocess(args: list[str], expected: str, tmp_path: Path) -> None:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "MPLCONFIGDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(TOOL), *args, f"output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.train
def test_sigterm_saves_last_pt_and_exits_143(synth_cub_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "MPLCONFIGDIR": str(tmp_path)}
    out = tmp_path / "run"
    args = _args(synth_cub_root, out, "train.epochs=1000", "train.threads=1")
    proc = subprocess.Popen([sys.executable, str(TOOL), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # the first epoch is done: training is under way
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err.decode()[-2000:]
    assert "stopped by SIGTERM" in err.decode()
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] >= 1 and ckpt["config"]["train"]["epochs"] == 1000


def test_run_tool_exit_codes(capsys: pytest.CaptureFixture) -> None:
    from backbones.errors import UserError

    def bad_input(argv: list[str]) -> None:
        raise UserError("unknown thing: somewhere")

    def missing(argv: list[str]) -> None:
        open("/nonexistent/file.txt")  # noqa: SIM115

    def ctrl_c(argv: list[str]) -> None:
        raise KeyboardInterrupt

    assert run_tool(lambda argv: None, []) == 0
    assert run_tool(lambda argv: 3 if argv == ["x"] else 0, ["x", "--debug"]) == 3  # --debug is not passed on
    assert run_tool(bad_input, []) == 2
    assert capsys.readouterr().err == "error: unknown thing: somewhere\n"
    assert run_tool(missing, []) == 2
    assert capsys.readouterr().err == "error: file not found: /nonexistent/file.txt\n"
    assert run_tool(bad_input, ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert run_tool(ctrl_c, []) == 130


def test_signals_are_held_back_to_safe_points() -> None:
    from detect.train.signals import check_interrupt, deferred_interrupts

    reached, before = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            reached.append("end of step")  # the signal waited for the step to finish
        reached.append("not reached")  # raised as the inner block ended
    assert reached == ["end of step"]
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        reached.append("loading")
        check_interrupt()  # a safe point inside the block
        reached.append("not reached")
    assert reached == ["end of step", "loading"]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
