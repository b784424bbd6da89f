"""Data formats plug in by registry: the checks of the `data` section, the training-label check, and a Pascal VOC
format of the test's own (tests/plugins/voc_format.py) read exactly and run through train_det, val_det and predict."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones.errors import UserError
from detect.config import DetConfig, load_config
from detect.data.build import build_source, list_formats
from detect.data.cub import CubDetection
from detect.data.detection import DetectionDataset
from detect.data.formats import register_format
from detect.plugins import import_plugins

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "tests/plugins/voc_format.py"  # as a user names it, relative to the repository root (the tools' cwd)
DECOY = "zz_decoy"  # a second object on the first training image: a class that never occurs in val


def voc_module():
    """The plugin, imported as the tools import it (registers `voc` in this process too)."""
    return import_plugins([str(REPO / PLUGIN)])[0]


def voc_xml(width: int, height: int, objects: list[tuple[str, list[int], int]]) -> str:
    """A VOC annotation: `objects` as (name, [xmin, ymin, xmax, ymax] 1-based inclusive pixels, difficult)."""
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        corners = "".join(f"<{tag}>{v}</{tag}>" for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{corners}</bndbox></object>"
        )
    return "".join(parts) + "</annotation>\n"


def write_voc(cub_root: Path, out: Path, xml_dir: str = "Annotations", empty: bool = False) -> dict[str, list]:
    """The synthetic mini-CUB (species labels) as a VOC tree: CUB train -> train.txt, CUB test -> val.txt.

    Each CUB box becomes integer VOC corners (x1 rounded down + 1, x2 rounded up); the first training image gets a
    second object of class DECOY, the first validation image a second, difficult object. `empty`: no objects.

    Returns:
        Per split, one `(id, [(name, [xmin, ymin, xmax, ymax], difficult), ...])` per image, in image-set order.
    """
    written: dict[str, list] = {}
    for cub_split, split in (("train", "train"), ("test", "val")):
        cub = CubDetection(cub_root, cub_split, labels="species")
        written[split] = []
        for index in range(len(cub)):
            key = f"{cub.image_ids[index]:06d}"
            height, width = cub.image_size(index)
            boxes, labels = cub.annotations(index)
            objects = [(cub.class_names[int(label)], [int(math.floor(x1)) + 1, int(math.floor(y1)) + 1,
                        int(math.ceil(x2)), int(math.ceil(y2))], 0)
                       for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels, strict=True)]  # fmt: skip
            if index == 0:  # a second object: in train a class of its own, in val a difficult one
                extra = (DECOY, [1, 1, 9, 7], 0) if split == "train" else (cub.class_names[0], [3, 2, 20, 12], 1)
                objects.append(extra)
            objects = [] if empty else objects
            (out / xml_dir).mkdir(parents=True, exist_ok=True)
            (out / xml_dir / f"{key}.xml").write_text(voc_xml(width, height, objects))
            (out / "JPEGImages").mkdir(exist_ok=True)
            shutil.copyfile(cub.image_path(index), out / "JPEGImages" / f"{key}.jpg")
            written[split].append((key, objects))
        (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{key}\n" for key, _ in written[split]))
    return written


@pytest.fixture(scope="module")
def voc(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list]]:
    """A VOC tree of the mini-CUB with its XML files in `xml/` (the plugin's `annotations_dir` option)."""
    root = tmp_path_factory.mktemp("voc")
    return root, write_voc(synth_cub_root, root, xml_dir="xml")


def data_section(*overrides: str):
    return load_config(DetConfig, None, list(overrides)).data


# ----------------------------------------------------------------------------------------------------------------------
# The registry and the checks of the data section
# ----------------------------------------------------------------------------------------------------------------------
def test_unknown_format_lists_the_registered_ones() -> None:
    voc_module()
    with pytest.raises(UserError) as error:
        build_source(data_section("data.format=vok"), "train")
    assert str(error.value) == (
        "unknown data.format 'vok': registered formats are coco, cub, voc, yolo (a format of your own registers with "
        "detect.data.formats.register_format in a module named by the config key `imports`)"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.yaml=/my/data.yaml"], "data.yaml is a setting of data.format=yolo, but data.format is cub: add "
         "data.format=yolo, or set data.yaml=null (its default) if it is not meant for this run"),
        (["data.format=yolo", "data.yaml=/my/data.yaml", "data.labels=species"], "data.labels is a setting of "
         "data.format=cub, but data.format is yolo: add data.format=cub, or set data.labels=bird (its default) if it "
         "is not meant for this run"),
        (["data.train_json=/my/train.json"], "data.train_json is a setting of data.format=coco, but data.format is "
         "cub: add data.format=coco, or set data.train_json=null (its default) if it is not meant for this run"),
    ],
)  # fmt: skip
def test_another_formats_key_is_one_line_not_a_run_on_the_default_data(overrides: list[str], message: str) -> None:
    """`data.yaml=X` without `data.format=yolo` used to train on the synthetic CUB default, X ignored."""
    with pytest.raises(UserError) as error:
        build_source(data_section(*overrides), "train")
    assert str(error.value) == message


def test_unknown_options_key_names_the_key_and_the_accepted_ones() -> None:
    voc_module()
    with pytest.raises(UserError) as error:
        build_source(data_section("data.format=voc", "data.options.year=2007"), "train")
    assert str(error.value) == (
        "unknown key data.options.year for data.format=voc: that format accepts annotations_dir, skip_difficult"
    )
    with pytest.raises(UserError) as error:
        build_source(data_section("data.options.year=2007"), "train")
    assert str(error.value) == "unknown key data.options.year for data.format=cub: that format has no options"


def test_registration_refuses_a_duplicate_name_and_an_unknown_key() -> None:
    with pytest.raises(ValueError, match=r"data format 'cub' is already registered \(by detect.data.formats\)"):
        register_format("cub")(lambda data, split: None)
    with pytest.raises(ValueError, match="declares key 'year': a format's keys are root, labels, train_json"):
        register_format("voc2", keys=("year",))
    assert "voc2" not in list_formats()


def test_a_factory_that_builds_no_detection_source_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from detect.data import formats

    monkeypatch.setitem(formats.FORMATS._factories, "cub", lambda data, split: [1, 2])
    with pytest.raises(UserError, match=r"^data.format=cub built a list, not a detection source \(it needs "):
        build_source(data_section(), "train")


def test_builtin_formats_build_the_readers_they_did_before(synth_cub_root: Path) -> None:
    source = build_source(data_section(f"data.root={synth_cub_root}", "data.labels=species"), "val")
    reference = CubDetection(synth_cub_root, "test", labels="species")
    assert type(source) is CubDetection and source.image_ids == reference.image_ids
    assert source.class_names == reference.class_names
    with pytest.raises(UserError, match=r"^data.format=coco needs data.val_json \(a COCO instances json\)$"):
        build_source(data_section("data.format=coco"), "val")
    with pytest.raises(UserError, match=r"^data.format=yolo needs data.yaml \(an Ultralytics data.yaml\)$"):
        build_source(data_section("data.format=yolo"), "val")


# ----------------------------------------------------------------------------------------------------------------------
# The VOC plugin reads exactly what its XML says
# ----------------------------------------------------------------------------------------------------------------------
def test_voc_corners_are_one_based_inclusive_pixels(tmp_path: Path) -> None:
    """xmin=1..xmax=10 covers the first ten columns: pixel edges 0..10; a difficult object is dropped on request."""
    path = tmp_path / "a.xml"
    path.write_text(voc_xml(20, 10, [("b", [1, 1, 10, 5], 0), ("a", [11, 6, 20, 10], 1)]))
    parsed = voc_module().read_voc_xml(path)
    assert (parsed.height, parsed.width, parsed.names) == (10, 20, ["b", "a"])
    assert parsed.boxes.tolist() == [[0.0, 0.0, 10.0, 5.0], [10.0, 5.0, 20.0, 10.0]]
    assert voc_module().read_voc_xml(path, skip_difficult=True).names == ["b"]
    path.write_text("<annotation><size><width>20</width>")
    with pytest.raises(UserError, match=rf"^malformed VOC annotation \(.*line 1.*\): {path}$"):
        voc_module().read_voc_xml(path)


@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_reader_boxes_and_labels_equal_the_xml(voc: tuple[Path, dict[str, list]], split: str) -> None:
    root, written = voc
    source = build_source(data_section("data.format=voc", f"data.root={root}", "data.options.annotations_dir=xml"),
                          split)  # fmt: skip
    names = sorted({name for entries in written.values() for _, objects in entries for name, _, _ in objects})
    assert source.class_names == names and DECOY in names and len(names) == 5
    assert source.category_ids == [1, 2, 3, 4, 5]
    assert len(source) == len(written[split]) == 12
    for index, (key, objects) in enumerate(written[split]):
        assert source.image_path(index) == root / "JPEGImages" / f"{key}.jpg"
        boxes, labels = source.annotations(index)
        expected = [[x1 - 1, y1 - 1, x2, y2] for _, (x1, y1, x2, y2), _ in objects]
        assert boxes.dtype == np.float32 and boxes.tolist() == expected
        assert labels.tolist() == [names.index(name) for name, _, _ in objects]
        image = source.load_image(index)
        assert source.image_size(index) == image.shape[:2]
    skipped = build_source(data_section("data.format=voc", f"data.root={root}", "data.options.annotations_dir=xml",
                                        "data.options.skip_difficult=true"), split)  # fmt: skip
    difficult = [len([o for o in objects if o[2] == 0]) for _, objects in written[split]]
    assert [len(skipped.annotations(i)[1]) for i in range(len(skipped))] == difficult
    assert difficult[0] == (2 if split == "train" else 1)


# ----------------------------------------------------------------------------------------------------------------------
# A training split that cannot teach the detector is one line before training
# ----------------------------------------------------------------------------------------------------------------------
def test_all_empty_training_labels_are_one_line(synth_cub_root: Path, tmp_path: Path) -> None:
    write_voc(synth_cub_root, tmp_path, empty=True)
    data = data_section("data.format=voc", f"data.root={tmp_path}")
    voc_module()
    val = DetectionDataset(build_source(data, "val"), 64, train=False)
    assert val.check_images() == 0  # a validation split without boxes is only scored as such
    train = DetectionDataset(build_source(data, "train"), 64, train=True)
    with pytest.raises(UserError) as error:
        train.check_images()
    assert str(error.value) == (
        f"training split of VocDetection({tmp_path}) has no labelled box (12 images and 0 boxes read): check that "
        "the annotation files are where the data format expects them"
    )


def test_a_class_absent_from_training_is_one_line_and_absent_from_val_is_fine(
    voc: tuple[Path, dict[str, list]],
) -> None:
    root, _ = voc
    overrides = ("data.format=voc", f"data.root={root}", "data.options.annotations_dir=xml")
    val = DetectionDataset(build_source(data_section(*overrides), "val"), 64, train=False)
    assert val.check_images() == 0  # DECOY never occurs in val
    as_train = DetectionDataset(val.source, 64, train=True)  # the val split as a training split: DECOY missing
    with pytest.raises(UserError) as error:
        as_train.check_images()
    assert str(error.value) == (
        f"training split of VocDetection({root}): 1 of 5 classes never occur ('zz_decoy'; 12 images and 13 boxes "
        "read): a detector cannot learn a class it never sees; remove them from the class list or add labelled images"
    )
    train = DetectionDataset(build_source(data_section(*overrides), "train"), 64, train=True)
    assert train.check_images() == 0


def test_a_label_outside_the_class_list_is_one_line(voc: tuple[Path, dict[str, list]]) -> None:
    """A reader's bug (a plugin format's, say) is caught at the start-up scan, not as an index error in the loss."""
    root, _ = voc
    source = build_source(data_section("data.format=voc", f"data.root={root}", "data.options.annotations_dir=xml"),
                          "val")  # fmt: skip
    source._labels[3] = np.array([7])
    with pytest.raises(UserError) as error:
        DetectionDataset(source, 64, train=False).check_images()
    assert str(error.value) == f"VocDetection({root}): label 7 outside 0..4 for image {source.image_path(3)}"


# ----------------------------------------------------------------------------------------------------------------------
# The plugin format through the tools, each in a fresh process (the plugin is imported only because it is named)
# ----------------------------------------------------------------------------------------------------------------------
def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.train
def test_voc_plugin_trains_validates_and_predicts(voc: tuple[Path, dict[str, list]], tmp_path: Path) -> None:
    root, written = voc
    train = _tool("train_det", f"imports=[{PLUGIN}]", "data.format=voc", f"data.root={root}",
                  "data.options.annotations_dir=xml", "data.img_size=64", "train.epochs=1", "train.batch_size=4",
                  "train.workers=0", "train.threads=1", "model.backbone_weights=null",
                  f"output_dir={tmp_path / 'det'}")  # fmt: skip
    assert train.returncode == 0, train.stderr
    best = tmp_path / "det" / "best.pt"
    val = _tool("val_det", "--weights", str(best), "--out", str(tmp_path / "val"), f"imports=[{PLUGIN}]")
    assert val.returncode == 0, val.stderr
    stored = torch.load(best, map_location="cpu", weights_only=True)
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert len(metrics["coco_stats"]) == 12
    assert np.allclose(metrics["coco_stats"], stored["metrics"]["coco_stats"], rtol=0.0, atol=1e-6)
    gt = json.loads((tmp_path / "val" / "gt.json").read_text())
    assert [image["id"] for image in gt["images"]] == list(range(12))
    assert [c["name"] for c in gt["categories"]] == stored["class_names"] == sorted(stored["class_names"])
    assert len(gt["annotations"]) == sum(len(objects) for _, objects in written["val"])
    images = str(root / "JPEGImages" / "*.jpg")
    pred = _tool("predict", "--weights", str(best), "--source", images, "--out", str(tmp_path / "pred"), "--conf",
                 "0.001", "--imports", PLUGIN)  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    listed = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert [entry["file"] for entry in listed] == [str(p) for p in sorted((root / "JPEGImages").glob("*.jpg"))]
    found = [d for entry in listed for d in entry["detections"]]
    assert found and all(stored["class_names"][d["label"]] == d["class"] for d in found)
