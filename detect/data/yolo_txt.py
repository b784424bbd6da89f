"""YOLO txt data sets (Ultralytics `data.yaml`): a reader (detection source) and an exporter.

`data.yaml` keys: `path` (data set root; relative to the yaml's folder, else to the working directory; default the
yaml's folder), `train` / `val` / `test` (each a folder searched recursively for images, a .txt file listing
images, or a list of those, relative to `path`; in a list file, `./x` is relative to the list file and other
relative entries to `path`), `names` (a list, or a dict {index: name} with indices 0..C-1) and optionally `nc`.

Labels follow the Ultralytics rule: the last `/images/` of an image path becomes `/labels/` and the extension
`.txt`; a missing label file means an image without boxes. Each line is `class cx cy w h`, the box normalised to
[0, 1] by the image width / height; a line with another number of fields, a non-numeric value, a value outside
[0, 1] or a class index outside 0..C-1 raises `UserError` naming the file and line.

As a detection source: `image_ids` are 0..N-1 in sorted path order (Ultralytics' order) and `category_ids` are
class index + 1, so that COCO ground truth written from a YOLO data set has category ids 1..C as COCO expects
(label k <-> YOLO class k <-> category id k + 1).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from backbones.checkpoint import atomic_write_bytes
from backbones.errors import UserError
from detect.boxes import cxcywh2xyxy, xyxy2cxcywh
from detect.data.source import (
    IMAGE_EXTENSIONS,
    BoxFixLog,
    DetectionSource,
    ImageFiles,
    read_text,
    sanitize_boxes,
)


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"data.yaml not found: {path}")
    try:
        data = yaml.safe_load(read_text(path, "data.yaml"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"invalid YAML: {path}{where}") from None
    if not isinstance(data, dict):
        raise UserError(f"data.yaml must be a mapping with path / train / val / names: {path}")
    return data


def _class_names(data: dict[str, Any], path: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        if not all(isinstance(key, int) for key in names) or sorted(names) != list(range(len(names))):
            raise UserError(f"data.yaml 'names' keys must be 0..{len(names) - 1}: {path}")
        names = [names[index] for index in range(len(names))]
    if not isinstance(names, list) or not names:
        raise UserError(f"data.yaml misses a non-empty 'names' list or dict: {path}")
    if "nc" in data and data["nc"] != len(names):
        raise UserError(f"data.yaml 'nc' is {data['nc']} but 'names' has {len(names)} entries: {path}")
    return [str(name) for name in names]


def _image_files(entry: Any, root: Path, key: str, yaml_path: Path) -> list[Path]:
    """Image files of one split entry (folder, list file or list of those)."""
    files: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        location = root / str(item)
        if location.is_dir():
            files += [p for p in location.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        elif location.is_file() and location.suffix == ".txt":
            for line in read_text(location, f"data.yaml '{key}' list file").split("\n"):
                line = line.strip()
                if line:
                    files.append(location.parent / line[2:] if line.startswith("./") else root / line)
        elif location.is_file():
            files.append(location)
        else:
            raise UserError(f"data.yaml '{key}' path does not exist: {location} (from {yaml_path})")
    return sorted({Path(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}, key=str)


def label_path(image_path: Path) -> Path:
    """Ultralytics' rule: the last `/images/` becomes `/labels/` and the extension `.txt`."""
    text = os.fspath(image_path)
    marker = f"{os.sep}images{os.sep}"
    if marker in text:
        head, tail = text.rsplit(marker, 1)
        text = f"{head}{os.sep}labels{os.sep}{tail}"
    return Path(text).with_suffix(".txt")


def read_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse one YOLO label file.

    Returns:
        `(classes int64 [n], boxes float64 [n, 4] normalised cxcywh)`; a missing file gives n = 0.
    """
    classes, boxes = [], []
    if not path.is_file():
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float64)
    for line_no, line in enumerate(read_text(path, "YOLO label file").split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {line_no}"
        if len(fields) != 5:
            raise UserError(f"expected 5 fields 'class cx cy w h', got {len(fields)}: {where}")
        try:
            values = [float(text) for text in fields]
        except ValueError:
            raise UserError(f"non-numeric value in '{line.strip()}': {where}") from None
        if not values[0].is_integer() or not 0 <= values[0] < num_classes:
            raise UserError(f"class index {fields[0]} out of range 0..{num_classes - 1}: {where}")
        if not all(0.0 <= value <= 1.0 for value in values[1:]):
            raise UserError(f"box values must be normalised to [0, 1], got {' '.join(fields[1:])}: {where}")
        classes.append(int(values[0]))
        boxes.append(values[1:])
    return np.asarray(classes, np.int64), np.asarray(boxes, np.float64).reshape(-1, 4)


class YoloDetection(ImageFiles):
    """One split of an Ultralytics-format data set as a detection source (see the module docstring).

    Args:
        data_yaml: the data set's `data.yaml`.
        split: a split key of the yaml: "train", "val" or "test".
    """

    def __init__(self, data_yaml: str | Path, split: str = "train") -> None:
        self.yaml_path = Path(data_yaml)
        data = _load_yaml(self.yaml_path)
        self.class_names = _class_names(data, self.yaml_path)
        self.category_ids = list(range(1, len(self.class_names) + 1))
        path = data.get("path") or self.yaml_path.parent
        if not isinstance(path, str | Path):
            raise UserError(f"data.yaml 'path' must be a folder (text), got {path!r}: {self.yaml_path}")
        root = Path(path).expanduser()
        if not root.is_absolute():
            root = self.yaml_path.parent / root if (self.yaml_path.parent / root).exists() else Path.cwd() / root
        self.root = root
        if not data.get(split):
            raise UserError(f"data.yaml has no '{split}' entry: {self.yaml_path}")
        self._files = _image_files(data[split], root, split, self.yaml_path)
        if not self._files:
            raise UserError(f"no images for split '{split}' ({IMAGE_EXTENSIONS}): {self.yaml_path}")
        self.image_ids = list(range(len(self._files)))
        self._labels, self._boxes = [], []
        for image in self._files:
            classes, boxes = read_label_file(label_path(image), len(self.class_names))
            self._labels.append(classes)
            self._boxes.append(cxcywh2xyxy(torch.from_numpy(boxes)).numpy())  # [n, 4] normalised xyxy
        self._sizes: dict[int, tuple[int, int]] = {}
        self.box_fixes = BoxFixLog(f"YOLO {split}")

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """`(boxes float32 [n, 4] xyxy pixels, labels int64 [n])` (label = YOLO class index), clipped to the image."""
        height, width = self.image_size(index)
        pixels = self._boxes[index] * np.array([width, height, width, height], dtype=np.float64)  # [n, 4]
        fixed = sanitize_boxes(pixels, self._labels[index], height, width)
        self.box_fixes.record(index, str(label_path(self._files[index])), fixed.clipped, fixed.dropped)
        return fixed.boxes, fixed.labels


def _relative_name(source: DetectionSource, index: int) -> Path:
    """Image path relative to the source's `image_dir` when it has one and the image lies inside, else flat."""
    path = source.image_path(index)
    image_dir = getattr(source, "image_dir", None)
    if image_dir is not None:
        try:
            return path.resolve().relative_to(Path(image_dir).resolve())
        except ValueError:
            pass
    return Path(f"{index:06d}_{path.name}")


def _link_or_copy(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(target.resolve(), link)
    except OSError:  # no symlinks here (e.g. Windows without privilege): copy
        shutil.copy2(target, link)


def _write_data_yaml(out_dir: Path, class_names: list[str]) -> Path:
    """(Re)write data.yaml listing the split folders present under `out_dir/images`."""
    path = out_dir / "data.yaml"
    if path.is_file():
        old = _load_yaml(path)
        if _class_names(old, path) != class_names:
            raise UserError(f"class names differ from those of the existing data.yaml: {path}")
    splits = sorted(p.name for p in (out_dir / "images").iterdir() if p.is_dir())
    train = "train" if "train" in splits else splits[0]
    val = next((name for name in ("val", "test") if name in splits), train)
    data: dict[str, Any] = {"path": str(out_dir.resolve()), "train": f"images/{train}", "val": f"images/{val}"}
    if "test" in splits:
        data["test"] = "images/test"
    data["nc"] = len(class_names)
    data["names"] = dict(enumerate(class_names))
    return atomic_write_bytes(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8"), path)


def export_yolo(
    source: DetectionSource, out_dir: str | Path, split_name: str = "train", overwrite: bool = False
) -> Path:
    """Export a detection source as a YOLO txt split that Ultralytics can train on.

    Writes `out_dir/images/<split_name>/...` (symlinks to the source images, copies where symlinks are not
    possible; sub-folders relative to `source.image_dir` are kept), `out_dir/labels/<split_name>/....txt`
    (`label cx cy w h` normalised) and `out_dir/data.yaml` with `train` and `val` entries (`val` = the "val" or
    "test" split when exported, else the train split) and `names` = `source.class_names`.

    Args:
        source: any detection source.
        out_dir: data set root to write.
        split_name: split folder name ("train", "val", "test", ...).
        overwrite: replace an existing split folder; otherwise a non-empty one is a `UserError`.

    Returns:
        The data.yaml path.
    """
    out_dir = Path(out_dir)
    image_root, label_root = out_dir / "images" / split_name, out_dir / "labels" / split_name
    for folder in (image_root, label_root):
        if folder.is_dir() and any(folder.iterdir()):
            if not overwrite:
                raise UserError(f"export target is not empty (pass overwrite=True to replace it): {folder}")
            shutil.rmtree(folder)
    label_root.mkdir(parents=True, exist_ok=True)
    image_root.mkdir(parents=True, exist_ok=True)
    for index in range(len(source)):
        relative = _relative_name(source, index)
        _link_or_copy(source.image_path(index), image_root / relative)
        height, width = source.image_size(index)
        boxes, labels = source.annotations(index)
        normalised = xyxy2cxcywh(torch.from_numpy(np.asarray(boxes, np.float64))).numpy()  # [n, 4] pixels
        normalised /= np.array([width, height, width, height], dtype=np.float64)
        lines = [f"{int(k)} " + " ".join(f"{v:.8f}" for v in box) for k, box in zip(labels, normalised, strict=True)]
        label_file = label_root / relative.with_suffix(".txt")
        label_file.parent.mkdir(parents=True, exist_ok=True)
        label_file.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return _write_data_yaml(out_dir, list(source.class_names))
