"""CUB_200_2011 reader on hand-written mini data sets: exact parsing, grayscale, border boxes, every malformed case."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from backbones.errors import UserError
from detect.data.cub import CubClassification, CubDetection, find_cub_root, read_cub
from detect.data.source import DetectionSource, audit_boxes, read_image_rgb, read_image_size, sanitize_boxes

CLASSES = "1 001.Red_Bird\n2 002.Blue_Bird\n"
IMAGES = (
    "1 001.Red_Bird/red_0.jpg\n2 001.Red_Bird/red_1.jpg\n3 002.Blue_Bird/blue_0.jpg\n4 002.Blue_Bird/blue_gray.jpg\n"
)
LABELS = "1 1\n2 1\n3 2\n4 2\n"
SPLIT = "1 1\n2 0\n3 1\n4 0\n"
# image 2: the box sticks out right and bottom (64 x 48 image); image 4: grayscale, box touching the left border
BOXES = "1 10.0 5.0 20.0 30.0\n2 50.5 40.0 20.0 10.0\n3 0.0 0.0 64.0 48.0\n4 0.0 12.25 7.5 9.0\n"
SIZES = {"red_0": (48, 64), "red_1": (48, 64), "blue_0": (48, 64), "blue_gray": (40, 56)}


def write_cub(holder: Path, **files: str) -> Path:
    """A mini CUB_200_2011 under `holder`; keyword arguments replace annotation files (stem -> text, None = absent)."""
    root = holder / "CUB_200_2011"
    contents = {"classes": CLASSES, "images": IMAGES, "image_class_labels": LABELS}
    contents.update(train_test_split=SPLIT, bounding_boxes=BOXES)
    contents.update(files)
    for line in IMAGES.splitlines():
        relative = line.split()[1]
        stem = Path(relative).stem
        height, width = SIZES[stem]
        path = root / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = np.full((height, width, 3), (30, 60, 200), np.uint8)  # BGR: red-ish blue, tells RGB from BGR
        cv2.imwrite(str(path), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY) if "gray" in stem else colour)
    for stem, text in contents.items():
        if text is not None:
            (root / f"{stem}.txt").write_text(text)
    return root


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    return write_cub(tmp_path)


def test_read_cub_parses_every_file_exactly(cub: Path) -> None:
    data = read_cub(cub.parent)
    assert data.root == cub
    assert data.image_ids.tolist() == [1, 2, 3, 4]
    assert data.image_paths == [
        "001.Red_Bird/red_0.jpg",
        "001.Red_Bird/red_1.jpg",
        "002.Blue_Bird/blue_0.jpg",
        "002.Blue_Bird/blue_gray.jpg",
    ]
    assert data.class_ids.tolist() == [1, 1, 2, 2] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.is_train.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(
        data.boxes_xywh, [[10, 5, 20, 30], [50.5, 40, 20, 10], [0, 0, 64, 48], [0, 12.25, 7.5, 9]]
    )
    assert data.category_ids == [1, 2]
    assert data.raw_class_names == ["001.Red_Bird", "002.Blue_Bird"]
    assert data.class_names == ["Red_Bird", "Blue_Bird"]
    assert data.split_indices("train").tolist() == [0, 2] and data.split_indices("all").tolist() == [0, 1, 2, 3]


def test_find_cub_root_accepts_both_folders_and_names_a_missing_one(cub: Path, tmp_path: Path) -> None:
    assert find_cub_root(cub) == cub and find_cub_root(cub.parent) == cub
    with pytest.raises(UserError, match="not found.*nowhere"):
        find_cub_root(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="images.txt.*empty"):
        find_cub_root(tmp_path / "empty")


def test_detection_species_and_bird_labels(cub: Path) -> None:
    species = CubDetection(cub, "train", labels="species")
    assert isinstance(species, DetectionSource)
    assert species.image_ids == [1, 3] and species.category_ids == [1, 2] and len(species) == 2
    assert species.class_names == ["Red_Bird", "Blue_Bird"]
    boxes, labels = species.annotations(0)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(boxes, [[10, 5, 30, 35]])
    assert labels.tolist() == [0]
    np.testing.assert_array_equal(species.annotations(1)[0], [[0, 0, 64, 48]])  # whole image: not a clip
    assert species.annotations(1)[1].tolist() == [1]
    assert species.box_fixes.clipped == 0
    bird = CubDetection(cub, "test", labels="bird")
    assert bird.class_names == ["bird"] and bird.category_ids == [1] and bird.image_ids == [2, 4]
    assert bird.annotations(1)[1].tolist() == [0]
    np.testing.assert_array_equal(bird.annotations(1)[0], [[0, 12.25, 7.5, 21.25]])


def test_grayscale_jpeg_becomes_rgb(cub: Path) -> None:
    source = CubDetection(cub, "test")
    image = source.load_image(1)
    assert image.shape == (40, 56, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert source.image_size(1) == (40, 56)
    colour = source.load_image(0)
    assert colour.shape == (48, 64, 3) and abs(int(colour[5, 5, 0]) - 200) <= 3  # RGB order: red channel first


def test_border_box_is_clipped_and_counted_once(cub: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = CubDetection(cub, "test")
    with caplog.at_level(logging.WARNING, logger="plugdet.data"):
        boxes, labels = source.annotations(0)
        source.annotations(0)  # a second read is not counted again
    np.testing.assert_array_equal(boxes, [[50.5, 40, 64, 48]])
    assert labels.tolist() == [0]
    assert source.box_fixes.clipped == 1 and source.box_fixes.dropped == 0
    assert len(caplog.records) == 1
    assert "bounding_boxes.txt, line 2" in caplog.text and "red_1.jpg" in caplog.text
    assert audit_boxes(source) == (1, 0)


def test_zero_area_box_is_dropped_and_counted(tmp_path: Path) -> None:
    root = write_cub(tmp_path, bounding_boxes=BOXES.replace("1 10.0 5.0 20.0 30.0", "1 10.0 5.0 0.0 30.0"))
    source = CubDetection(root, "train")
    boxes, labels = source.annotations(0)
    assert boxes.shape == (0, 4) and labels.shape == (0,)
    assert audit_boxes(source) == (0, 1)


def test_classification_dataset(cub: Path) -> None:
    train = CubClassification(cub.parent, "train")
    assert len(train) == 2 and train.num_classes == 2 and train.labels.tolist() == [0, 1]
    image, label = train[1]
    assert image.shape == (48, 64, 3) and label == 1
    flipped = CubClassification(cub, "test", transform=lambda image: {"image": image[:, ::-1].shape})
    assert flipped[1] == ((40, 56, 3), 1)
    assert len(CubClassification(cub, "all")) == 4


def test_sources_survive_pickling_for_workers(cub: Path) -> None:
    source = CubDetection(cub, "train")
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.annotations(0)[0], source.annotations(0)[0])


def test_header_size_and_unreadable_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="cannot read image.*bad.jpg"):
        read_image_rgb(bad)
    with pytest.raises(UserError, match="bad.jpg"):
        read_image_size(bad)
    with pytest.raises(UserError, match="not found.*missing.jpg"):
        read_image_rgb(tmp_path / "missing.jpg")


def test_missing_image_is_named(tmp_path: Path) -> None:
    root = write_cub(tmp_path)
    (root / "images" / "001.Red_Bird" / "red_0.jpg").unlink()
    source = CubDetection(root, "train")
    with pytest.raises(UserError, match="red_0.jpg"):
        source.load_image(0)


MALFORMED = {
    "truncated box line": ("bounding_boxes", BOXES.replace("3 0.0 0.0 64.0 48.0", "3 0.0 0.0 64.0"), r"line 3"),
    "non-numeric box": ("bounding_boxes", BOXES.replace("2 50.5", "2 5o.5"), r"line 2"),
    "non-finite box": ("bounding_boxes", BOXES.replace("12.25", "nan"), r"line 4"),
    "non-numeric image id": ("images", IMAGES.replace("3 002", "x3 002"), r"line 3"),
    "truncated images line": ("images", IMAGES + "5\n", r"line 5"),
    "duplicate image id": ("images", IMAGES.replace("4 002", "2 002"), r"duplicate.*line 4"),
    "duplicate label id": ("image_class_labels", LABELS + "1 2\n", r"duplicate.*line 5"),
    "id absent from images": ("train_test_split", SPLIT + "9 1\n", r"image id 9.*line 5"),
    "id absent from boxes": ("bounding_boxes", BOXES.replace("3 0.0 0.0 64.0 48.0\n", ""), r"images.txt line 3"),
    "class id out of range": ("image_class_labels", LABELS.replace("3 2", "3 3"), r"class id 3 out of range.*line 3"),
    "non-numeric class id": ("image_class_labels", LABELS.replace("2 1", "2 one"), r"line 2"),
    "bad is_train": ("train_test_split", SPLIT.replace("2 0", "2 2"), r"is_train.*line 2"),
    "duplicate class": ("classes", CLASSES + "2 003.Green_Bird\n", r"duplicate class id 2.*line 3"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_name_file_and_line(tmp_path: Path, case: str) -> None:
    stem, text, pattern = MALFORMED[case]
    root = write_cub(tmp_path, **{stem: text})
    with pytest.raises(UserError, match=pattern) as error:
        read_cub(root)
    assert f"{stem}.txt" in str(error.value) and "line" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("stem", ["images", "image_class_labels", "train_test_split", "bounding_boxes", "classes"])
def test_missing_or_empty_file_is_named(tmp_path: Path, stem: str) -> None:
    holder = tmp_path / "a"
    with pytest.raises(UserError, match=rf"{stem}.txt"):
        read_cub(write_cub(holder, **{stem: ""}) if stem != "images" else write_cub(holder, images=""))
    if stem != "images":  # without images.txt the folder is not a CUB root at all (find_cub_root says so)
        with pytest.raises(UserError, match=rf"missing.*{stem}.txt"):
            read_cub(write_cub(tmp_path / "b", **{stem: None}))


def test_empty_split_unknown_split_and_label_mode(tmp_path: Path) -> None:
    root = write_cub(tmp_path, train_test_split="1 1\n2 1\n3 1\n4 1\n")
    with pytest.raises(UserError, match="split 'test' has no images.*train_test_split.txt"):
        CubDetection(root, "test")
    with pytest.raises(UserError, match="split 'val'"):
        CubClassification(root, "val")
    with pytest.raises(UserError, match="label mode 'birds'"):
        CubDetection(root, "train", labels="birds")


def test_synthetic_fixture_reads_as_cub(synth_cub_root: Path) -> None:
    train, test = CubDetection(synth_cub_root, "train"), CubDetection(synth_cub_root, "test")
    assert len(train) == 12 and len(test) == 12 and len(train.class_names) == 4
    assert sorted(train.image_ids + test.image_ids) == list(range(1, 25))
    for index in range(len(train)):
        height, width = train.image_size(index)
        assert 72 <= height <= 96 and 96 <= width <= 128
        assert train.load_image(index).shape == (height, width, 3)
        assert len(train.annotations(index)[0]) == 1
    assert train.box_fixes.clipped == 0 and train.box_fixes.dropped == 0


def test_sanitize_boxes_exact() -> None:
    boxes = np.array([[-2, 1, 5, 9], [3, 3, 3, 8], [0, 0, 10.0005, 8], [np.nan, 0, 1, 1], [4, 7, 12, 20]])
    fixed = sanitize_boxes(boxes, np.arange(5), height=8, width=10)
    np.testing.assert_array_equal(fixed.boxes, [[0, 1, 5, 8], [0, 0, 10, 8], [4, 7, 10, 8]])
    assert fixed.boxes.dtype == np.float32 and fixed.labels.tolist() == [0, 2, 4]
    assert (fixed.clipped, fixed.dropped) == (2, 2)  # 10.0005 is within the rounding tolerance: clipped silently
    empty = sanitize_boxes(np.zeros((0, 4)), np.zeros(0), 8, 10)
    assert empty.boxes.shape == (0, 4) and (empty.clipped, empty.dropped) == (0, 0)
