"""detect/train/runs.py: run directories never overwrite, results.csv header once and truncation on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from backbones.errors import UserError
from detect.config import ClsConfig, load_config
from detect.rundirs import make_run_dir
from detect.train.runs import ResultsCSV, save_config


def test_run_dir_suffixes(tmp_path: Path) -> None:
    wanted = tmp_path / "runs" / "cls" / "default"
    first = make_run_dir(wanted)
    assert first == wanted and first.is_dir()
    assert make_run_dir(wanted) == wanted  # still empty: reused
    (first / "last.pt").write_bytes(b"x")
    second = make_run_dir(wanted)
    assert second == tmp_path / "runs" / "cls" / "default-2"
    (second / "results.csv").write_text("epoch\n")
    assert make_run_dir(wanted) == tmp_path / "runs" / "cls" / "default-3"
    assert (first / "last.pt").read_bytes() == b"x"  # nothing overwritten


def test_run_dir_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create run directory"):
        make_run_dir(blocker / "run")


def test_results_csv_append_and_truncate(tmp_path: Path) -> None:
    results = ResultsCSV(tmp_path / "results.csv")
    for epoch in (1, 2, 3):
        results.append({"epoch": epoch, "train/loss": 1.0 / epoch, "val/top1": 0.1 * epoch})
    text = (tmp_path / "results.csv").read_text().splitlines()
    assert text[0] == "epoch,train/loss,val/top1" and len(text) == 4
    assert text[2] == "2,0.5,0.2"
    with pytest.raises(ValueError, match="differ from the header"):
        results.append({"epoch": 4, "loss": 1.0})
    results.truncate(2)
    assert [row["epoch"] for row in results.read()] == ["1", "2"]
    results.append({"epoch": 3, "train/loss": 0.25, "val/top1": 0.5})
    assert [row["val/top1"] for row in results.read()] == ["0.1", "0.2", "0.5"]
    ResultsCSV(tmp_path / "absent.csv").truncate(0)  # no file: nothing to do


def test_save_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(ClsConfig, None, ["train.epochs=4"])
    path = save_config(cfg, tmp_path)
    assert path == tmp_path / "config.yaml"
    reloaded = load_config(ClsConfig, path)
    assert OmegaConf.to_container(reloaded) == OmegaConf.to_container(cfg)


def test_resume_clears_what_a_killed_writer_left(tmp_path: Path) -> None:
    """A writer killed inside atomic_open leaves `.last.pt.<random>.tmp`; the resumed run's prepare_run removes it,
    keeps every real file, and a new run never touches another run's folder."""
    from backbones.checkpoint import atomic_open
    from detect.train.distributed import DistInfo
    from detect.train.runs import prepare_run

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    run = tmp_path / "runs" / "cls" / "default"
    cfg = load_config(ClsConfig, None, [f"output_dir={run}"])
    assert prepare_run(cfg, False, info) == run
    (run / "last.pt").write_bytes(b"good")
    with pytest.raises(RuntimeError), atomic_open(run / "results.csv") as f:  # a failure cleans up by itself
        f.write(b"half")
        raise RuntimeError
    killed = run / ".last.pt.k3j9x1.tmp"  # what kill -9 mid-write leaves (the finally of atomic_open never ran)
    killed.write_bytes(b"half a checkpoint")
    assert prepare_run(cfg, False, info) == run.with_name("default-2")  # a new run: its own folder
    assert killed.exists()
    resumed = load_config(ClsConfig, None, [f"train.resume={run / 'last.pt'}"])
    assert prepare_run(resumed, True, info) == run
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "last.pt"]
    assert (run / "last.pt").read_bytes() == b"good"
