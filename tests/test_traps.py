"""Smaller traps (issue 17, item 3; DESIGN §8): the one line names the way out, and a failed run leaves no folder.

- A raw Ultralytics `.pt` (a pickle of its classes) is refused by every reader with one line naming
  `python tools/import_ultralytics.py FILE`.
- `data=x.yaml` (Ultralytics' spelling) is answered with `data.format=yolo data.yaml=...`, not a `data.yaml` that the
  default `data.format=cub` would refuse next.
- A predict with nothing readable and a val_det stopped by Ctrl-C leave no output folder (nor the parents they made).
- An explicit `--out` / `out=` that exists and is not empty is refused in one line; an empty one is used; the default
  folder is still numbered `-2`, `-3`, ...
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers import load_tool

import detect.eval.validate
from backbones.errors import UserError
from detect.api import load
from detect.cli import run_tool
from detect.config import DetConfig, load_config

_TOOLS: dict[str, ModuleType] = {}


def run(name: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """Exit code and the non-blank stderr lines of one in-process run of tools/<name>.py."""
    if name not in _TOOLS:
        _TOOLS[name] = load_tool(name)
    capsys.readouterr()
    code = run_tool(_TOOLS[name].main, argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def images_of(root: Path, count: int) -> list[Path]:
    return sorted((root / "CUB_200_2011" / "images").rglob("*.jpg"))[:count]


# ----------------------------------------------------------------------------------------------------------------------
# A raw Ultralytics .pt
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ultralytics_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What Ultralytics' trainer saves (a pickled DetectionModel in fp16 beside plain data), 2 classes."""
    from ultralytics.nn import tasks

    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", nc=2, verbose=False).half()
    path = tmp_path_factory.mktemp("ultralytics") / "yolov8n_custom.pt"
    torch.save({"date": "2025-01-01", "version": "8.3.0", "model": model, "ema": None, "train_args": {"imgsz": 64}},
               path)  # fmt: skip
    return path


def ultralytics_line(path: Path, refused: str = "ultralytics.nn.tasks.DetectionModel") -> str:
    return (f"{path} is an Ultralytics checkpoint (a pickle of its Python classes, e.g. {refused}), which plugdet "
            f"does not unpickle: convert it once with `python tools/import_ultralytics.py {path} --out OUT.pt` and "
            "pass OUT.pt instead")  # fmt: skip


def test_raw_ultralytics_pt_names_the_import_tool_everywhere(
    ultralytics_pt: Path, synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    expected = f"error: {ultralytics_line(ultralytics_pt)}"
    image = images_of(synth_cub_root, 1)[0]
    runs = {
        "val_det": ["--weights", str(ultralytics_pt), "--out", str(tmp_path / "val")],
        "predict": ["--weights", str(ultralytics_pt), "--source", str(image), "--out", str(tmp_path / "pred")],
        "train_det": [
            f"data.root={synth_cub_root}",
            "data.img_size=64",
            "train.workers=0",
            "train.epochs=1",
            "model.backbone_weights=null",
            f"model.weights={ultralytics_pt}",
            f"output_dir={tmp_path / 'det'}",
        ],  # fmt: skip
    }
    for name, argv in runs.items():
        assert run(name, argv, capsys) == (2, [expected]), name
    with pytest.raises(UserError) as raised:
        load(ultralytics_pt)
    assert str(raised.value) == ultralytics_line(ultralytics_pt)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was created by any of them


def test_ultralytics_pt_is_named_when_another_global_is_refused_first(tmp_path: Path) -> None:
    """The first refused global can be numpy's (an array saved before the model): the pickle still says Ultralytics."""
    from ultralytics.utils import IterableSimpleNamespace

    path = tmp_path / "mixed.pt"
    torch.save({"array": np.zeros(2), "train_args": IterableSimpleNamespace(imgsz=64)}, path)
    with pytest.raises(UserError) as raised:
        load(path)
    refused = str(raised.value).split("e.g. ", 1)[1].split("),", 1)[0]
    assert refused.startswith("numpy") and str(raised.value) == ultralytics_line(path, refused)


def test_other_code_in_a_pickle_keeps_its_own_refusal(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"when": np.zeros(2)}, path)
    with pytest.raises(UserError) as raised:
        load(path)
    assert str(raised.value).startswith(f"refused to load checkpoint {path}: it would import numpy")
    assert "import_ultralytics" not in str(raised.value)


# ----------------------------------------------------------------------------------------------------------------------
# data= names the format it needs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("data=coco8.yaml", "; did you mean 'data.format=yolo data.yaml=coco8.yaml'? set its keys instead"),
        ("yaml=coco8.yaml", "; did you mean 'data.format=yolo data.yaml=coco8.yaml'? valid top-level keys"),
        ("data.yml=coco8.yaml", "; did you mean 'data.format=yolo data.yaml=coco8.yaml'? valid keys of 'data'"),
        ("train_json=a.json", "; did you mean 'data.format=coco data.train_json=a.json'? valid top-level keys"),
        ("data.roots=/data", "; did you mean 'data.root'? valid keys of 'data'"),  # a plain key: the key alone
    ],
)
def test_a_data_format_key_hint_names_the_format(override: str, hint: str) -> None:
    with pytest.raises(UserError) as raised:
        load_config(DetConfig, None, [override])
    assert hint in str(raised.value)
    assert str(raised.value).count("did you mean") == 1


# ----------------------------------------------------------------------------------------------------------------------
# No empty folder after a failure
# ----------------------------------------------------------------------------------------------------------------------
def test_predict_with_nothing_readable_leaves_no_folder(
    untrained_det_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "in" / "a.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a JPEG" * 50)
    out = tmp_path / "runs" / "mine" / "pred"  # three folders make_run_dir would create
    code, lines = run("predict", ["--weights", str(untrained_det_weights), "--source", str(bad), "--out", str(out)],
                      capsys)  # fmt: skip
    assert code == 2 and lines == [f"warning: skipped cannot read image (corrupt or unsupported format): {bad}",
                                   f"error: none of the 1 input file(s) could be read; the first: {bad}"]  # fmt: skip
    assert not (tmp_path / "runs").exists()
    monkeypatch.chdir(tmp_path)  # the default folder, runs/predict/<name>, goes too
    assert run("predict", ["--weights", str(untrained_det_weights), "--source", str(bad)], capsys)[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_interrupted_val_det_leaves_no_folder(
    untrained_det_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def interrupted(*args: object, **kwargs: object) -> None:
        calls.append(args[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(detect.eval.validate, "evaluate", interrupted)
    out = tmp_path / "runs" / "val"
    code, lines = run("val_det", ["--weights", str(untrained_det_weights), "--out", str(out)], capsys)
    assert (code, lines, len(calls)) == (130, ["interrupted"], 1)
    assert not (tmp_path / "runs").exists()
    out.mkdir(parents=True)  # the user's own empty folder stays, empty
    assert run("val_det", ["--weights", str(untrained_det_weights), "--out", str(out)], capsys)[0] == 130
    assert out.is_dir() and not any(out.iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# An explicit --out is that folder or none
# ----------------------------------------------------------------------------------------------------------------------
def test_predict_explicit_out_that_is_not_empty_is_refused(
    untrained_det_weights: Path, synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    image = images_of(synth_cub_root, 1)[0]
    out = tmp_path / "pred"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--weights", str(untrained_det_weights), "--source", str(image), "--out", str(out)]
    code, lines = run("predict", argv, capsys)
    assert (code, lines) == (2, [f"error: output folder {out} (--out) already exists and is not empty: choose another "
                                 "folder or remove it"])  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"] and sorted(p.name for p in out.iterdir()) == [
        "notes.txt"
    ]
    (out / "notes.txt").unlink()  # an existing empty folder is used as it is
    assert run("predict", argv, capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [image.name, "predictions.json"]
    monkeypatch.chdir(tmp_path)  # without --out: runs/predict/<weights folder>, then -2
    default = ["--weights", str(untrained_det_weights), "--source", str(image)]
    assert run("predict", default, capsys)[0] == 0 and run("predict", default, capsys)[0] == 0
    name = untrained_det_weights.resolve().parent.name
    assert sorted(p.name for p in (tmp_path / "runs" / "predict").iterdir()) == [name, f"{name}-2"]


def test_val_det_and_model_val_explicit_out_that_is_not_empty_is_refused(
    untrained_det_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(detect.eval.validate, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    out = tmp_path / "val"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code, lines = run("val_det", ["--weights", str(untrained_det_weights), "--out", str(out)], capsys)
    line = f"output folder {out} (--out / out=) already exists and is not empty: choose another folder or remove it"
    assert (code, lines) == (2, [f"error: {line}"])
    with pytest.raises(UserError) as raised:
        load(untrained_det_weights).val(out=out, verbose=False)
    assert str(raised.value) == line
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, lines = run("val_det", ["--weights", str(untrained_det_weights), "--out", str(a_file)], capsys)
    assert (code, lines) == (2, [f"error: output folder {a_file} (--out / out=) already exists and is a file: "
                                 "choose another folder or remove it"])  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "val"]
    assert (out / "metrics.json").read_text() == "{}"
    shutil.rmtree(out)
