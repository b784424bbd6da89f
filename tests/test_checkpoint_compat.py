"""Checkpoints written before the detector spec (main at 7293d08: `arch` = scale, num_classes, backbone, reg_max; the
config with train.box/cls/dfl and train.amp/bf16, and no loss, assign, imports or neck/head keys) still load in
val_det, predict and the API, and their last.pt resumes with the config keys mapped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_same_evaluation, load_tool

from backbones.checkpoint import atomic_save, load_checkpoint
from detect.checkpoints import load_detector
from detect.cli import run_tool
from detect.train.detection import read_loss_sums


def to_old_format(checkpoint: dict) -> dict:
    """The checkpoint as main at 7293d08 wrote it."""
    old = dict(checkpoint)
    old["arch"] = {"scale": "n", "num_classes": checkpoint["arch"]["num_classes"], "backbone": None, "reg_max": 16}
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in checkpoint["config"].items()}
    loss = config.pop("loss")
    config["train"].update(box=loss["box"], cls=loss["cls"], dfl=loss["dfl"])
    config["train"].pop("precision")
    config["train"].update(amp=True, bf16=False)  # the old detection defaults: fp16 on CUDA, fp32 on a CPU
    for key in ("assign", "imports"):
        config.pop(key)
    for key in ("neck", "head", "backbone_kwargs", "neck_kwargs", "head_kwargs"):
        config["model"].pop(key)
    old["config"] = config
    return old


@pytest.fixture(scope="module")
def runs(trained_det_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's tiny train_det run copied twice: as it is ("new") and with old-format weights ("old") whose
    config says train.box=5.0 (not the default 7.5), to see the old key mapped to loss.box on resume."""
    out = tmp_path_factory.mktemp("compat")
    shutil.copytree(trained_det_run, out / "new")
    shutil.copytree(trained_det_run, out / "old")  # results.csv, config.yaml, ... of the run, then old-format weights
    for name in ("best.pt", "last.pt"):
        old = to_old_format(load_checkpoint(out / "new" / name))
        old["config"]["train"]["box"] = 5.0
        atomic_save(old, out / "old" / name)
    return {"new": out / "new", "old": out / "old", "out": out}


@pytest.mark.train
def test_the_api_loads_an_old_checkpoint_as_the_same_yolov8(runs: dict[str, Path]) -> None:
    old, _ = load_detector(runs["old"] / "best.pt")
    new, _ = load_detector(runs["new"] / "best.pt")
    images = torch.rand(2, 3, 64, 96)
    assert torch.equal(old(images), new(images))


@pytest.mark.train
def test_val_det_and_predict_read_an_old_checkpoint(runs: dict[str, Path], synth_cub_root: Path) -> None:
    for kind in ("old", "new"):
        argv = ["--weights", str(runs[kind] / "best.pt"), "--out", str(runs["out"] / f"val-{kind}")]
        assert run_tool(load_tool("val_det").main, argv) == 0
    old, new = (json.loads((runs["out"] / f"val-{k}" / "metrics.json").read_text()) for k in ("old", "new"))
    assert old["coco_stats"] == new["coco_stats"]
    assert_same_evaluation(new, load_checkpoint(runs["new"] / "best.pt")["metrics"])
    images = str(synth_cub_root / "CUB_200_2011" / "images" / "*" / "*_0000.jpg")
    argv = ["--weights", str(runs["old"] / "best.pt"), "--source", images, "--out", str(runs["out"] / "pred")]
    assert run_tool(load_tool("predict").main, argv) == 0
    assert len(json.loads((runs["out"] / "pred" / "predictions.json").read_text())) == 4


@pytest.mark.train
def test_an_old_last_pt_resumes_with_its_keys_mapped(runs: dict[str, Path]) -> None:
    argv = [f"train.resume={runs['old'] / 'last.pt'}", "train.epochs=2"]
    assert run_tool(load_tool("train_det").main, argv) == 0
    resumed = load_checkpoint(runs["old"] / "last.pt")
    assert resumed["train_state"]["epoch"] == 2 and resumed["arch"]["head"]["name"] == "yolov8"
    assert resumed["config"]["loss"]["box"] == 5.0 and "box" not in resumed["config"]["train"]
    assert resumed["config"]["train"]["precision"] == "fp16" and "amp" not in resumed["config"]["train"]
    assert len((runs["old"] / "results.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs


def test_old_partial_loss_sums_read_as_the_yolov8_parts() -> None:
    assert read_loss_sums([1.5, 0.5, 2.0, 3]) == {"parts": {"box": 1.5, "cls": 0.5, "dfl": 2.0}, "batches": 3}
    assert read_loss_sums(None) is None
    state = {"parts": {"a": 1.0}, "batches": 1}
    assert read_loss_sums(state) == state


@pytest.mark.train
def test_model_weights_fine_tunes_a_whole_detector_to_other_classes(
    runs: dict[str, Path], synth_cub_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`model.weights` initialises every tensor of the same shape from a detector checkpoint (here one in the old
    format, trained on 1 class); the class layers of a 4-species model keep their initialisation."""
    out = runs["out"] / "finetune"
    argv = [f"data.root={synth_cub_root}", "data.labels=species", "data.img_size=64", "train.epochs=1",
            "train.batch_size=4", "train.workers=0", "train.close_mosaic=0", "model.backbone_weights=null",
            f"model.weights={runs['old'] / 'best.pt'}", "train.lr=0", "train.warmup_bias_lr=0", "train.ema=false",
            f"output_dir={out}"]  # fmt: skip
    with caplog.at_level("INFO", logger="plugdet"):
        assert run_tool(load_tool("train_det").main, argv) == 0
    source = load_checkpoint(runs["old"] / "best.pt")["model"]
    tuned = load_checkpoint(out / "last.pt")["model"]
    reshaped = [k for k in tuned if tuned[k].shape != source[k].shape]
    assert reshaped == [f"head.cls_branch.{level}.pred.{p}" for level in range(3) for p in ("weight", "bias")]
    conv = "backbone.stem.conv.weight"
    assert torch.equal(tuned[conv], source[conv])  # lr 0: the copied weights are still there after an epoch
    assert any("model.weights: copied" in r.getMessage() and "kept 6 of other shapes" in r.getMessage()
               for r in caplog.records)  # fmt: skip


@pytest.mark.train
def test_model_weights_of_another_architecture_is_one_line(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    argv = ["model.backbone=resnet18", "model.backbone_weights=null", f"model.weights={runs['new'] / 'best.pt'}",
            f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert run_tool(load_tool("train_det").main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the checkpoint has no 'backbone." in err[0] and "another architecture" in err[0]
