"""`train.precision` (auto | fp32 | bf16 | fp16) and the tools' `--precision`: what auto picks on which hardware and
says in the log, the moved `train.amp` / `train.bf16` keys, old checkpoints' configs, and the flags' disagreements.

The suite pins auto to fp32 (tests/conftest.py, `PLUGDET_AUTO_PRECISION`); the tests of auto itself unset it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_tool

from backbones.errors import UserError
from detect import precision
from detect.cli import inference_precision, run_tool
from detect.config import ClsConfig, DetConfig, load_config
from detect.config.loading import migrate_config
from detect.train.classify import autocast_dtype


@pytest.fixture
def unpinned(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """auto as a user gets it (the suite's pin removed), warnings shown again."""
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)
    monkeypatch.setattr(precision, "_WARNED", set())
    return monkeypatch


@pytest.mark.parametrize(
    ("asked", "device", "native", "runs", "warns"),
    [
        ("auto", "cpu", True, "bf16", False),  # AMX / AVX-512 BF16: bf16 autocast
        ("auto", "cpu", False, "fp32", False),  # AVX2: emulated bf16 is 7-10x slower
        ("auto", "cuda", True, "fp16", False),  # CUDA: fp16 autocast + GradScaler
        ("bf16", "cpu", True, "bf16", False),
        ("bf16", "cpu", False, "fp32", True),
        ("fp16", "cpu", True, "fp32", True),  # CPU fp16 autocast is emulated
        ("fp16", "cuda", True, "fp16", False),
        ("bf16", "cuda", False, "fp16", True),  # a GPU without bf16
        ("fp32", "cpu", True, "fp32", False),
    ],
)
def test_what_each_choice_runs_in_on_each_device(unpinned, capsys, asked, device, native, runs, warns) -> None:
    unpinned.setattr(precision, "native_bf16", lambda device="cpu": native)
    name, why = precision.choose_precision(asked, device)
    assert name == runs
    assert ("warning:" in capsys.readouterr().err) == warns
    assert why.startswith("auto:" if asked == "auto" else f"train.precision={asked}")


def test_auto_on_this_machine_follows_its_cpu(unpinned) -> None:
    expected = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert precision.choose_precision("auto", "cpu")[0] == expected


def test_the_pin_decides_auto_and_a_bad_pin_is_one_line(unpinned) -> None:
    unpinned.setattr(precision, "native_bf16", lambda device="cpu": True)
    unpinned.setenv(precision.AUTO_ENV, "fp32")
    assert precision.choose_precision("auto", "cpu") == ("fp32", "auto, pinned by PLUGDET_AUTO_PRECISION=fp32")
    assert precision.choose_precision("bf16", "cpu")[0] == "bf16"  # the pin is auto's only
    unpinned.setenv(precision.AUTO_ENV, "int8")
    with pytest.raises(UserError, match="PLUGDET_AUTO_PRECISION='int8': choose one of fp32, bf16, fp16"):
        precision.choose_precision("auto", "cpu")


def test_pretraining_auto_stays_fp32_on_a_bf16_cpu(unpinned) -> None:
    """train_cls's auto: fp32 on a CPU with native bf16 (bf16 trained the default schedule to ~0.1 lower top-1),
    fp16 on CUDA as detection's; an explicit bf16 is kept."""
    unpinned.setattr(precision, "native_bf16", lambda device="cpu": True)
    cfg = load_config(ClsConfig, None, [])
    dtype, line = autocast_dtype(cfg, torch.device("cpu"))
    cpu = torch.backends.cpu.get_cpu_capability()
    assert (dtype, line) == (None, f"precision: fp32 (auto: fp32 on CPU (bf16 is native on this CPU ({cpu}) but "
                                   "trains this to a lower accuracy))")  # fmt: skip
    assert autocast_dtype(cfg, torch.device("cuda"))[0] == torch.float16
    asked = load_config(ClsConfig, None, ["train.precision=bf16"])
    assert autocast_dtype(asked, torch.device("cpu"))[0] == torch.bfloat16
    assert precision.choose_precision("auto", "cpu")[0] == "bf16"  # detection's auto is unchanged
    unpinned.setattr(precision, "AUTO_CPU_BF16_CLS", True)  # the knob is read at each call
    assert autocast_dtype(cfg, torch.device("cpu"))[0] == torch.bfloat16


def test_the_training_precision_and_its_scaler_settings(unpinned) -> None:
    unpinned.setattr(precision, "native_bf16", lambda device="cpu": True)
    loop, line = precision.training_precision(torch.device("cpu"), "auto", channels_last=True)
    assert (loop.amp, loop.bf16, loop.channels_last) == (False, True, True)
    assert line == f"precision: bf16 (auto: this CPU ({torch.backends.cpu.get_cpu_capability()}) has native bf16)"
    loop, _ = precision.training_precision(torch.device("cuda"), "auto", channels_last=False)
    assert (loop.amp, loop.bf16) == (True, False)  # fp16 autocast, so the run builds a GradScaler


@pytest.mark.parametrize("schema", [DetConfig, ClsConfig])
@pytest.mark.parametrize(("old", "new"), [("train.bf16=true", "bf16"), ("train.amp=true", "fp16"),
                                          ("train.bf16=false", "fp32")])  # fmt: skip
def test_the_old_keys_are_the_moved_key_line(schema, old, new) -> None:
    with pytest.raises(UserError) as error:
        load_config(schema, None, [old])
    key = old.split("=")[0]
    assert str(error.value) == (f"config key {key!r} in override {old!r} is now 'train.precision': rename it "
                                f"(train.precision={new})")  # fmt: skip


def test_an_old_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  epochs: 2\n  bf16: true\n")
    with pytest.raises(UserError, match=r"config key 'train.bf16' .*old.yaml.* is now 'train.precision'"):
        load_config(DetConfig, str(path), [])


@pytest.mark.parametrize(("amp", "bf16", "new"), [(True, False, "fp16"), (True, True, "bf16"), (False, True, "bf16"),
                                                  (False, False, "fp32")])  # fmt: skip
def test_a_saved_config_maps_to_what_it_ran_in(amp, bf16, new) -> None:
    saved = {"train": {"epochs": 3, "amp": amp, "bf16": bf16}, "seed": 1}
    assert migrate_config(saved) == {"train": {"epochs": 3, "precision": new}, "seed": 1}
    assert saved["train"]["amp"] is amp  # the checkpoint's dict is not changed
    assert load_config(DetConfig, None, [], base=migrate_config(saved)).train.precision == new


def test_val_det_evaluates_in_what_the_checkpoint_trained_in(unpinned) -> None:
    unpinned.setattr(precision, "native_bf16", lambda device="cpu": True)
    assert precision.trained_precision("auto", "cpu") == "bf16"
    assert precision.trained_precision("fp16", "cpu") == "fp32"  # an old CUDA-amp (or CPU) run: it trained fp32 here
    assert precision.trained_precision("fp16", "cuda") == "fp16"
    assert precision.trained_precision("bf16", "cpu") == "bf16"
    unpinned.setattr(precision, "native_bf16", lambda device="cpu": False)
    assert precision.trained_precision("auto", "cpu") == "fp32"


def test_bf16_flag_and_precision_flag() -> None:
    assert inference_precision(None, False) == "fp32" and inference_precision(None, False, default=None) is None
    assert inference_precision(None, True) == "bf16" and inference_precision("bf16", True) == "bf16"
    assert inference_precision("auto", False) == "auto"
    with pytest.raises(UserError, match="--bf16 and --precision fp32 disagree"):
        inference_precision("fp32", True)


def test_export_refuses_bf16_and_reads_auto(untrained_det_weights: Path, tmp_path: Path, capsys) -> None:
    export = load_tool("export")
    assert export.export_half("auto", False, "cuda") and not export.export_half("auto", False, "cpu")
    assert export.export_half("fp16", False, "cpu") and export.export_half(None, True, "cpu")
    argv = ["--weights", str(untrained_det_weights), "--precision", "bf16", "--out", str(tmp_path / "m.onnx")]
    assert run_tool(export.main, argv) == 2
    assert "--precision bf16 is not an export precision" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.train
def test_a_run_says_what_auto_chose_and_why(synth_cub_root: Path, tmp_path: Path, unpinned, capsys) -> None:
    argv = [f"data.root={synth_cub_root}", "data.img_size=64", "train.epochs=1", "train.batch_size=4",
            "train.workers=0", "model.backbone_weights=null", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert run_tool(load_tool("train_det").main, argv) == 0
    name, why = precision.choose_precision("auto", "cpu")
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index(next(x for x in lines if x.startswith("train_det:"))) + 1] == f"precision: {name} ({why})"
