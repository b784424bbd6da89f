"""tools/convert_data.py (data-set export; model export is tools/export.py): the synthetic mini-CUB exported to
COCO json and YOLO txt reads back with the same boxes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool

from detect.cli import run_tool
from detect.data.coco import CocoDetection
from detect.data.cub import CubDetection
from detect.data.yolo_txt import YoloDetection

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_data.py"
export_tool = load_tool("convert_data")

CUB_SPLIT = {"train": "train", "val": "test"}


def _cub(root: Path, split: str, labels: str) -> CubDetection:
    return CubDetection(root, CUB_SPLIT[split], labels=labels)


def _by_name(source: object, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """{name: (boxes, labels, (h, w))} of every image of a source, `names[i]` naming image i."""
    return {name: (*source.annotations(i), source.image_size(i)) for i, name in enumerate(names)}


@pytest.mark.parametrize("labels", ["species", "bird"])
def test_yolo_export_reads_back_as_the_cub_boxes(synth_cub_root: Path, tmp_path: Path, labels: str) -> None:
    out = tmp_path / "yolo"
    code = export_tool.main(["--to", "yolo", "--out", str(out), f"data.root={synth_cub_root}", f"data.labels={labels}"])
    assert code == 0 and (out / "data.yaml").is_file()
    for split in ("train", "val"):
        cub, yolo = _cub(synth_cub_root, split, labels), YoloDetection(out / "data.yaml", split)
        assert yolo.class_names == cub.class_names and len(yolo) == len(cub) > 0
        ours = _by_name(cub, [str(cub.image_path(i).relative_to(cub.image_dir)) for i in range(len(cub))])
        root = out / "images" / split
        back = _by_name(yolo, [str(yolo.image_path(i).relative_to(root)) for i in range(len(yolo))])
        assert sorted(back) == sorted(ours)
        for name, (boxes, classes, size) in ours.items():
            assert back[name][2] == size
            np.testing.assert_array_equal(back[name][1], classes)
            np.testing.assert_allclose(back[name][0], boxes, atol=1e-4)  # 8 decimals of a normalised value


def test_coco_export_reads_back_as_the_cub_boxes(synth_cub_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    args = ["--to", "coco", "--out", str(out), f"data.root={synth_cub_root}", "data.labels=species"]
    assert export_tool.main(args) == 0
    for split in ("train", "val"):
        cub, coco = _cub(synth_cub_root, split, "species"), CocoDetection(out / f"{split}.json")
        assert coco.image_ids == cub.image_ids and coco.category_ids == cub.category_ids
        assert coco.class_names == cub.class_names
        for i in range(len(cub)):
            assert coco.image_path(i) == cub.image_path(i).resolve()  # referenced in place, absolute
            assert coco.image_size(i) == cub.image_size(i)
            boxes, classes = cub.annotations(i)
            back_boxes, back_classes = coco.annotations(i)
            np.testing.assert_array_equal(back_classes, classes)
            np.testing.assert_allclose(back_boxes, boxes, atol=1e-3)  # bbox rounded to 4 decimals
    data = json.loads((out / "val.json").read_text())
    assert all(a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3] for a in data["annotations"])


def test_coco_relative_file_names_read_back_with_image_dir(synth_cub_root: Path, tmp_path: Path) -> None:
    images = synth_cub_root / "CUB_200_2011" / "images"
    args = ["--to", "coco", "--out", str(tmp_path), "--relative-to", str(images), f"data.root={synth_cub_root}"]
    assert export_tool.main(args) == 0
    data = json.loads((tmp_path / "train.json").read_text())
    assert not any(Path(image["file_name"]).is_absolute() for image in data["images"])
    coco, cub = CocoDetection(tmp_path / "train.json", image_dir=images), _cub(synth_cub_root, "train", "bird")
    assert len(coco) == len(cub)
    assert all(coco.image_path(i).resolve() == cub.image_path(i).resolve() for i in range(len(cub)))


def test_existing_target_needs_overwrite(synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--to", "yolo", "--out", str(tmp_path), f"data.root={synth_cub_root}"]
    assert run_tool(export_tool.main, args) == 0
    before = (tmp_path / "labels" / "train").stat().st_mtime_ns
    capsys.readouterr()
    assert run_tool(export_tool.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export target exists") and "\n" not in err
    assert (tmp_path / "labels" / "train").stat().st_mtime_ns == before  # nothing touched
    assert run_tool(export_tool.main, [*args, "--overwrite"]) == 0
    assert len(YoloDetection(tmp_path / "data.yaml", "val")) == 12


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "xml", "--out", "X"], "invalid choice: 'xml'"),
        (["--out", "X"], "the following arguments are required: --to"),
        (["--to", "coco", "--out", "X", "--nope"], "unknown option --nope"),
        (["--to", "yolo", "--out", "X", "--relative-to", "Y"], "--relative-to applies to --to coco only"),
        (["--to", "coco", "--out", "X", "data.nope=1"], "unknown config key 'data.nope'"),
        (["--to", "coco", "--out", "X", "data.format=coco"], "data.format=coco needs data.train_json"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert run_tool(export_tool.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.subprocess
def test_cli_missing_root_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(TOOL), "--to", "coco", "--out", str(tmp_path / "o"), f"data.root={tmp_path / 'none'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
