"""Bad data and bad configuration at the tool level (DESIGN §8): one `error:` line naming the file, exit code 2,
no traceback, nothing half-written; and the policies for what is repaired instead (unreadable training images,
boxes outside the image or without area).

The tools run in-process through `run_tool` (as `python tools/X.py` does) on broken copies of the tiny synthetic
mini-CUB; one test runs each tool as a real subprocess to show the process boundary (exit status, no traceback).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import load_tool

import detect.train.detection
from backbones import build_backbone
from backbones.checkpoint import load_checkpoint, save_backbone
from detect.cli import run_tool
from detect.config import DetConfig
from detect.data.coco import write_coco_json
from detect.data.cub import CubClassification, CubDetection
from detect.data.detection import DetectionDataset
from detect.data.yolo_txt import export_yolo

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
_MODULES: dict[str, object] = {}


def tool(name: str) -> object:
    """tools/<name>.py as a module (loaded once)."""
    if name not in _MODULES:
        _MODULES[name] = load_tool(name)
    return _MODULES[name]


def run(name: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """Exit code and the non-blank stderr lines of one in-process tool run."""
    capsys.readouterr()
    code = run_tool(tool(name).main, argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_error(code: int, lines: list[str], *expected: str) -> None:
    """Exit 2 and exactly one stderr line, `error: ...`, containing every `expected` text."""
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])


# ----------------------------------------------------------------------------------------------------------------------
# Broken copies of the tiny mini-CUB
# ----------------------------------------------------------------------------------------------------------------------
def split_ids(cub: Path) -> tuple[list[int], list[int]]:
    """(train image ids, test image ids) of a CUB_200_2011 folder."""
    rows = [line.split() for line in (cub / "train_test_split.txt").read_text().splitlines() if line.strip()]
    return [int(i) for i, t in rows if t == "1"], [int(i) for i, t in rows if t == "0"]


def image_file(cub: Path, image_id: int) -> Path:
    rows = dict(line.split(maxsplit=1) for line in (cub / "images.txt").read_text().splitlines() if line.strip())
    return cub / "images" / rows[str(image_id)].strip()


def set_line(cub: Path, name: str, line_no: int, text: str | None) -> None:
    """Replace (or, with None, delete) 1-based line `line_no` of an annotation file."""
    lines = (cub / name).read_text().splitlines()
    if text is None:
        del lines[line_no - 1]
    else:
        lines[line_no - 1] = text
    (cub / name).write_text("\n".join(lines) + "\n")


def corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a JPEG" * 40)


def truncate(path: Path) -> None:
    """Cut a JPEG in the middle of its scan data: OpenCV would still decode it (grey bottom) without an error."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def broken_copy(synth: Path, tmp: Path, mutate: Callable[[Path], object] | None) -> Path:
    """A copy of the data root with `mutate(<copy>/CUB_200_2011)` applied."""
    root = tmp / "data"
    shutil.copytree(synth, root)
    if mutate is not None:
        mutate(root / "CUB_200_2011")
    return root


def det_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.img_size=64", "train.epochs=1", "train.batch_size=4", "train.workers=0",
            "train.threads=1", "model.backbone_weights=null", f"output_dir={out}", *extra]  # fmt: skip


def cls_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "data.img_size=32", "data.resize_size=36", "train.epochs=1", "train.batch_size=8",
            "train.workers=0", "train.threads=1", f"output_dir={out}", *extra]  # fmt: skip


def first_train(cub: Path) -> int:
    return split_ids(cub)[0][0]


def first_test(cub: Path) -> int:
    return split_ids(cub)[1][0]


# (id, mutation of CUB_200_2011, texts the error line must hold: "{cub}" stands for the folder's path)
CUB_CASES = [
    ("missing-root", None, ["CUB data root not found", "{root}"]),
    ("missing-images.txt", lambda c: (c / "images.txt").unlink(), ["no CUB_200_2011 data set (images.txt)", "{root}"]),
    ("missing-bounding_boxes.txt", lambda c: (c / "bounding_boxes.txt").unlink(),
     ["CUB annotation file missing", "{cub}/bounding_boxes.txt"]),
    ("truncated-line", lambda c: set_line(c, "bounding_boxes.txt", 2, "2 43.0 2.0"),
     ["truncated line", "{cub}/bounding_boxes.txt, line 2"]),
    ("non-numeric", lambda c: set_line(c, "bounding_boxes.txt", 3, "3 31.0 zero 13.0 13.0"),
     ["non-numeric y 'zero'", "{cub}/bounding_boxes.txt, line 3"]),
    ("id-absent-from-one-file", lambda c: set_line(c, "train_test_split.txt", 2, None),
     ["image id 2 (images.txt line 2) has no line in train_test_split.txt", "{cub}/train_test_split.txt"]),
    ("id-only-in-one-file", lambda c: (c / "image_class_labels.txt").open("a").write("999 1\n"),
     ["image id 999 is not in images.txt", "{cub}/image_class_labels.txt, line 25"]),
    ("class-id-out-of-range", lambda c: set_line(c, "image_class_labels.txt", 2, "2 99"),
     ["class id 99 out of range", "{cub}/image_class_labels.txt, line 2"]),
    ("empty-split", lambda c: (c / "train_test_split.txt").write_text("".join(f"{i} 0\n" for i in range(1, 25))),
     ["CUB split 'train' has no images", "{cub}/train_test_split.txt"]),
]  # fmt: skip
# Unreadable images where policy says "stop": any validation image, or more than 1% of the training images.
IMAGE_CASES = [
    ("missing-val-image", lambda c: image_file(c, first_test(c)).unlink(), "image file not found", "test"),
    ("corrupt-val-jpeg", lambda c: corrupt(image_file(c, first_test(c))), "cannot read image header", "test"),
    ("truncated-val-jpeg", lambda c: truncate(image_file(c, first_test(c))), "truncated JPEG", "test"),
    ("two-of-12-train-images-corrupt",
     lambda c: [corrupt(image_file(c, i)) for i in split_ids(c)[0][:2]], "2 of 12 images are unreadable", "train"),
]  # fmt: skip


def _expected(texts: list[str], root: Path) -> list[str]:
    return [t.format(root=root, cub=root / "CUB_200_2011") for t in texts]


@pytest.mark.parametrize(("name", "mutate", "texts"), CUB_CASES, ids=[c[0] for c in CUB_CASES])
@pytest.mark.parametrize("which", ["train_det", "train_cls"])
def test_bad_cub_annotations_give_one_line_naming_file_and_line(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, which: str, name: str, mutate, texts
) -> None:
    root = broken_copy(synth_cub_root, tmp_path, mutate) if mutate else tmp_path / "no-such-root"
    out = tmp_path / "run"
    code, lines = run(which, (det_args if which == "train_det" else cls_args)(root, out), capsys)
    assert_one_error(code, lines, *_expected(texts, root))
    assert not any(p.suffix in (".pt", ".csv", ".json") for p in out.rglob("*")) if out.exists() else True
    if which == "train_det":
        assert not out.exists()  # checked before the run directory is made


@pytest.mark.parametrize(("name", "mutate", "text", "split"), IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
@pytest.mark.parametrize("which", ["train_det", "train_cls"])
def test_unreadable_images_that_must_stop_the_run(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, which: str, name: str, mutate, text, split
) -> None:
    root = broken_copy(synth_cub_root, tmp_path, mutate)
    out = tmp_path / "run"
    code, lines = run(which, (det_args if which == "train_det" else cls_args)(root, out), capsys)
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and errors == lines[-1:], lines
    assert text in errors[0] and str(root / "CUB_200_2011" / "images") in errors[0]
    assert not any(p.suffix in (".pt", ".csv", ".json") for p in out.rglob("*")) if out.exists() else True
    if which == "train_det":
        assert not out.exists()


def test_train_cls_bad_data_leaves_no_run_directory(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    code, _ = run("train_cls", cls_args(tmp_path / "no-such-root", out), capsys)
    assert code == 2 and not out.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Repaired, not fatal: one unreadable training image, boxes without area or outside the image
# ----------------------------------------------------------------------------------------------------------------------
def dirty(cub: Path) -> None:
    """One truncated training JPEG; train boxes of zero width, negative height, half and wholly outside the image."""
    train = split_ids(cub)[0]
    truncate(image_file(cub, train[0]))
    lines = {int(line.split()[0]): line_no for line_no, line in
             enumerate((cub / "bounding_boxes.txt").read_text().splitlines(), start=1)}  # fmt: skip
    set_line(cub, "bounding_boxes.txt", lines[train[1]], f"{train[1]} 10.0 10.0 0.0 20.0")  # zero width
    set_line(cub, "bounding_boxes.txt", lines[train[2]], f"{train[2]} 10.0 40.0 20.0 -5.0")  # negative height
    set_line(cub, "bounding_boxes.txt", lines[train[3]], f"{train[3]} -20.0 -10.0 60.0 40.0")  # partly outside
    set_line(cub, "bounding_boxes.txt", lines[train[4]], f"{train[4]} 900.0 900.0 30.0 30.0")  # wholly outside


@pytest.mark.train
def test_dirty_training_data_is_repaired_with_counted_warnings(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """train_det and train_cls finish; warnings name the skipped image and count the clipped and dropped boxes.

    The warnings go to the `plugdet.data` logger: on stderr in a tool's process (logging's last-resort handler),
    in `caplog` under pytest.
    """
    root = broken_copy(synth_cub_root, tmp_path, dirty)
    cub, train = root / "CUB_200_2011", split_ids(root / "CUB_200_2011")[0]
    code, lines = run("train_det", det_args(root, tmp_path / "det"), capsys)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert code == 0, lines
    skipped = [line for line in warnings if "skipping unreadable image" in line]
    assert len(skipped) == 1 and "truncated JPEG" in skipped[0] and str(image_file(cub, train[0])) in skipped[0]
    assert "CUB train boxes: 1 box(es) clipped to the image, 3 dropped (zero area)" in warnings
    assert sum(f"{cub / 'bounding_boxes.txt'}, line" in line for line in warnings) == 4
    assert (tmp_path / "det" / "last.pt").is_file()
    caplog.clear()
    code, lines = run("train_cls", cls_args(root, tmp_path / "cls"), capsys)
    assert code == 0 and any(
        "truncated JPEG" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records
    )
    assert (tmp_path / "cls" / "backbone.pt").is_file()


def test_skipped_training_image_is_replaced_by_the_next_one(synth_cub_root: Path, tmp_path: Path) -> None:
    root = broken_copy(synth_cub_root, tmp_path, lambda c: corrupt(image_file(c, first_train(c))))
    cls = CubClassification(root, "train")
    assert cls.unreadable.count == 1  # found by the start-up scan
    image, label = cls[0]
    again, label_1 = cls[1]
    assert (image == again).all() and label == label_1 == int(cls.labels[1])
    det = DetectionDataset(CubDetection(root, "train"), 64, train=True, mosaic=0.0)
    assert det.check_images() == 1
    assert det[(0, 0)][0].shape == (3, 64, 64)


def test_truncated_jpeg_is_told_apart_from_data_after_the_end_marker(synth_cub_root: Path, tmp_path: Path) -> None:
    """OpenCV decodes a cut JPEG without a word (grey bottom); we call it truncated. Bytes appended after a complete
    JPEG (some cameras add trailers) are not truncation."""
    from backbones.errors import UserError
    from detect.data.source import image_file_problem, read_image_rgb

    good = next((synth_cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    cut, trailer = tmp_path / "cut.jpg", tmp_path / "trailer.jpg"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) * 2 // 3])
    trailer.write_bytes(good.read_bytes() + b"\x00MAKERNOTE" * 50)
    assert image_file_problem(good) is None and image_file_problem(trailer) is None
    assert (read_image_rgb(trailer) == read_image_rgb(good)).all()
    assert image_file_problem(cut) == f"truncated JPEG (the data stops before the end-of-image marker): {cut}"
    with pytest.raises(UserError, match="truncated JPEG"):
        read_image_rgb(cut)


def test_too_many_unreadable_images_found_while_loading(synth_cub_root: Path, tmp_path: Path) -> None:
    """Files that break after the start-up scan are caught at load time with the same rule."""
    from backbones.errors import UserError

    root = broken_copy(synth_cub_root, tmp_path, None)
    det = DetectionDataset(CubDetection(root, "train"), 64, train=True, mosaic=0.0)
    assert det.check_images() == 0
    for index in (0, 5):
        corrupt(det.source.image_path(index))
    det[(0, 0)]  # one unreadable image of 12 is tolerated (image 1 stands in)
    assert det.unreadable.count == 1
    with pytest.raises(UserError, match=r"training images: 2 of 12 images are unreadable .*: cannot read image"):
        det[(5, 0)]


# ----------------------------------------------------------------------------------------------------------------------
# Numerical faults
# ----------------------------------------------------------------------------------------------------------------------
class NaNFrom:
    """Wraps the detection criterion: from its `at`-th call on, the box part (and so the total) is NaN."""

    def __init__(self, criterion: Callable, at: int) -> None:
        self.criterion, self.at, self.calls = criterion, at, 0

    def __call__(self, outputs: list[torch.Tensor], targets: torch.Tensor) -> tuple:
        self.calls += 1
        total, parts = self.criterion(outputs, targets)
        if self.calls >= self.at:
            parts = {**parts, "box": parts["box"] * float("nan")}
            total = total * float("nan")
        return total, parts


@pytest.mark.train
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN from the 2nd batch of epoch 2 (12 images, batch 4: call 5): exit 2, the part and the step named,
    last.pt still the finite end of epoch 1."""
    build = detect.train.detection.build_det_criterion
    monkeypatch.setattr(detect.train.detection, "build_det_criterion", lambda cfg, model: NaNFrom(build(cfg, model), 5))
    out = tmp_path / "run"
    code, lines = run("train_det", det_args(synth_cub_root, out, "train.epochs=3"), capsys)
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and errors == lines[-1:], lines
    assert errors[0].startswith("error: non-finite loss (box=nan) at epoch 2, batch 2 (iteration 4): stopped")
    assert "last.pt keeps the last good epoch" in errors[0]
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 1 and (last["train_state"]["epoch"], last["train_state"]["batch"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert len((out / "results.csv").read_text().strip().splitlines()) == 2  # header + epoch 1


@pytest.mark.train
def test_non_finite_classification_loss_stops_train_cls(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = torch.nn.CrossEntropyLoss

    class NaNLoss(real):
        def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            loss = super().forward(logits, labels)
            return loss * float("nan") if calls["n"] >= 3 else loss  # 12 images / 8: epoch 2, step 1

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NaNLoss)
    out = tmp_path / "run"
    code, lines = run("train_cls", cls_args(synth_cub_root, out, "train.epochs=3"), capsys)
    assert code == 2 and lines[-1].startswith("error: non-finite training loss (nan) at epoch 2, step 1"), lines
    last = load_checkpoint(out / "last.pt")
    assert (last["epoch"], last["batch"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------------------------------
# COCO json and YOLO txt data
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_yolo(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("formats")
    for split, name in (("train", "train"), ("test", "val")):
        source = CubDetection(synth_cub_root, split, labels="species")
        write_coco_json(source, out / f"{name}.json")
        export_yolo(source, out / "yolo", split_name=name)
    return out


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


COCO_CASES = [
    ("unknown-category", lambda d: d["annotations"][0].update(category_id=77), "unknown category_id 77"),
    ("annotation-without-bbox", lambda d: d["annotations"][1].pop("bbox"), "misses key 'bbox'"),
    ("image-without-file_name", lambda d: d["images"][0].pop("file_name"), "misses key 'file_name'"),
    ("no-categories-list", lambda d: d.pop("categories"), "misses the list 'categories'"),
]  # fmt: skip
YOLO_CASES = [
    ("four-fields", "0 0.5 0.5 0.2\n", "expected 5 fields 'class cx cy w h', got 4"),
    ("outside-0-1", "0 0.5 1.5 0.2 0.2\n", "box values must be normalised to [0, 1]"),
    ("class-out-of-range", "9 0.5 0.5 0.2 0.2\n", "class index 9 out of range 0..3"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "edit", "text"), COCO_CASES, ids=[c[0] for c in COCO_CASES])
def test_bad_coco_json(
    coco_yolo: Path, synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, edit, text: str
) -> None:
    train_json = tmp_path / "train.json"
    shutil.copy(coco_yolo / "train.json", train_json)
    _edit_json(train_json, edit)
    images = synth_cub_root / "CUB_200_2011" / "images"
    argv = det_args(synth_cub_root, tmp_path / "run", "data.format=coco", f"data.train_json={train_json}",
                    f"data.val_json={coco_yolo / 'val.json'}", f"data.image_dir={images}")  # fmt: skip
    code, lines = run("train_det", argv, capsys)
    assert_one_error(code, lines, text, str(train_json))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("name", "line", "text"), YOLO_CASES, ids=[c[0] for c in YOLO_CASES])
def test_bad_yolo_labels(
    coco_yolo: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, line: str, text: str
) -> None:
    yolo = tmp_path / "yolo"
    shutil.copytree(coco_yolo / "yolo", yolo, symlinks=True)
    data_yaml = (yolo / "data.yaml").read_text().replace(f"path: {coco_yolo / 'yolo'}", f"path: {yolo}")
    (yolo / "data.yaml").write_text(data_yaml)
    label = sorted((yolo / "labels" / "val").rglob("*.txt"))[2]
    label.write_text(label.read_text() + line)
    bad_line = len(label.read_text().splitlines())
    code, lines = run("train_det", det_args(yolo, tmp_path / "run", "data.format=yolo",
                                            f"data.yaml={yolo / 'data.yaml'}"), capsys)  # fmt: skip
    assert_one_error(code, lines, text, f"{label}, line {bad_line}")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------------
# val_det and predict: bad data, bad weights
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train_cls-style backbone.pt of cspdarknet_n."""
    path = tmp_path_factory.mktemp("backbone") / "backbone.pt"
    save_backbone(path, build_backbone("cspdarknet_n"), "cspdarknet_n", {}, {"top1": 0.5}, {})
    return path


def test_val_det_bad_data_writes_nothing(
    synth_cub_root: Path, untrained_det_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "val"
    code, lines = run("val_det", ["--weights", str(untrained_det_weights), "--out", str(out),
                                  f"data.root={tmp_path / 'nope'}"], capsys)  # fmt: skip
    assert_one_error(code, lines, "CUB data root not found", str(tmp_path / "nope"))
    root = broken_copy(synth_cub_root, tmp_path, lambda c: truncate(image_file(c, first_test(c))))
    code, lines = run(
        "val_det", ["--weights", str(untrained_det_weights), "--out", str(out), f"data.root={root}"], capsys
    )
    bad = image_file(root / "CUB_200_2011", first_test(root / "CUB_200_2011"))
    assert_one_error(code, lines, "1 unreadable validation image(s)", "truncated JPEG", str(bad))
    assert not out.exists()


def test_predict_skips_unreadable_images_and_fails_when_none_can_be_read(
    synth_cub_root: Path, untrained_det_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted((synth_cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    corrupt(folder / "zz_corrupt.jpg")
    out = tmp_path / "pred"
    code, lines = run(
        "predict", ["--weights", str(untrained_det_weights), "--source", str(folder), "--out", str(out)], capsys
    )
    assert code == 0 and lines == [f"warning: skipped cannot read image (corrupt or unsupported format): "
                                   f"{folder / 'zz_corrupt.jpg'}"]  # fmt: skip
    entries = json.loads((out / "predictions.json").read_text())
    assert [Path(e["file"]).name for e in entries] == [p.name for p in good]
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    corrupt(only_bad / "a.jpg")
    code, lines = run("predict", ["--weights", str(untrained_det_weights), "--source", str(only_bad), "--out",
                                  str(tmp_path / "pred2")], capsys)  # fmt: skip
    assert code == 2 and lines[-1].startswith("error: none of the 1 input file(s) could be read") and len(lines) == 2
    code, lines = run(
        "predict", ["--weights", str(untrained_det_weights), "--source", str(tmp_path / "missing*.jpg")], capsys
    )
    assert_one_error(code, lines, f"no images or videos found at --source {tmp_path / 'missing*.jpg'}")


# ----------------------------------------------------------------------------------------------------------------------
# Bad configuration
# ----------------------------------------------------------------------------------------------------------------------
CONFIG_CASES = [
    ("unknown-key", ["train.epochz=3"], ["unknown config key 'train.epochz'", "valid keys of 'train'"]),
    ("wrong-type", ["train.epochs=many"], ["config key 'train.epochs' got 'many'"]),
    ("unknown-backbone", ["model.backbone=nope_net"], ["unknown backbone 'nope_net'", "cspdarknet_n", "resnet18"]),
    ("unknown-scale", ["model.scale=q"], ["config key 'model.scale' = 'q'", "must be one of n, s, m, l, x"]),
    ("out-of-bounds", ["train.batch_size=0"], ["config key 'train.batch_size' = 0", "must be >= 1"]),
    ("img-size-not-multiple", ["data.img_size=100"], ["'data.img_size' = 100", "multiple of 32", "use 96 or 128"]),
    ("eval-conf-above-1", ["eval.conf=2"], ["'eval.conf' = 2.0", "must be in [0, 1]"]),
    ("eval-iou-above-1", ["eval.iou=2"], ["'eval.iou' = 2.0", "must be in [0, 1]"]),
    ("momentum-1.5", ["train.momentum=1.5"], ["'train.momentum' = 1.5", "must be in [0, 1)"]),
    ("mosaic-probability", ["train.mosaic=1.2"], ["'train.mosaic' = 1.2", "must be in [0, 1]"]),
    ("threads-0", ["train.threads=0"], ["'train.threads' = 0", "must be >= 1"]),
    ("ultralytics-epochs", ["epochs=1"], ["unknown config key 'epochs'", "did you mean 'train.epochs'?"]),
    ("ultralytics-imgsz", ["imgsz=64"], ["unknown config key 'imgsz'", "did you mean 'data.img_size'?"]),
    ("misspelt", ["train.epochz=3"], ["did you mean 'train.epochs'?"]),
]  # fmt: skip
CLS_CONFIG_CASES = [
    ("label-smoothing-1.5", ["train.label_smoothing=1.5"], ["'train.label_smoothing' = 1.5", "must be in [0, 1)"]),
    ("momentum-1", ["train.momentum=1"], ["'train.momentum' = 1.0", "must be in [0, 1)"]),
    ("crop-larger-than-resize", ["data.img_size=64"], ["'data.resize_size' = 36", "must be >= data.img_size (64"]),
    ("ultralytics-lr0", ["lr0=0.1"], ["did you mean 'train.lr'?"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "extra", "texts"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_train_det(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, extra: list[str], texts: list[str]
) -> None:
    code, lines = run("train_det", det_args(synth_cub_root, tmp_path / "run", *extra), capsys)
    assert_one_error(code, lines, *texts)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("name", "extra", "texts"), CONFIG_CASES[:3] + CLS_CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES[:3] + CLS_CONFIG_CASES])  # fmt: skip
def test_bad_config_train_cls(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, extra: list[str], texts: list[str]
) -> None:
    code, lines = run("train_cls", cls_args(synth_cub_root, tmp_path / "run", *extra), capsys)
    assert_one_error(code, lines, *texts)
    assert not list((tmp_path / "run").glob("*.pt")) if (tmp_path / "run").exists() else True


@pytest.mark.parametrize("extra", [["data.img_size=100"], ["eval.conf=2"], ["eval.iou=-1"]])
def test_bad_config_val_det(
    untrained_det_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str]
) -> None:
    """val_det reads the same DetConfig: the ranges hold there too, before anything is written."""
    code, lines = run(
        "val_det", ["--weights", str(untrained_det_weights), "--out", str(tmp_path / "val"), *extra], capsys
    )
    assert_one_error(code, lines, f"'{extra[0].split('=')[0]}'")
    assert not (tmp_path / "val").exists()


def test_first_run_without_the_pretrained_backbone(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default config's runs/cls/default/backbone.pt, absent on a first run: the key and both ways out."""
    monkeypatch.chdir(tmp_path)
    argv = [arg for arg in det_args(synth_cub_root, tmp_path / "run") if not arg.startswith("model.backbone_weights")]
    code, lines = run("train_det", argv, capsys)
    assert_one_error(code, lines, "model.backbone_weights=runs/cls/default/backbone.pt: no such file",
                     "model.backbone_weights=null", "python tools/train_cls.py")  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["train.resume", "model.backbone_weights", "model.weights"])
def test_a_folder_given_as_a_checkpoint(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, key: str
) -> None:
    folder = tmp_path / "a_run"
    folder.mkdir()
    code, lines = run("train_det", det_args(synth_cub_root, tmp_path / "run", f"{key}={folder}"), capsys)
    assert_one_error(code, lines, f"{key}={folder} is a folder, not a checkpoint file")
    if key == "train.resume":
        code, lines = run("train_cls", cls_args(synth_cub_root, tmp_path / "run", f"{key}={folder}"), capsys)
        assert_one_error(code, lines, "is a folder, not a checkpoint file")
    assert not (tmp_path / "run").exists()


def test_a_folder_given_as_weights_to_val_det(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, lines = run("val_det", ["--weights", str(tmp_path)], capsys)
    assert_one_error(code, lines, f"{tmp_path} is a folder, not a checkpoint file")


@pytest.mark.parametrize("which", ["train_det", "train_cls"])
def test_help_lists_every_key_and_print_config_exits(
    synth_cub_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, which: str
) -> None:
    from detect.config.help import leaf_keys
    from detect.config.schema import ClsConfig

    schema = DetConfig if which == "train_det" else ClsConfig
    capsys.readouterr()
    assert run_tool(tool(which).main, ["--help"]) == 0
    out = capsys.readouterr().out
    for key in leaf_keys(schema):
        assert f"{key}=" in out, key
    assert "train.momentum=" in out and "in [0, 1)" in out and "one of" in out
    args = (det_args if which == "train_det" else cls_args)(synth_cub_root, tmp_path / "run", "train.epochs=7")
    assert run_tool(tool(which).main, [*args, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 7" in printed and not (tmp_path / "run").exists()
    from omegaconf import OmegaConf

    assert OmegaConf.create(printed).train.epochs == 7


def test_backbone_weights_of_another_architecture(
    synth_cub_root: Path, backbone_pt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A cspdarknet_n backbone.pt into cspdarknet_s; a plain resnet18 state dict into cspdarknet_n."""
    code, lines = run("train_det", det_args(synth_cub_root, tmp_path / "a", "model.backbone=cspdarknet_s",
                                            f"model.backbone_weights={backbone_pt}"), capsys)  # fmt: skip
    assert_one_error(code, lines, f"checkpoint {backbone_pt} is a 'cspdarknet_n' backbone, cannot load it into "
                     "'cspdarknet_s'", "key 'stem.conv.weight' has shape (16, 3, 3, 3) in the file, (32, 3, 3, 3) "
                     "in the model")  # fmt: skip
    plain = tmp_path / "resnet18_state.pt"
    torch.save(build_backbone("resnet18").state_dict(), plain)
    code, lines = run("train_det", det_args(synth_cub_root, tmp_path / "b", f"model.backbone_weights={plain}"), capsys)
    assert_one_error(code, lines, f"weights {plain} do not fit the backbone (expected cspdarknet_n): missing key")
    code, lines = run("train_cls", cls_args(synth_cub_root, tmp_path / "c", "model.backbone=resnet18",
                                            f"model.backbone_weights={backbone_pt}"), capsys)  # fmt: skip
    assert_one_error(code, lines, "is a 'cspdarknet_n' backbone, cannot load it into 'resnet18'", "first difference")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("which", ["val_det", "predict"])
def test_weights_that_are_not_a_detector_checkpoint(
    synth_cub_root: Path, backbone_pt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, which: str
) -> None:
    image = next((synth_cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    extra = ["--source", str(image)] if which == "predict" else []
    random_file = tmp_path / "random.pt"
    random_file.write_bytes(os.urandom(3000))
    cases = [
        (backbone_pt, "is not a plugdet detector checkpoint (from train_det.py): it is a backbone checkpoint"),
        (random_file, f"cannot read checkpoint {random_file}"),
        (tmp_path / "absent.pt", f"checkpoint not found: {tmp_path / 'absent.pt'}"),
    ]
    for weights, text in cases:
        code, lines = run(which, ["--weights", str(weights), "--out", str(tmp_path / "out"), *extra], capsys)
        assert_one_error(code, lines, text)
    assert not (tmp_path / "out").exists()


def test_output_directory_that_cannot_be_made(
    synth_cub_root: Path, untrained_det_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Under a regular file (works as root too, where permission bits do not stop writes)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "run"
    image = next((synth_cub_root / "CUB_200_2011" / "images").rglob("*.jpg"))
    runs = {
        "train_det": det_args(synth_cub_root, out),
        "train_cls": cls_args(synth_cub_root, out),
        "val_det": ["--weights", str(untrained_det_weights), "--out", str(out)],
        "predict": ["--weights", str(untrained_det_weights), "--source", str(image), "--out", str(out)],
    }
    for which, argv in runs.items():
        code, lines = run(which, argv, capsys)
        assert_one_error(code, lines, f"cannot create run directory {out}")


# ----------------------------------------------------------------------------------------------------------------------
# The process boundary: real exit status, one line, no traceback (several tools at once: startup is the cost)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.train
def test_tools_as_subprocesses_print_one_line_and_exit_2(
    synth_cub_root: Path, untrained_det_weights: Path, backbone_pt: Path, tmp_path: Path
) -> None:
    """Three tools at once (torch's import is the cost); train_cls has its own in tests/test_train_cls.py."""
    root = broken_copy(synth_cub_root, tmp_path, lambda c: set_line(c, "bounding_boxes.txt", 2, "2 43.0 2.0"))
    env = dict(os.environ)  # conftest set the offline switches and a shared matplotlib cache
    commands = {
        "train_det": (det_args(root, tmp_path / "det"), "bounding_boxes.txt, line 2"),
        "val_det": (["--weights", str(backbone_pt)], "is not a plugdet detector checkpoint"),
        "predict": (
            ["--weights", str(untrained_det_weights), "--source", str(tmp_path / "none")],
            "no images or videos found",
        ),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(TOOLS / f"{name}.py"), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )  # fmt: skip
        for name, (argv, _) in commands.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert commands[name][1] in lines[0] and "Traceback" not in err, (name, err)


def test_debug_shows_the_traceback(backbone_pt: Path, capsys: pytest.CaptureFixture) -> None:
    code, lines = run("val_det", ["--weights", str(backbone_pt), "--debug"], capsys)
    assert code == 2 and lines[0].startswith("Traceback") and lines[-1].startswith("error: ")


@pytest.mark.subprocess
def test_exit_process_still_does_what_shutdown_would_that_matters(tmp_path: Path) -> None:
    """`exit_process` skips the interpreter's teardown (the tools' `__main__` exit), but first joins a running
    non-daemon thread, stops an idle `ThreadPoolExecutor` left open (as a library may: joining its worker without
    telling it to stop hangs), runs the atexit handlers, and flushes what stdout and stderr still buffer; the exit
    code is the one given. Without the join, the atexit run or the flush, a line below is missing."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import atexit, sys, threading, time\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from detect.cli import exit_process\n"
        "left_open = ThreadPoolExecutor(1)\n"
        "left_open.submit(print, 'pool ran', flush=False).result()\n"
        "atexit.register(lambda: print('atexit handler ran', flush=False))\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread finished', flush=False))).start()\n"
        "sys.stdout.write('stdout still buffered')\n"
        "sys.stderr.write('stderr still buffered')\n"
        "exit_process(3)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 3
    assert done.stdout == "pool ran\nstdout still bufferedthread finished\natexit handler ran\n"
    assert done.stderr == "stderr still buffered"
