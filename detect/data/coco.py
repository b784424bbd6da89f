"""COCO json: a reader (detection source) and a ground-truth writer (for pycocotools and for users' tools).

Reader conventions (`CocoDetection`):

- Required keys: `images` (`id`, `file_name`; `width`/`height` optional, read from the image header when absent),
  `annotations` (`id`, `image_id`, `category_id`, `bbox` = [x, y, w, h] top-left + size in pixels; `iscrowd`
  optional) and `categories` (`id`, `name`). A missing key, a duplicate id, an unknown image or category id in an
  annotation raises `UserError` naming the json file and the annotation / image / category.
- Labels are contiguous 0..C-1 in sorted category-id order; `category_ids[label]` gives the COCO id back.
- `iscrowd: 1` annotations are not training targets (as in YOLOv8 / torchvision references) and are skipped;
  evaluate against the original json to keep them as ignore regions.
- `image_ids` are the json's image ids, in the order of the `images` list.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.checkpoint import atomic_write_bytes
from backbones.errors import UserError
from detect.boxes import xywh2xyxy, xyxy2xywh
from detect.data.source import BoxFixLog, DetectionSource, ImageFiles, read_text, sanitize_boxes

LOGGER = logging.getLogger("plugdet.data")


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"COCO json not found: {path}")
    try:
        data = json.loads(read_text(path, "COCO json"))
    except json.JSONDecodeError as error:
        raise UserError(f"invalid JSON ({error.msg}): {path}, line {error.lineno}") from None
    if not isinstance(data, dict):
        raise UserError(f"COCO json must hold an object with images / annotations / categories: {path}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"COCO json misses the list '{key}': {path}")
    return data


def _require(entry: Any, keys: tuple[str, ...], what: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{what} is not an object: {path}")
    for key in keys:
        if key not in entry:
            raise UserError(f"{what} misses key '{key}': {path}")


def _is_int(value: Any) -> bool:
    """A JSON integer (`true` / `false` are not ids, though Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))


def _index_by_id(entries: list, keys: tuple[str, ...], kind: str, path: Path) -> dict[int, dict]:
    """{id: entry} keeping list order; missing keys, ids that are not integers, and duplicate ids are errors naming
    the entry; so are text fields (`file_name`, `name`) that are not text and image sizes that are not positive
    integers."""
    by_id: dict[int, dict] = {}
    for position, entry in enumerate(entries):
        name = f"{kind} {entry.get('id', f'#{position}')!r}" if isinstance(entry, dict) else f"{kind} #{position}"
        _require(entry, keys, name, path)
        if not _is_int(entry["id"]):
            raise UserError(f"{name}: id must be an integer: {path}")
        for key in ("file_name", "name"):
            if key in keys and (not isinstance(entry[key], str) or not entry[key]):
                raise UserError(f"{name}: {key} must be a non-empty string, got {entry[key]!r}: {path}")
        for key in ("width", "height"):
            if kind == "image" and key in entry and not (_is_int(entry[key]) and entry[key] > 0):
                raise UserError(f"{name}: {key} must be a positive integer (pixels), got {entry[key]!r}: {path}")
        if entry["id"] in by_id:
            raise UserError(f"duplicate {kind} id {entry['id']}: {path}")
        by_id[entry["id"]] = entry
    return by_id


class CocoDetection(ImageFiles):
    """A COCO instances json as a detection source (see the module docstring for the conventions).

    Args:
        json_path: the annotation file.
        image_dir: folder that `file_name`s are relative to. Default: `<json folder>/images` if that folder
            exists, else the json's own folder. Absolute `file_name`s are used as they are.
    """

    def __init__(self, json_path: str | Path, image_dir: str | Path | None = None) -> None:
        self.json_path = Path(json_path)
        data = _load_json(self.json_path)
        if image_dir is None:
            images_folder = self.json_path.parent / "images"
            image_dir = images_folder if images_folder.is_dir() else self.json_path.parent
        self.image_dir = Path(image_dir)
        categories = _index_by_id(data["categories"], ("id", "name"), "category", self.json_path)
        images = _index_by_id(data["images"], ("id", "file_name"), "image", self.json_path)
        if not images:
            raise UserError(f"COCO json has no images: {self.json_path}")
        self.category_ids = sorted(categories)
        self.class_names = [str(categories[key]["name"]) for key in self.category_ids]
        label_of = {key: label for label, key in enumerate(self.category_ids)}
        self.image_ids = list(images)
        self._files = [self.image_dir / str(images[key]["file_name"]) for key in self.image_ids]
        self._sizes: dict[int, tuple[int, int]] = {}
        for index, key in enumerate(self.image_ids):
            if "width" in images[key] and "height" in images[key]:
                self._sizes[index] = (int(images[key]["height"]), int(images[key]["width"]))
        row_of = {key: index for index, key in enumerate(self.image_ids)}
        boxes: list[list[list[float]]] = [[] for _ in self.image_ids]
        labels: list[list[int]] = [[] for _ in self.image_ids]
        crowd = 0
        seen: set[int] = set()
        for annotation in data["annotations"]:
            what = f"annotation {annotation.get('id', '?') if isinstance(annotation, dict) else '?'!r}"
            _require(annotation, ("id", "image_id", "category_id", "bbox"), what, self.json_path)
            for key in ("id", "image_id", "category_id"):
                if not _is_int(annotation[key]):
                    raise UserError(f"{what}: {key} must be an integer, got {annotation[key]!r}: {self.json_path}")
            if annotation.get("iscrowd", 0) not in (0, 1) or isinstance(annotation.get("iscrowd"), float):
                raise UserError(f"{what}: iscrowd must be 0 or 1, got {annotation['iscrowd']!r}: {self.json_path}")
            if annotation["id"] in seen:
                raise UserError(f"duplicate annotation id {annotation['id']}: {self.json_path}")
            seen.add(annotation["id"])
            if annotation["category_id"] not in label_of:
                raise UserError(f"{what}: unknown category_id {annotation['category_id']}: {self.json_path}")
            if annotation["image_id"] not in row_of:
                raise UserError(f"{what}: unknown image_id {annotation['image_id']}: {self.json_path}")
            bbox = annotation["bbox"]
            valid = isinstance(bbox, list) and len(bbox) == 4
            if not valid or not all(map(_is_number, bbox)):
                raise UserError(f"{what}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}: {self.json_path}")
            if annotation.get("iscrowd", 0):
                crowd += 1
                continue
            boxes[row_of[annotation["image_id"]]].append([float(v) for v in bbox])
            labels[row_of[annotation["image_id"]]].append(label_of[annotation["category_id"]])
        if crowd:
            LOGGER.info("%s: %d iscrowd annotation(s) skipped (not training targets)", self.json_path, crowd)
        self._boxes = [xywh2xyxy(torch.tensor(b, dtype=torch.float64).reshape(-1, 4)).numpy() for b in boxes]
        self._labels = [np.asarray(item, dtype=np.int64) for item in labels]
        self.box_fixes = BoxFixLog(f"COCO {self.json_path.name}")

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """`(boxes float32 [n, 4] xyxy pixels, labels int64 [n])` without crowd boxes, clipped to the image."""
        height, width = self.image_size(index)
        fixed = sanitize_boxes(self._boxes[index], self._labels[index], height, width)
        where = f"{self.json_path}, image id {self.image_ids[index]}"
        self.box_fixes.record(index, where, fixed.clipped, fixed.dropped)
        return fixed.boxes, fixed.labels


def _file_name(path: Path, image_dir: Path | None) -> str:
    """`path` relative to `image_dir` when it lies inside it, else the absolute path."""
    if image_dir is not None:
        try:
            return path.resolve().relative_to(image_dir.resolve()).as_posix()
        except ValueError:
            pass
    return str(path.resolve())


def coco_ground_truth(source: DetectionSource, image_dir: str | Path | None = None) -> dict[str, Any]:
    """COCO ground-truth dict of a detection source.

    Args:
        source: any detection source.
        image_dir: folder the `file_name`s are made relative to; default `source.image_dir` when the source has
            one; images outside it get absolute paths.

    Returns:
        `{"info", "licenses", "images" (id, file_name, width, height), "annotations" (id 1..M, image_id,
        category_id = source.category_ids[label], bbox [x, y, w, h], area w*h, iscrowd 0), "categories" (id, name)}`.
    """
    folder = image_dir if image_dir is not None else getattr(source, "image_dir", None)
    folder = Path(folder) if folder is not None else None
    images, annotations = [], []
    for index in range(len(source)):
        height, width = source.image_size(index)
        image_id = int(source.image_ids[index])
        name = _file_name(source.image_path(index), folder)
        images.append({"id": image_id, "file_name": name, "width": int(width), "height": int(height)})
        boxes, labels = source.annotations(index)
        xywh = xyxy2xywh(torch.from_numpy(np.asarray(boxes, dtype=np.float64))).numpy()  # [n, 4]
        for box, label in zip(xywh, labels, strict=True):
            x, y, w, h = (round(float(v), 4) for v in box)  # float32 corners: 4 decimals drop the float noise
            category_id = int(source.category_ids[int(label)])
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h]}
                | {"area": w * h, "iscrowd": 0}
            )
    pairs = zip(source.category_ids, source.class_names, strict=True)
    categories = [{"id": int(key), "name": name} for key, name in pairs]
    info = {"description": "ground truth written by plugdet", "version": "1.0"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def write_coco_json(source: DetectionSource, path: str | Path, image_dir: str | Path | None = None) -> Path:
    """Write `coco_ground_truth(source, image_dir)` to `path` atomically (temp file, fsync, `os.replace`).

    Returns:
        The json path.
    """
    return atomic_write_bytes(json.dumps(coco_ground_truth(source, image_dir)).encode("utf-8"), path)
