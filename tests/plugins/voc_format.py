"""A Pascal VOC data format for plugdet, registered as `data.format=voc`; plugdet itself is not edited.

Use it with `imports=[tests/plugins/voc_format.py] data.format=voc data.root=/data/VOC2012`. The layout under
`data.root`, as VOC2007 / VOC2012 are distributed:

    Annotations/<id>.xml        one file per image: <size> (<width>, <height>) and an <object> per box, with its
                                <name>, <difficult> (0 or 1) and <bndbox> (<xmin>, <ymin>, <xmax>, <ymax>)
    JPEGImages/<id>.jpg
    ImageSets/Main/train.txt    the image ids of the training split, one a line (val.txt: the validation split)

Boxes: VOC numbers pixels from 1 and includes both ends, so xmin=1, xmax=10 is the first ten columns. plugdet's boxes
are pixel edges counted from 0 (DESIGN §3: a box covering columns 0..9 has x1 = 0, x2 = 10), so those columns are
x1 = xmin - 1, x2 = xmax, and likewise y1 = ymin - 1, y2 = ymax (Detectron2's VOC reader converts the same way).

Classes: the sorted <name>s of the objects of both splits (so that train and val share one list); label k has
category id k + 1. Image sizes come from <size>, as the COCO reader takes them from the json.

Own keys (`data.options`): `annotations_dir`, the folder of the XML files under `data.root` (default
"Annotations"); `skip_difficult`, leave out objects marked <difficult>1</difficult> (default false: VOC's
evaluation ignores them, but they are real objects to train on).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from backbones.errors import UserError
from detect.data.formats import register_format
from detect.data.source import BoxFixLog, ImageFiles, sanitize_boxes

CORNERS = ("xmin", "ymin", "xmax", "ymax")


class VocImage(NamedTuple):
    """One parsed annotation file."""

    height: int
    width: int
    boxes: np.ndarray  # float64 [n, 4] xyxy pixel edges
    names: list[str]  # [n] class name per box


def _number(node: ET.Element, tag: str, path: Path) -> float:
    """The number in child `tag` of `node`; a missing or non-numeric one is a UserError naming the file and tag."""
    text = node.findtext(tag)
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"VOC annotation needs a number in <{tag}>, got {text!r}: {path}") from None


def read_voc_xml(path: Path, skip_difficult: bool = False) -> VocImage:
    """Parse one VOC annotation file (boxes converted to pixel edges: see the module docstring).

    Raises:
        UserError: a missing or malformed file, or a missing / non-numeric size or corner; names the file.
    """
    if not path.is_file():
        raise UserError(f"VOC annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise UserError(f"malformed VOC annotation ({error}): {path}") from None
    size = root.find("size")
    if size is None:
        raise UserError(f"VOC annotation has no <size>: {path}")
    boxes, names = [], []
    for obj in root.iter("object"):
        if skip_difficult and obj.findtext("difficult", "0").strip() == "1":
            continue
        box = obj.find("bndbox")
        name = (obj.findtext("name") or "").strip()
        if box is None or not name:
            raise UserError(f"VOC <object> needs a <name> and a <bndbox>: {path}")
        xmin, ymin, xmax, ymax = (_number(box, tag, path) for tag in CORNERS)
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])  # 1-based inclusive pixels -> pixel edges
        names.append(name)
    height, width = int(_number(size, "height", path)), int(_number(size, "width", path))
    return VocImage(height, width, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), names)


def read_image_set(path: Path) -> list[str]:
    """The image ids an `ImageSets/Main/<split>.txt` lists (the first field of each non-empty line)."""
    if not path.is_file():
        raise UserError(f"VOC image set not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class VocDetection(ImageFiles):
    """One split of a Pascal VOC data set as a detection source (`detect.data.source.DetectionSource`).

    Args:
        root: the folder holding Annotations/, JPEGImages/ and ImageSets/Main/.
        split: "train" or "val" (the image set file read).
        annotations_dir: the folder of the XML files, relative to `root`.
        skip_difficult: leave out objects marked difficult.
    """

    def __init__(
        self, root: str | Path, split: str, annotations_dir: str = "Annotations", skip_difficult: bool = False
    ) -> None:
        self.root = Path(root)
        xml_dir = self.root / annotations_dir
        sets = {name: read_image_set(self.root / "ImageSets" / "Main" / f"{name}.txt") for name in ("train", "val")}
        parsed = {key: read_voc_xml(xml_dir / f"{key}.xml", skip_difficult) for ids in sets.values() for key in ids}
        self.class_names = sorted({name for image in parsed.values() for name in image.names})
        self.category_ids = list(range(1, len(self.class_names) + 1))
        label_of = {name: label for label, name in enumerate(self.class_names)}
        ids = sets[split]
        self.image_ids = list(range(len(ids)))
        self._xml = [xml_dir / f"{key}.xml" for key in ids]
        self._files = [self.root / "JPEGImages" / f"{key}.jpg" for key in ids]
        self._sizes = {index: (parsed[key].height, parsed[key].width) for index, key in enumerate(ids)}
        self._boxes = [parsed[key].boxes for key in ids]
        self._labels = [np.asarray([label_of[name] for name in parsed[key].names], dtype=np.int64) for key in ids]
        self.box_fixes = BoxFixLog(f"VOC {split}")

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """`(boxes float32 [n, 4] xyxy pixels, labels int64 [n])`, clipped to the image."""
        height, width = self.image_size(index)
        fixed = sanitize_boxes(self._boxes[index], self._labels[index], height, width)
        self.box_fixes.record(index, str(self._xml[index]), fixed.clipped, fixed.dropped)
        return fixed.boxes, fixed.labels


@register_format("voc", keys=("root", "options.annotations_dir", "options.skip_difficult"))
def voc_format(data: Any, split: str) -> VocDetection:
    """`data.format=voc`: the split's VocDetection under `data.root`, with the format's own `data.options`."""
    options = data.options
    skip_difficult = options.get("skip_difficult", False)
    if not isinstance(skip_difficult, bool):
        raise UserError(f"data.options.skip_difficult must be true or false, got {skip_difficult!r}")
    return VocDetection(data.root, split, str(options.get("annotations_dir", "Annotations")), skip_difficult)
