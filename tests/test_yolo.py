"""YOLO txt: CUB -> export -> reader round trip, Ultralytics reads our export identically, label-file errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from backbones.errors import UserError
from detect.data.cub import CubDetection
from detect.data.yolo_txt import YoloDetection, export_yolo, label_path


@pytest.fixture(scope="module")
def exported(synth_cub_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("yolo")
    export_yolo(CubDetection(synth_cub_root, "train"), out, "train")
    return export_yolo(CubDetection(synth_cub_root, "test"), out, "test")


@pytest.mark.parametrize("split", ["train", "test"])
def test_round_trip_gives_the_same_boxes_and_labels(synth_cub_root: Path, exported: Path, split: str) -> None:
    cub = CubDetection(synth_cub_root, split)
    yolo = YoloDetection(exported, split)
    assert yolo.class_names == cub.class_names and yolo.category_ids == [1, 2, 3, 4]
    assert len(yolo) == len(cub) and yolo.image_ids == list(range(len(cub)))
    by_name = {cub.image_path(i).name: i for i in range(len(cub))}
    for index in range(len(yolo)):
        theirs = by_name[yolo.image_path(index).name]
        assert yolo.image_path(index).is_symlink()
        assert yolo.image_path(index).resolve() == cub.image_path(theirs).resolve()
        assert yolo.image_size(index) == cub.image_size(theirs)
        boxes, labels = yolo.annotations(index)
        np.testing.assert_allclose(boxes, cub.annotations(theirs)[0], atol=1e-3, rtol=0)
        assert labels.tolist() == cub.annotations(theirs)[1].tolist()
    assert yolo.box_fixes.clipped == 0


def test_data_yaml_lists_both_splits(exported: Path) -> None:
    data = yaml.safe_load(exported.read_text())
    assert Path(data["path"]) == exported.parent.resolve()
    assert (data["train"], data["val"], data["test"], data["nc"]) == ("images/train", "images/test", "images/test", 4)
    assert data["names"][0] == "Common_Finch" and sorted(data["names"]) == [0, 1, 2, 3]
    label = exported.parent / "labels" / "train" / "001.Common_Finch"
    first = sorted(label.glob("*.txt"))[0].read_text().split()
    assert len(first) == 5 and first[0] == "0"


def test_ultralytics_reads_our_export_identically(exported: Path) -> None:
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(exported))
    theirs = YOLODataset(img_path=data["train"], data=data, augment=False, imgsz=128, task="detect").labels
    ours = YoloDetection(exported, "train")
    assert [label["im_file"] for label in theirs] == [str(ours.image_path(i)) for i in range(len(ours))]
    for index, label in enumerate(theirs):
        height, width = ours.image_size(index)
        assert tuple(label["shape"]) == (height, width)
        assert label["cls"].ravel().tolist() == ours.annotations(index)[1].tolist()
        cx, cy, w, h = label["bboxes"][0]
        expected = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        np.testing.assert_allclose(ours.annotations(index)[0][0], expected, atol=1e-3)


def test_export_refuses_to_overwrite_a_split(synth_cub_root: Path, exported: Path) -> None:
    with pytest.raises(UserError, match="not empty"):
        export_yolo(CubDetection(synth_cub_root, "train"), exported.parent, "train")


def _dataset(tmp_path: Path, labels: dict[str, str | None], names: object = None, extra: str = "") -> Path:
    images = tmp_path / "set" / "images" / "train"
    images.mkdir(parents=True)
    (tmp_path / "set" / "labels" / "train").mkdir(parents=True)
    for stem, text in labels.items():
        cv2.imwrite(str(images / f"{stem}.jpg"), np.zeros((50, 100, 3), np.uint8))
        if text is not None:
            (tmp_path / "set" / "labels" / "train" / f"{stem}.txt").write_text(text)
    path = tmp_path / "set" / "data.yaml"
    names = names if names is not None else {0: "a", 1: "b"}
    path.write_text(yaml.safe_dump({"path": ".", "train": "images/train", "names": names}) + extra)
    return path


def test_reader_on_hand_written_labels(tmp_path: Path) -> None:
    path = _dataset(tmp_path, {"b_img": "1 0.5 0.5 0.2 0.4\n\n0 0.05 0.5 0.2 0.2\n", "a_img": None}, names=["a", "b"])
    source = YoloDetection(path, "train")
    assert [p.name for p in map(source.image_path, range(2))] == ["a_img.jpg", "b_img.jpg"]  # sorted paths
    assert source.annotations(0)[0].shape == (0, 4)  # missing label file: no boxes
    boxes, labels = source.annotations(1)
    np.testing.assert_allclose(boxes, [[40, 15, 60, 35], [0, 20, 15, 30]], atol=1e-4)  # second one clipped at x=0
    assert labels.tolist() == [1, 0] and source.box_fixes.clipped == 1
    assert label_path(source.image_path(1)) == tmp_path / "set" / "labels" / "train" / "b_img.txt"


BAD_LINES = {
    "four fields": ("0 0.5 0.5 0.2\n", r"expected 5 fields.*x.txt, line 1"),
    "segment line": ("0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.2 0.2 0.3 0.3\n", r"got 7.*x.txt, line 2"),
    "outside [0, 1]": ("0 0.5 0.5 0.2 0.2\n\n0 1.2 0.5 0.2 0.2\n", r"normalised.*x.txt, line 3"),
    "negative": ("1 0.5 -0.1 0.2 0.2\n", r"normalised.*x.txt, line 1"),
    "class out of range": ("2 0.5 0.5 0.2 0.2\n", r"class index 2 out of range.*x.txt, line 1"),
    "non-numeric": ("0 0.5 half 0.2 0.2\n", r"non-numeric.*x.txt, line 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_label_lines_name_file_and_line(tmp_path: Path, case: str) -> None:
    text, pattern = BAD_LINES[case]
    with pytest.raises(UserError, match=pattern):
        YoloDetection(_dataset(tmp_path, {"x": text}), "train")


def test_bad_yaml(tmp_path: Path) -> None:
    path = _dataset(tmp_path, {"x": ""})
    with pytest.raises(UserError, match="no 'val' entry"):
        YoloDetection(path, "val")
    path.write_text("path: .\ntrain: images/train\nnames: [a, b]\nnc: 3\n")
    with pytest.raises(UserError, match="'nc' is 3"):
        YoloDetection(path, "train")
    path.write_text("path: .\ntrain: images/nowhere\nnames: [a]\n")
    with pytest.raises(UserError, match="does not exist.*nowhere"):
        YoloDetection(path, "train")
    path.write_text("path: .\ntrain: images/train\nnames: [a\n")
    with pytest.raises(UserError, match="invalid YAML.*data.yaml, line"):
        YoloDetection(path, "train")
    with pytest.raises(UserError, match="not found"):
        YoloDetection(tmp_path / "none.yaml", "train")


def test_list_file_split(tmp_path: Path) -> None:
    path = _dataset(tmp_path, {"x": "0 0.5 0.5 0.5 0.5\n", "y": ""})
    (path.parent / "train.txt").write_text("./images/train/x.jpg\nimages/train/y.jpg\n")
    path.write_text("path: .\ntrain: train.txt\nnames: [a, b]\n")
    source = YoloDetection(path, "train")
    assert [source.image_path(i).name for i in range(len(source))] == ["x.jpg", "y.jpg"]
    np.testing.assert_allclose(source.annotations(0)[0], [[25, 12.5, 75, 37.5]])
