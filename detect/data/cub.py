"""CUB-200-2011 reader: species classification and bird boxes, from the data set exactly as distributed.

Layout (Wah et al., 2011), all under `CUB_200_2011/`:

    images/<class dir>/<file>.jpg
    images.txt              "<image id> <path relative to images/>"
    image_class_labels.txt  "<image id> <class id>"        class ids are 1-based (classes.txt)
    train_test_split.txt    "<image id> <is_train 0|1>"
    bounding_boxes.txt      "<image id> <x> <y> <w> <h>"   float pixels, top-left corner and size
    classes.txt             "<class id> <name>"            e.g. "1 001.Black_footed_Albatross"

Every parse problem raises `UserError` naming the file and line. Labels are contiguous 0..C-1 in sorted class-id
order; `class_names` are the names without the "001." prefix, `raw_class_names` keep it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from backbones.errors import UserError
from detect.boxes import xywh2xyxy
from detect.data.source import (
    BoxFixLog,
    ImageFiles,
    UnreadableImages,
    image_file_problem,
    read_image_rgb,
    read_text,
    sanitize_boxes,
)

CUB_DIR_NAME = "CUB_200_2011"
SPLITS = ("train", "test", "all")
LABEL_MODES = ("species", "bird")


@dataclass(frozen=True)
class CubData:
    """The parsed annotation files of one CUB_200_2011 folder, one row per line of images.txt.

    Attributes:
        root: the CUB_200_2011 folder.
        image_ids: int64 [N] image ids in images.txt order.
        image_paths: N paths relative to `root / "images"`.
        class_ids: int64 [N] class id (classes.txt id) of each image.
        labels: int64 [N] contiguous label 0..C-1 of each image.
        is_train: bool [N] official split.
        boxes_xywh: float64 [N, 4] box per image, as in bounding_boxes.txt.
        box_lines: int64 [N] line of each box in bounding_boxes.txt (for warnings).
        category_ids: C class ids of classes.txt, sorted (label -> class id).
        raw_class_names: C names as in classes.txt ("001.Black_footed_Albatross").
        class_names: C names without the numeric prefix ("Black_footed_Albatross").
    """

    root: Path
    image_ids: np.ndarray
    image_paths: list[str]
    class_ids: np.ndarray
    labels: np.ndarray
    is_train: np.ndarray
    boxes_xywh: np.ndarray
    box_lines: np.ndarray
    category_ids: list[int]
    raw_class_names: list[str]
    class_names: list[str]

    def split_indices(self, split: str) -> np.ndarray:
        """Row indices (int64 [n], images.txt order) of `split` in "train" | "test" | "all"; empty -> `UserError`."""
        if split not in SPLITS:
            raise UserError(f"unknown CUB split '{split}' (choose one of {', '.join(SPLITS)})")
        if split == "all":
            mask = np.ones(len(self.image_ids), dtype=bool)
        else:
            mask = self.is_train if split == "train" else ~self.is_train
        indices = np.flatnonzero(mask)
        if len(indices) == 0:
            raise UserError(f"CUB split '{split}' has no images: {self.root / 'train_test_split.txt'}")
        return indices


def find_cub_root(root: str | Path) -> Path:
    """Return the CUB_200_2011 folder given either it or the folder holding it.

    Raises:
        UserError: neither `root` nor `root/CUB_200_2011` holds images.txt.
    """
    root = Path(root).expanduser()
    for candidate in (root / CUB_DIR_NAME, root):
        if (candidate / "images.txt").is_file():
            return candidate
    hint = "(generate the synthetic mini-CUB with tools/make_synth_cub.py)"
    if not root.exists():
        raise UserError(f"CUB data root not found {hint}: {root}")
    raise UserError(f"no CUB_200_2011 data set (images.txt) {hint}: {root} or {root / CUB_DIR_NAME}")


def _where(path: Path, line: int) -> str:
    return f"{path}, line {line}"


def _read_table(path: Path, columns: tuple[str, ...], what: str) -> dict[int, tuple[int, list[str]]]:
    """Read `<id> <fields...>` lines into {id: (line number, fields after the id)} in file order.

    The last column may hold spaces when it is text (a path or a name). Blank lines are skipped.
    """
    if not path.is_file():
        raise UserError(f"CUB annotation file missing: {path}")
    rows: dict[int, tuple[int, list[str]]] = {}
    expected = " ".join(columns)
    for line_no, line in enumerate(read_text(path, "CUB annotation file").split("\n"), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=len(columns) - 1)
        if len(fields) != len(columns):
            raise UserError(
                f"truncated line (expected {len(columns)} fields '{expected}', got {len(fields)}): "
                f"{_where(path, line_no)}"
            )
        key = _parse_int(fields[0], f"{what} id", path, line_no)
        if key in rows:
            raise UserError(f"duplicate {what} id {key} (first on line {rows[key][0]}): {_where(path, line_no)}")
        rows[key] = (line_no, [field.strip() for field in fields[1:]])
    if not rows:
        raise UserError(f"CUB annotation file is empty: {path}")
    return rows


def _parse_int(text: str, what: str, path: Path, line: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"non-numeric {what} '{text}': {_where(path, line)}") from None
    if not -(2**63) <= value < 2**63:  # numpy's int64, which holds every id
        raise UserError(f"{what} {text} is out of range (a 64-bit integer): {_where(path, line)}")
    return value


def _parse_float(text: str, what: str, path: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"non-numeric {what} '{text}': {_where(path, line)}") from None
    if not np.isfinite(value):
        raise UserError(f"non-finite {what} '{text}': {_where(path, line)}")
    return value


def _align(rows: dict[int, tuple[int, list[str]]], path: Path, images: dict[int, tuple[int, list[str]]]) -> list:
    """Order the rows of a per-image file as images.txt; an id in one file and not the other is an error."""
    for key, (line_no, _) in rows.items():
        if key not in images:
            raise UserError(f"image id {key} is not in images.txt: {_where(path, line_no)}")
    aligned = []
    for key, (image_line, _) in images.items():
        if key not in rows:
            raise UserError(f"image id {key} (images.txt line {image_line}) has no line in {path.name}: {path}")
        aligned.append((key, *rows[key]))
    return aligned  # [(image id, line number, fields)] in images.txt order


def _read_classes(root: Path) -> tuple[list[int], list[str]]:
    path = root / "classes.txt"
    rows = _read_table(path, ("id", "name"), "class")
    category_ids = sorted(rows)
    for key in category_ids:
        if key < 1:
            raise UserError(f"class id {key} must be >= 1: {_where(path, rows[key][0])}")
    return category_ids, [rows[key][1][0] for key in category_ids]


def read_cub(root: str | Path) -> CubData:
    """Parse the five annotation files of a CUB_200_2011 folder (or the folder holding it).

    Raises:
        UserError: a missing file, a truncated or non-numeric line, a duplicate id, an image id present in one file
            and absent from another, a class id not in classes.txt, an is_train value other than 0/1.
    """
    root = find_cub_root(root)
    category_ids, raw_names = _read_classes(root)
    images = _read_table(root / "images.txt", ("id", "path"), "image")
    class_path = root / "image_class_labels.txt"
    split_path = root / "train_test_split.txt"
    box_path = root / "bounding_boxes.txt"
    class_rows = _align(_read_table(class_path, ("id", "class"), "image"), class_path, images)
    split_rows = _align(_read_table(split_path, ("id", "is_train"), "image"), split_path, images)
    box_rows = _align(_read_table(box_path, ("id", "x", "y", "w", "h"), "image"), box_path, images)

    known = set(category_ids)
    class_ids = []
    for _, line_no, fields in class_rows:
        class_id = _parse_int(fields[0], "class id", class_path, line_no)
        if class_id not in known:
            raise UserError(
                f"class id {class_id} out of range (classes.txt has {len(known)} classes, ids "
                f"{category_ids[0]}..{category_ids[-1]}): {_where(class_path, line_no)}"
            )
        class_ids.append(class_id)
    is_train = []
    for _, line_no, fields in split_rows:
        if fields[0] not in ("0", "1"):
            raise UserError(f"is_train must be 0 or 1, got '{fields[0]}': {_where(split_path, line_no)}")
        is_train.append(fields[0] == "1")
    boxes = [
        [_parse_float(text, name, box_path, line_no) for name, text in zip("xywh", fields, strict=True)]
        for _, line_no, fields in box_rows
    ]
    class_id_array = np.asarray(class_ids, dtype=np.int64)
    return CubData(
        root=root,
        image_ids=np.asarray(list(images), dtype=np.int64),
        image_paths=[fields[0] for _, fields in images.values()],
        class_ids=class_id_array,
        labels=np.searchsorted(np.asarray(category_ids), class_id_array).astype(np.int64),
        is_train=np.asarray(is_train, dtype=bool),
        boxes_xywh=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),  # [N, 4]
        box_lines=np.asarray([line_no for _, line_no, _ in box_rows], dtype=np.int64),
        category_ids=category_ids,
        raw_class_names=raw_names,
        class_names=[name.split(".", 1)[1] if name.split(".", 1)[0].isdigit() else name for name in raw_names],
    )


class CubClassification(Dataset):
    """CUB species classification: `(image, label)` pairs of one split.

    Args:
        root: the CUB_200_2011 folder or the folder holding it.
        split: "train" | "test" | "all" (official train_test_split.txt).
        transform: albumentations-style callable applied as `transform(image=image)["image"]`; without it the
            image is the `uint8 [H, W, 3]` RGB array.
        check_files: scan every image file at construction, without decoding (header, JPEG end marker; about
            0.05 ms per image), so that a bad file is reported now rather than in the middle of training.

    Unreadable images (missing, corrupt, truncated; DESIGN §8): in the "train" split each is skipped with a counted
    warning, the next readable image (and its label) taking its place, deterministically; more than 1% of the split
    unreadable is a `UserError` (`detect.data.source.UnreadableImages`). In the other splits (evaluation) an unreadable
    image is a `UserError` naming the file, raised by the start-up scan or when the image is read.

    Attributes:
        class_names: C species names; `labels`: int64 [n] label per sample; `num_classes`: C.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Any = None, check_files: bool = True) -> None:
        data = read_cub(root)
        indices = data.split_indices(split)
        self.root = data.root
        self.split = split
        self.transform = transform
        self.class_names = list(data.class_names)
        self.raw_class_names = list(data.raw_class_names)
        self.num_classes = len(self.class_names)
        self.image_ids = [int(data.image_ids[i]) for i in indices]
        self.image_paths = [data.root / "images" / data.image_paths[i] for i in indices]
        self.labels = data.labels[indices].copy()
        self.unreadable = UnreadableImages(len(indices), f"CUB {split} images") if split == "train" else None
        if check_files:
            self._check_files()

    def _check_files(self) -> None:
        problems = [(i, p) for i, p in enumerate(map(image_file_problem, self.image_paths)) if p is not None]
        if problems and self.unreadable is None:
            first = problems[0][1]
            raise UserError(f"{len(problems)} unreadable image(s) in CUB split '{self.split}'; the first: {first}")
        for index, problem in problems:
            self.unreadable.mark(index, problem)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Return `(image, label)`: the transformed image (or `uint8 [H, W, 3]` RGB) and its label 0..C-1."""
        if self.unreadable is not None:
            index, image = self.unreadable.load(index, lambda i: read_image_rgb(self.image_paths[i]))
        else:
            image = read_image_rgb(self.image_paths[index])
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, int(self.labels[index])


class CubDetection(ImageFiles):
    """CUB boxes as a detection source (`detect.data.source.DetectionSource`), one box per image.

    Args:
        root: the CUB_200_2011 folder or the folder holding it.
        split: "train" | "test" | "all".
        labels: "species" (C classes, category ids = classes.txt ids) or "bird" (one class "bird", category id 1).

    `image_ids` are the ids of images.txt. Image sizes are read lazily from the JPEG headers and cached; boxes that
    stick out of the image are clipped, zero-area ones dropped, and both counted in `box_fixes` (warnings on the
    `plugdet.data` logger name bounding_boxes.txt and the line).
    """

    def __init__(self, root: str | Path, split: str = "train", labels: str = "species") -> None:
        if labels not in LABEL_MODES:
            raise UserError(f"unknown CUB label mode '{labels}' (choose one of {', '.join(LABEL_MODES)})")
        data = read_cub(root)
        indices = data.split_indices(split)
        self.root = data.root
        self.image_dir = data.root / "images"
        self.split = split
        self.label_mode = labels
        if labels == "species":
            self.class_names, self.category_ids = list(data.class_names), list(data.category_ids)
            self._labels = data.labels[indices].copy()
        else:
            self.class_names, self.category_ids = ["bird"], [1]
            self._labels = np.zeros(len(indices), dtype=np.int64)
        self.image_ids = [int(data.image_ids[i]) for i in indices]
        self._files = [self.image_dir / data.image_paths[i] for i in indices]
        self._boxes = xywh2xyxy(torch.from_numpy(data.boxes_xywh[indices])).numpy()  # [n, 4] float64 xyxy
        self._box_lines = data.box_lines[indices].copy()
        self._sizes: dict[int, tuple[int, int]] = {}
        self.box_fixes = BoxFixLog(f"CUB {split} boxes")

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """`(boxes float32 [n, 4] xyxy pixels, labels int64 [n])`, n = 1, or 0 when the box has no area."""
        height, width = self.image_size(index)
        fixed = sanitize_boxes(self._boxes[index : index + 1], self._labels[index : index + 1], height, width)
        where = f"{self.root / 'bounding_boxes.txt'}, line {self._box_lines[index]} (image {self._files[index].name})"
        self.box_fixes.record(index, where, fixed.clipped, fixed.dropped)
        return fixed.boxes, fixed.labels
