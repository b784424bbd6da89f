"""Hostile files (DESIGN §3, §8): a checkpoint is data, never code; paths in data cannot steer writes.

- Every `torch.load(` in the source tree passes `weights_only=True` (the one documented exception is
  `detect/interop/ultralytics.py`'s explicit `trust_pickle=True` opt-in).
- A crafted pickle passed as `--weights`, `model.backbone_weights` or `train.resume` is refused with one line, and
  its payload (creating a file) never runs.
- Tools write only inside their output directory, whatever `..` the inputs' paths hold.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import load_tool

from detect.cli import run_tool
from detect.data.coco import coco_ground_truth
from detect.data.cub import CubDetection

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("backbones", "detect", "tools", "bench")
TRUSTED_LOADERS = {"detect/interop/ultralytics.py"}  # documents its opt-in `weights_only=False` (trust_pickle=True)


def tool(name: str) -> ModuleType:
    return load_tool(name)


def run(name: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = run_tool(tool(name).main, argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------------
def _torch_load_calls(path: Path) -> list[ast.Call]:
    """Calls of `torch.load(...)` / `torch.serialization.load(...)` / a bare `load` imported from torch."""
    tree = ast.parse(path.read_text(), filename=str(path))
    from_torch = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization")
        for alias in node.names
        if alias.name == "load"
    }
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        bare = isinstance(func, ast.Name) and func.id in from_torch
        if bare or ast.unparse(func) in ("torch.load", "torch.serialization.load"):
            calls.append(node)
    return calls


def test_every_torch_load_is_data_only() -> None:
    checked, offenders = 0, []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            for call in _torch_load_calls(path):
                checked += 1
                flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
                safe = isinstance(flag, ast.Constant) and flag.value is True
                if not safe and relative not in TRUSTED_LOADERS:
                    offenders.append(f"{relative}:{call.lineno}: {ast.unparse(call)}")
    assert checked >= 1  # the scan does find backbones/checkpoint.py's load
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)


def test_the_grep_catches_an_unsafe_load(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nfrom torch import load as L\n"
        "a = torch.load('x', weights_only=True)\nb = torch.load('x')\nc = L('x', weights_only=False)\n"
    )
    calls = _torch_load_calls(sample)
    unsafe = [c.lineno for c in calls if not any(k.arg == "weights_only" and ast.unparse(k.value) == "True"
                                                 for k in c.keywords)]  # fmt: skip
    assert len(calls) == 3 and unsafe == [4, 5]


# ----------------------------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(params=["torch.save", "pickle"])
def crafted(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """(a hostile checkpoint shaped like ours, the file its payload would create)."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    payload = {"kind": "plugdet-detector", "arch": {}, "model": {}, "state_dict": {}, "x": Payload(marker)}
    if request.param == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path, marker


def test_crafted_pickle_is_refused_everywhere_and_never_runs(
    crafted: tuple[Path, Path], synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    evil, marker = crafted
    image = next((synth_cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    det = [f"data.root={synth_cub_root}", "data.img_size=64", "train.epochs=1", "train.workers=0",
           f"output_dir={tmp_path / 'det'}"]  # fmt: skip
    cls = [f"data.root={synth_cub_root}", "data.img_size=32", "train.workers=0", f"output_dir={tmp_path / 'cls'}"]
    runs = [
        ("val_det", ["--weights", str(evil), "--out", str(tmp_path / "val")]),
        ("predict", ["--weights", str(evil), "--source", str(image), "--out", str(tmp_path / "pred")]),
        ("train_det", [*det, f"model.backbone_weights={evil}"]),
        ("train_det", [*det, f"train.resume={evil}"]),
        ("train_cls", [*cls, f"model.backbone_weights={evil}"]),
        ("train_cls", [*cls, f"train.resume={evil}"]),
    ]
    for name, argv in runs:
        code, lines = run(name, argv, capsys)
        assert code == 2 and len(lines) == 1, (name, argv, lines)
        assert lines[0].startswith("error: ") and str(evil) in lines[0], lines
        # torch.save keeps pickle's GLOBAL opcode (named); protocol-2 raw pickles too; both are refused
        assert "refused to load checkpoint" in lines[0] or "not a PyTorch checkpoint of tensors" in lines[0], lines
        assert not marker.exists(), f"{name} ran the payload"
    assert not any((tmp_path / d).exists() for d in ("val", "pred", "det"))


# ----------------------------------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_predict_writes_only_inside_out_whatever_the_input_paths(
    synth_cub_root: Path, untrained_det_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Folders reached through `..`, repeated file names, a file named `..jpg`: every output lands in --out."""
    images = sorted((synth_cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    work = tmp_path / "work"
    for folder in ("a", "b", "c/a", "d/a"):
        (work / folder).mkdir(parents=True)
        shutil.copy(images[0], work / folder / "x.jpg")
    shutil.copy(images[1], work / "a" / "..jpg")
    sandbox = tmp_path / "sandbox"
    before = _snapshot(tmp_path)
    sources = {"out1": f"{work}/b/../a", "out2": f"{work}/c/../a/../b/*.jpg", "out3": f"{work}/**/*.jpg"}
    for out, source in sources.items():
        code, lines = run("predict", ["--weights", str(untrained_det_weights), "--source", source, "--out",
                                      str(sandbox / out), "--conf", "0.9"], capsys)  # fmt: skip
        assert code == 0, lines
    written = _snapshot(tmp_path) - before
    assert {p.parent for p in written} == {sandbox / out for out in sources}, sorted(map(str, written))
    assert sorted(p.name for p in (sandbox / "out1").iterdir()) == ["..jpg", "predictions.json", "x.jpg"]
    recursive = json.loads((sandbox / "out3" / "predictions.json").read_text())
    names = sorted(p.name for p in (sandbox / "out3").glob("*.jpg"))
    assert len(recursive) == 4 and names == ["a_x-2.jpg", "a_x.jpg", "b_x.jpg", "x.jpg"]  # none overwritten


@pytest.mark.train
def test_coco_file_names_with_dot_dot_do_not_steer_writes(
    synth_cub_root: Path, untrained_det_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`file_name: "../../<...>/x.jpg"` is read where it points; val_det and train_det still write only in --out."""
    sandbox = tmp_path / "sandbox"
    image_dir = sandbox / "deep" / "er" / "images"
    image_dir.mkdir(parents=True)
    jsons = {}
    for split, name in (("train", "train"), ("test", "val")):
        gt = coco_ground_truth(CubDetection(synth_cub_root, split, labels="bird"))
        for image in gt["images"]:
            real = synth_cub_root / "CUB_200_2011" / "images" / image["file_name"]
            image["file_name"] = os.path.relpath(real, image_dir)  # "../../../../<...>/synth_cub0/..."
            assert image["file_name"].startswith("../../")
        jsons[name] = sandbox / f"{name}.json"
        jsons[name].write_text(json.dumps(gt))
    data = ["data.format=coco", f"data.train_json={jsons['train']}", f"data.val_json={jsons['val']}",
            f"data.image_dir={image_dir}"]  # fmt: skip
    before = _snapshot(tmp_path) | _snapshot(synth_cub_root)
    code, lines = run(
        "val_det", ["--weights", str(untrained_det_weights), "--out", str(sandbox / "val"), *data], capsys
    )
    assert code == 0, lines
    code, lines = run("train_det", [*data, "data.img_size=64", "train.epochs=1", "train.batch_size=4",
                                    "train.workers=0", "train.threads=1", "model.backbone_weights=null",
                                    f"output_dir={sandbox / 'det'}"], capsys)  # fmt: skip
    assert code == 0, lines
    written = (_snapshot(tmp_path) | _snapshot(synth_cub_root)) - before
    assert {p.parent for p in written} == {sandbox / "val", sandbox / "det"}, sorted(map(str, written))
    assert {"gt.json", "predictions.json", "metrics.json"} <= {p.name for p in written if p.parent.name == "val"}
