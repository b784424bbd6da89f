"""COCO json: ground truth from CUB matches bounding_boxes.txt exactly; the reader's labels, crowd and errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from backbones.errors import UserError
from detect.data.coco import CocoDetection, write_coco_json
from detect.data.cub import CubDetection, read_cub


@pytest.mark.parametrize("labels", ["species", "bird"])
def test_json_from_cub_matches_the_cub_files_exactly(synth_cub_root: Path, tmp_path: Path, labels: str) -> None:
    source = CubDetection(synth_cub_root, "all", labels=labels)
    path = write_coco_json(source, tmp_path / "gt" / "instances.json")
    assert [p.name for p in path.parent.iterdir()] == ["instances.json"]  # no temp file left behind
    gt = json.loads(path.read_text())
    data = read_cub(synth_cub_root)
    assert [image["id"] for image in gt["images"]] == data.image_ids.tolist()
    assert [image["file_name"] for image in gt["images"]] == data.image_paths
    for image, index in zip(gt["images"], range(len(source)), strict=True):
        assert (image["height"], image["width"]) == source.image_size(index)
    annotations = gt["annotations"]
    assert [a["image_id"] for a in annotations] == data.image_ids.tolist()
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    assert [a["bbox"] for a in annotations] == data.boxes_xywh.tolist()  # exact, as in bounding_boxes.txt
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0 for a in annotations)
    if labels == "species":
        assert [a["category_id"] for a in annotations] == data.class_ids.tolist()
        assert gt["categories"] == [
            {"id": k, "name": n} for k, n in zip(data.category_ids, data.class_names, strict=True)
        ]
    else:
        assert {a["category_id"] for a in annotations} == {1} and gt["categories"] == [{"id": 1, "name": "bird"}]


def test_pycocotools_reads_it_and_ground_truth_scores_one(synth_cub_root: Path, tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = write_coco_json(CubDetection(synth_cub_root, "test"), tmp_path / "gt.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        detections = [dict(a, score=1.0) for a in gt.dataset["annotations"]]
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0) and evaluator.stats[1] == pytest.approx(1.0)


def test_reader_round_trip_of_a_written_json(synth_cub_root: Path, tmp_path: Path) -> None:
    cub = CubDetection(synth_cub_root, "train")
    coco = CocoDetection(write_coco_json(cub, tmp_path / "train.json"), image_dir=cub.image_dir)
    assert coco.image_ids == cub.image_ids and coco.category_ids == cub.category_ids
    assert coco.class_names == cub.class_names
    for index in range(len(cub)):
        assert coco.image_path(index) == cub.image_path(index)
        assert coco.image_size(index) == cub.image_size(index)
        for mine, theirs in zip(coco.annotations(index), cub.annotations(index), strict=True):
            np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(coco.load_image(0), cub.load_image(0))


def _write(folder: Path, data: dict) -> Path:
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco_dict(tmp_path: Path) -> dict:
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.jpg"), np.zeros((30, 40, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "images" / "b.png"), np.zeros((20, 50), np.uint8))
    return {
        "images": [{"id": 10, "file_name": "a.jpg", "width": 40, "height": 30}, {"id": 4, "file_name": "b.png"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 10, 5]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [30, 20, 20, 20], "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 40, 30], "iscrowd": 1},
            {"id": 4, "image_id": 4, "category_id": 7, "bbox": [5.5, 0.25, 2, 3]},
        ],
        "categories": [{"id": 7, "name": "gull"}, {"id": 3, "name": "tern"}],
    }


def test_reader_labels_crowd_default_folder_and_clipping(tmp_path: Path, coco_dict: dict) -> None:
    source = CocoDetection(_write(tmp_path, coco_dict))
    assert source.image_dir == tmp_path / "images"  # <json folder>/images when it exists
    assert source.category_ids == [3, 7] and source.class_names == ["tern", "gull"]
    assert source.image_ids == [10, 4] and len(source) == 2
    boxes, labels = source.annotations(0)
    np.testing.assert_array_equal(boxes, [[1, 2, 11, 7], [30, 20, 40, 30]])  # crowd skipped, second clipped
    assert labels.tolist() == [1, 0]
    assert source.box_fixes.clipped == 1
    assert source.image_size(1) == (20, 50)  # no width / height in the json: read from the header
    assert source.load_image(1).shape == (20, 50, 3)
    np.testing.assert_array_equal(source.annotations(1)[0], [[5.5, 0.25, 7.5, 3.25]])


def test_default_image_dir_without_images_folder(tmp_path: Path, coco_dict: dict) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert CocoDetection(_write(other, coco_dict)).image_dir == other


BROKEN = {
    "missing categories": (lambda d: d.pop("categories"), "misses the list 'categories'"),
    "annotation without bbox": (lambda d: d["annotations"][1].pop("bbox"), "annotation 2 misses key 'bbox'"),
    "unknown category": (lambda d: d["annotations"][3].update(category_id=5), "annotation 4: unknown category_id 5"),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=99), "annotation 1: unknown image_id 99"),
    "bad bbox": (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation 1: bbox must be 4"),
    "duplicate image": (lambda d: d["images"][1].update(id=10), "duplicate image id 10"),
    "duplicate annotation": (lambda d: d["annotations"][1].update(id=1), "duplicate annotation id 1"),
    "image without file": (lambda d: d["images"][0].pop("file_name"), "image 10 misses key 'file_name'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_malformed_json_names_the_entry(tmp_path: Path, coco_dict: dict, case: str) -> None:
    change, message = BROKEN[case]
    change(coco_dict)
    with pytest.raises(UserError, match=message) as error:
        CocoDetection(_write(tmp_path, coco_dict))
    assert "instances.json" in str(error.value)


def test_invalid_and_missing_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(UserError, match=r"invalid JSON.*bad.json, line 2"):
        CocoDetection(bad)
    with pytest.raises(UserError, match="not found.*nope.json"):
        CocoDetection(tmp_path / "nope.json")
