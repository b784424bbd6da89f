"""Faults a run meets from its surroundings (issue 12): a full disk, a vanished run folder, a loader worker killed
or raising, container memory limits, signals at awkward moments, file modes, half-made run folders.

Each fault must give one `error:` line saying what happened, what survived and how to go on, an exit code other than
0, and leave the previous last.pt / best.pt loadable. The full disk is a real 3 MB tmpfs where the test may mount one
(root); elsewhere the same writes fail by an injected `OSError(ENOSPC)`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import load_tool

import backbones.checkpoint as checkpoint_module
import detect.train.classification
import detect.train.detection
import detect.train.lifecycle
from backbones.checkpoint import atomic_save, atomic_write_bytes, load_checkpoint
from backbones.errors import OutputError
from detect.cli import run_tool
from detect.rundirs import discard_run_dir, make_run_dir
from detect.train.failures import loader_failure
from detect.train.memory import available_memory, cgroup_memory_left
from detect.train.runs import ResultsCSV

REPO = Path(__file__).resolve().parents[1]


def tool(name: str) -> ModuleType:
    return load_tool(name)


def run(module: ModuleType, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], str]:
    """Exit code, the `error:` lines on stderr, and stdout of one in-process tool run."""
    capsys.readouterr()
    code = run_tool(module.main, argv)
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.startswith("error: ")], captured.out


def det_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.img_size=64", "train.epochs=2", "train.batch_size=4", "train.workers=0",
            "train.threads=1", "model.backbone_weights=null", "train.close_mosaic=0", f"output_dir={out}",
            *extra]  # fmt: skip


def cls_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.img_size=32", "data.resize_size=36", "train.epochs=2", "train.batch_size=8",
            "train.workers=0", "train.threads=1", f"output_dir={out}", *extra]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(folder: Path, size: str = "3m") -> Iterator[bool]:
    """Mount a tmpfs of `size` at `folder` (root only); yields whether it is a real small file system."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True)  # fmt: skip
        mounted = result.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the file system holding `folder` until a write fails with ENOSPC."""
    with open(folder / "filler.bin", "wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * (256 * 1024))
            handle.flush()


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, callable]]:
    """(a folder, `make_full()`): after `make_full()` every write under the folder fails with ENOSPC, on a real
    filled tmpfs where one can be mounted, else by injection into the atomic writer and results.csv."""
    folder = tmp_path / "disk"
    with small_disk(folder, "160m") as real:  # yolov8n last.pt with its training state: ~50 MB

        def make_full() -> None:
            if real:
                fill(folder)
                return

            def no_space(self: object, data: object) -> int:
                self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise self.error

            monkeypatch.setattr(checkpoint_module._RecordingFile, "write", no_space)

        yield folder, make_full


def test_every_atomic_writer_on_a_full_disk_keeps_the_old_file(full_disk: tuple[Path, callable]) -> None:
    """Checkpoint, json, csv and picture writers: one line naming the file and ENOSPC; old file intact; no temp."""
    from matplotlib.figure import Figure

    from detect.eval.viz import _save_figure as save_figure

    folder, make_full = full_disk
    ckpt, json_file, csv_file, png = folder / "last.pt", folder / "m.json", folder / "results.csv", folder / "c.png"
    atomic_save({"version": 1, "weights": torch.ones(1000)}, ckpt)
    atomic_write_bytes(b'{"AP": 0.5}', json_file)
    ResultsCSV(csv_file).append({"epoch": 1, "loss": 1.0})
    make_full()
    big = {"version": 2, "weights": torch.ones(2_000_000)}  # 8 MB: more than any room left
    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    writes = [lambda: atomic_save(big, ckpt), lambda: atomic_write_bytes(b"x" * 8_000_000, json_file),
              lambda: ResultsCSV(csv_file).append({"epoch": 2, "loss": 0.5}),
              lambda: save_figure(figure, png)]  # fmt: skip
    for path, write in zip((ckpt, json_file, csv_file, png), writes, strict=True):
        with pytest.raises(OutputError) as info:
            write()
        message = str(info.value)
        assert message.startswith(f"cannot write {path}: no space left on device (ENOSPC)"), message
        assert "\n" not in message
    assert load_checkpoint(ckpt)["version"] == 1
    assert json_file.read_bytes() == b'{"AP": 0.5}'
    assert ResultsCSV(csv_file).read() == [{"epoch": "1", "loss": "1"}]
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.train
def test_train_det_on_a_disk_that_fills_up_after_epoch_1(
    synth_cub_root: Path, full_disk: tuple[Path, callable], capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    folder, make_full = full_disk
    train_det = tool("train_det")
    real_end = detect.train.detection.end_epoch

    def end_then_fill(run: object, epoch: int, stats: dict, start: float) -> None:
        real_end(run, epoch, stats, start)
        if epoch == 0:
            make_full()

    monkeypatch.setattr(detect.train.detection, "end_epoch", end_then_fill)
    out = folder / "run"
    code, errors, _ = run(train_det, det_args(synth_cub_root, out, "eval.interval=1"), capsys)
    assert code == 1 and len(errors) == 1, errors
    assert "no space left on device" in errors[0] and f"cannot write {out}/" in errors[0], errors
    assert f"{out / 'last.pt'} (after epoch 1) survived: continue with train.resume={out / 'last.pt'}" in errors[0]
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and load_checkpoint(out / "best.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp"))


@pytest.mark.train
def test_run_folder_vanishing_mid_run(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    train_det = tool("train_det")
    real_end = detect.train.detection.end_epoch

    def end_then_delete(run: object, epoch: int, stats: dict, start: float) -> None:
        real_end(run, epoch, stats, start)
        shutil.rmtree(run.run_dir)

    monkeypatch.setattr(detect.train.detection, "end_epoch", end_then_delete)
    out = tmp_path / "run"
    code, errors, _ = run(train_det, det_args(synth_cub_root, out), capsys)
    assert code == 1 and errors == [
        f"error: the run directory {out} vanished during the run; nothing more can be "
        f"saved there; {out / 'last.pt'} (after epoch 1) is gone with its folder"
    ], errors
    assert not out.exists()  # not silently re-created


# ----------------------------------------------------------------------------------------------------------------------
# Loader workers that die or raise
# ----------------------------------------------------------------------------------------------------------------------
def _killing(cls: type, at_epoch: int, index: int, raise_instead: bool = False) -> object:
    """A replacement `__getitem__` for `cls` that kills its own worker (SIGKILL, as the OOM killer does) or raises
    when it loads sample `index` of epoch `at_epoch` (0-based; validation samples count as epoch 0)."""
    real = cls.__getitem__

    def getitem(self: object, item: object) -> object:
        sample, epoch = item if isinstance(item, tuple) else (item, 0)
        if torch.utils.data.get_worker_info() is not None and sample == index and epoch == at_epoch:
            if raise_instead:
                raise ValueError("bad pixel data")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, item)

    return getitem


@pytest.mark.parametrize("how", ["kill", "raise"])
@pytest.mark.train
def test_train_det_loader_worker_dies(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    from detect.data.detection import DetectionDataset

    monkeypatch.setattr(DetectionDataset, "__getitem__", _killing(DetectionDataset, 1, 3, how == "raise"))
    out = tmp_path / "run"
    start = time.monotonic()
    code, errors, _ = run(tool("train_det"), det_args(synth_cub_root, out, "train.workers=2"), capsys)
    assert time.monotonic() - start < 120  # no hang
    assert code == 1 and len(errors) == 1, errors
    if how == "kill":
        assert "error: loader worker " in errors[0] and "was killed by signal SIGKILL" in errors[0], errors
    else:
        assert "raised ValueError: bad pixel data (sample index 3)" in errors[0], errors
    assert f"{out / 'last.pt'} (after epoch 1) survived: continue with train.resume={out / 'last.pt'}" in errors[0]
    assert "train.workers" in errors[0] and "data.cache=false" in errors[0]
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


@pytest.mark.train
def test_train_cls_loader_worker_killed(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detect.train import classify

    real = classify.SeededSamples.__getitem__

    def getitem(self: object, item: object) -> object:
        index, epoch = item
        if torch.utils.data.get_worker_info() is not None and epoch == 1:  # validation samples are epoch 0
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, item)

    monkeypatch.setattr(classify.SeededSamples, "__getitem__", getitem)
    out = tmp_path / "run"
    code, errors, _ = run(tool("train_cls"), cls_args(synth_cub_root, out, "train.workers=2"), capsys)
    assert code == 1 and len(errors) == 1 and "was killed by signal SIGKILL" in errors[0], errors
    assert f"{out / 'last.pt'} (after epoch 1) survived" in errors[0] and "train.workers" in errors[0]
    assert "data.cache" not in errors[0]  # no such key in classification


@pytest.mark.train
def test_val_det_loader_worker_killed(
    trained_det_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from detect.data.detection import DetectionDataset

    out = trained_det_run
    monkeypatch.setattr(DetectionDataset, "__getitem__", _killing(DetectionDataset, 0, 2))
    code, errors, _ = run(tool("val_det"), ["--weights", str(out / "best.pt"), "--out", str(tmp_path / "val"),
                                            "train.workers=2"], capsys)  # fmt: skip
    assert code == 1 and len(errors) == 1 and "error: loader worker" in errors[0], errors
    assert "SIGKILL" in errors[0] or "exited unexpectedly" in errors[0], errors
    assert "train.workers" in errors[0]


def test_loader_failure_lines() -> None:
    killed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    assert loader_failure(killed, [4241, 4242]) == (
        "loader worker 1 (pid 4242) was killed by signal SIGKILL (Killed: the out-of-memory killer sends it)"
    )
    assert loader_failure(RuntimeError("DataLoader worker (pid(s) 7) exited unexpectedly")) == (
        "loader worker (pid 7) exited unexpectedly (killed, or crashed)"
    )
    raised = KeyError("Caught KeyError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                      '  File "x.py", line 1, in f\nKeyError: \'box\'\n(sample index 9)\n')  # fmt: skip
    assert loader_failure(raised) == "loader worker 1 raised KeyError: 'box' (sample index 9)"
    assert loader_failure(RuntimeError("CUDA out of memory")) is None


# ----------------------------------------------------------------------------------------------------------------------
# Memory limits of containers
# ----------------------------------------------------------------------------------------------------------------------
def _fake_system(tmp_path: Path, cgroup_line: str, files: dict[str, str], available_kb: int = 8_000_000) -> tuple:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 16000000 kB\nMemAvailable: {available_kb} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return proc, root


def test_cgroup_v2_limit_is_taken_when_smaller(tmp_path: Path) -> None:
    proc, root = _fake_system(tmp_path, "0::/job\n", {"job/memory.max": "2000000000\n",
                                                       "job/memory.current": "500000000\n"})  # fmt: skip
    assert cgroup_memory_left(proc, root) == 1_500_000_000
    assert available_memory(proc, root) == 1_500_000_000  # < MemAvailable's 8.19 GB


def test_cgroup_v2_parent_limit_and_max(tmp_path: Path) -> None:
    files = {"a/b/memory.max": "max\n", "a/b/memory.current": "10\n", "a/memory.max": "1000\n",
             "a/memory.current": "400\n"}  # fmt: skip
    proc, root = _fake_system(tmp_path, "0::/a/b\n", files)
    assert cgroup_memory_left(proc, root) == 600


def test_cgroup_v1_and_host_smaller(tmp_path: Path) -> None:
    proc, root = _fake_system(tmp_path, "5:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n",
                              {"memory/docker/x/memory.limit_in_bytes": "4000000000\n",
                               "memory/docker/x/memory.usage_in_bytes": "1000000000\n"}, available_kb=1000)  # fmt: skip
    assert cgroup_memory_left(proc, root) == 3_000_000_000
    assert available_memory(proc, root) == 1000 * 1024  # the host has less than the limit leaves


def test_no_cgroup_limit(tmp_path: Path) -> None:
    proc, root = _fake_system(tmp_path, "0::/\n", {"memory.max": "max\n"})
    assert cgroup_memory_left(proc, root) is None and available_memory(proc, root) == 8_000_000 * 1024
    v1_unlimited = _fake_system(tmp_path / "v1", "4:memory:/\n", {"memory/memory.limit_in_bytes":
                                                                 "9223372036854771712\n"})  # fmt: skip
    assert cgroup_memory_left(*v1_unlimited) is None


# ----------------------------------------------------------------------------------------------------------------------
# Signals at awkward moments
# ----------------------------------------------------------------------------------------------------------------------
class SignalsDuringLoss:
    """Wraps the detection criterion: `count` real SIGINTs to this process, 50 ms apart, during its `at`-th call."""

    def __init__(self, criterion: object, at: int, count: int) -> None:
        self.criterion, self.at, self.count, self.calls = criterion, at, count, 0

    def __call__(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> tuple:
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.count):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        return self.criterion(outputs, targets)


@pytest.mark.train
def test_two_ctrl_c_50_ms_apart_still_save_last_pt(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_det = tool("train_det")
    build = detect.train.detection.build_det_criterion
    monkeypatch.setattr(
        detect.train.detection, "build_det_criterion", lambda cfg, model: SignalsDuringLoss(build(cfg, model), 2, 2)
    )
    out = tmp_path / "run"
    capsys.readouterr()
    assert run_tool(train_det.main, det_args(synth_cub_root, out)) == 130
    err = capsys.readouterr().err
    assert f"interrupted: saved {out / 'last.pt'} (epoch 1, batch 2)" in err
    state = load_checkpoint(out / "last.pt")["train_state"]
    assert (state["epoch"], state["batch"]) == (0, 2)


@pytest.mark.train
def test_a_signal_during_the_save_after_an_interrupt(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_det = tool("train_det")
    build, real_save = detect.train.detection.build_det_criterion, detect.train.lifecycle.atomic_save
    monkeypatch.setattr(
        detect.train.detection, "build_det_criterion", lambda cfg, model: SignalsDuringLoss(build(cfg, model), 2, 1)
    )

    def save_under_fire(obj: object, path: Path) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        real_save(obj, path)

    monkeypatch.setattr(detect.train.lifecycle, "atomic_save", save_under_fire)  # the save after the interrupt
    out = tmp_path / "run"
    assert run_tool(train_det.main, det_args(synth_cub_root, out)) == 130
    assert load_checkpoint(out / "last.pt")["train_state"]["batch"] == 2


@pytest.mark.train
def test_three_signals_stop_at_once_and_say_last_pt_was_not_updated(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_det = tool("train_det")
    build = detect.train.detection.build_det_criterion
    monkeypatch.setattr(
        detect.train.detection, "build_det_criterion", lambda cfg, model: SignalsDuringLoss(build(cfg, model), 2, 3)
    )
    out = tmp_path / "run"
    capsys.readouterr()
    assert run_tool(train_det.main, det_args(synth_cub_root, out)) == 130
    err = capsys.readouterr().err
    assert "stopped at once by a third signal" in err and "last.pt was not updated" in err
    assert "no last.pt was written" in err
    assert not out.exists()  # nothing half-made left


@pytest.mark.parametrize("which", ["train_det", "train_cls"])
@pytest.mark.train
def test_sigterm_just_after_the_last_epoch(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """The signal lands while the last epoch's files are written: no "epoch 3" of a 2-epoch run, `done:` prints."""
    module = tool(which)
    run_module = detect.train.detection if which == "train_det" else detect.train.classification
    name = "end_epoch" if which == "train_det" else "record_epoch"
    real = getattr(run_module, name)

    def then_sigterm(*args: object) -> object:
        result = real(*args)
        if args[1] == 1:  # the last (second) epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(run_module, name, then_sigterm)
    out = tmp_path / "run"
    capsys.readouterr()
    argv = (det_args if which == "train_det" else cls_args)(synth_cub_root, out)
    assert run_tool(module.main, argv) == 0
    captured = capsys.readouterr()
    assert "done: best" in captured.out and "epoch 3" not in captured.out + captured.err
    assert "the run is complete, nothing lost" in captured.err and "interrupted: saved" not in captured.err
    assert load_checkpoint(out / "last.pt") is not None


# ----------------------------------------------------------------------------------------------------------------------
# Files and folders
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_bytes(b"x", tmp_path / "a.json")
        atomic_save({"a": 1}, tmp_path / "b.pt")
    finally:
        os.umask(previous)
    for name in ("a.json", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_failed_new_run_leaves_no_folder_but_a_resumed_or_saved_one_stays(tmp_path: Path) -> None:
    fresh = make_run_dir(tmp_path / "runs" / "det" / "x")
    (fresh / "config.yaml").write_text("a: 1\n")
    assert discard_run_dir(fresh) and not (tmp_path / "runs").exists()  # the parents it made go too
    kept = make_run_dir(tmp_path / "k")
    (kept / "last.pt").write_bytes(b"x")
    assert not discard_run_dir(kept) and (kept / "last.pt").exists()
    users = tmp_path / "users_empty"
    users.mkdir()
    run_dir = make_run_dir(users)
    (run_dir / "results.csv").write_text("epoch\n")
    discard_run_dir(run_dir)
    assert users.is_dir() and not any(users.iterdir())  # the user's own folder stays, empty as it was
    assert not discard_run_dir(tmp_path)  # never one this process did not make


@pytest.mark.train
def test_non_finite_loss_in_the_first_epoch_leaves_no_run_folder(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_det = tool("train_det")
    build = detect.train.detection.build_det_criterion

    def nan_criterion(cfg: object, model: object) -> object:
        criterion = build(cfg, model)
        return lambda outputs, targets: tuple(
            (total * float("nan"), {k: v * float("nan") for k, v in parts.items()})
            for total, parts in [criterion(outputs, targets)]
        )[0]

    monkeypatch.setattr(detect.train.detection, "build_det_criterion", nan_criterion)
    out = tmp_path / "run"
    code, errors, _ = run(train_det, det_args(synth_cub_root, out), capsys)
    assert code == 2 and "non-finite loss" in errors[0]
    assert not out.exists()


@pytest.mark.train
def test_no_best_ap_before_the_first_evaluation(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, out = run(tool("train_det"), det_args(synth_cub_root, tmp_path / "run", "eval.interval=2"), capsys)
    assert code == 0
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert "best AP" not in epochs[0] and "-1.0000" not in out and "best AP" in epochs[1], epochs
