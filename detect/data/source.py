"""The detection-source protocol every data set reader follows, and the helpers they share.

A *detection source* is a random-access view of a box-annotated data set, independent of augmentation: the CUB
reader (`cub.py`), the COCO json reader (`coco.py`) and the YOLO txt reader (`yolo_txt.py`) all implement it, and the
augmentation pipeline, the COCO / YOLO exporters and the evaluation consume it.

Conventions shared by every source:

- Images are `uint8 [H, W, 3]` RGB. Grayscale images become three equal channels, alpha is dropped, and the EXIF
  orientation is applied (as OpenCV, Ultralytics and image viewers do); `image_size` reports the size after that
  orientation, read from the file header only.
- Boxes are xyxy in pixels of that image, float32, with pixel-edge coordinates: a box covering columns 0..9 is
  `x1 = 0, x2 = 10`. Labels are contiguous class indices 0..C-1; `category_ids[label]` is the data set's own id.
- Boxes that stick out of the image are clipped; boxes with zero or negative area (after clipping) are dropped. Both
  are counted and logged on the `plugdet.data` logger (see `BoxFixLog` and `audit_boxes`), never silently changed.
- An image that cannot be read (missing, corrupt, or a JPEG cut short: `read_image_rgb` checks the end-of-image
  marker, since OpenCV decodes a truncated JPEG without an error, greying the missing part) raises `UserError` naming
  the file. What a caller does with it is its policy: training skips it (`UnreadableImages`: a counted warning, the
  next readable image instead, an error only when more than 1% of the images fail), evaluation stops with that line.
  `image_file_problem` finds most such files without decoding (header + end marker, ~0.05 ms per image), so tools
  scan a data set once at start-up instead of failing hours later.
"""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar, runtime_checkable

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from backbones.errors import UserError

LOGGER = logging.getLogger("plugdet.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_EXIF_ORIENTATION = 0x0112
_EXIF_SWAPS_SIDES = (5, 6, 7, 8)  # transposed or rotated by 90 / 270 degrees
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"  # SOI and EOI markers
# Byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's): text files in these encodings are read too.
_TEXT_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
T = TypeVar("T")


@runtime_checkable
class DetectionSource(Protocol):
    """A random-access box-annotated data set (see the module docstring for the conventions).

    Attributes:
        class_names: display name per contiguous label 0..C-1.
        category_ids: the data set's own category id per label (COCO ids, CUB class ids, YOLO index + 1).
        image_ids: the data set's own id per image index 0..N-1 (written as COCO image ids).
    """

    class_names: list[str]
    category_ids: list[int]
    image_ids: list[int]

    def __len__(self) -> int:
        """Number of images."""
        ...

    def image_path(self, index: int) -> Path:
        """Path of image `index`."""
        ...

    def image_size(self, index: int) -> tuple[int, int]:
        """`(height, width)` of image `index`, from the file header (or the annotation file) without decoding."""
        ...

    def load_image(self, index: int) -> np.ndarray:
        """Image `index` as `uint8 [H, W, 3]` RGB; an unreadable file raises `UserError` naming it."""
        ...

    def annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """`(boxes float32 [n, 4] xyxy pixels, labels int64 [n])` of image `index`, clipped to the image."""
        ...


def read_text(path: Path, what: str) -> str:
    """The text of an annotation file: UTF-8, or UTF-16 / UTF-32 / UTF-8 with a byte-order mark (what Windows editors
    and PowerShell's `>` write); line ends `\r\n` and `\r` become `\n`.

    Raises:
        UserError: the file cannot be read, or is not text in one of those encodings (one line naming the file, the
            line and the byte, e.g. a Latin-1 "é").
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {what} ({error.strerror or error.__class__.__name__}): {path}") from None
    encoding = next((codec for bom, codec in _TEXT_BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        name = encoding.upper().removesuffix("-SIG")
        line_no = data.count(b"\n", 0, error.start) + 1
        line = f"line {line_no}, " if name == "UTF-8" else ""
        raise UserError(f"{what} is not {name} text ({line}byte {error.start} is 0x{data[error.start]:02x}; save "
                        f"it as UTF-8): {path}") from None  # fmt: skip
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB.

    Args:
        path: image file (any format OpenCV reads).

    Returns:
        `uint8 [H, W, 3]` RGB; grayscale becomes three equal channels, alpha is dropped, EXIF orientation applied.

    Raises:
        UserError: the file is missing, cannot be decoded, or is a JPEG cut short.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image file not found: {path}")
    if _jpeg_cut_short(path):  # checked first: OpenCV would decode it (grey where data is missing) and say nothing
        raise UserError(f"truncated JPEG (the data stops before the end-of-image marker): {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # 3-channel BGR for gray, colour and alpha images alike
    if image is None:
        raise UserError(f"cannot read image (corrupt or unsupported format): {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # [H, W, 3]; 25x faster than a reversed-channel copy


def _jpeg_cut_short(path: Path) -> bool:
    """True for a JPEG whose data stops before its end-of-image marker (an interrupted download or copy).

    A complete JPEG ends with the EOI marker; a file that does not is fully decoded by PIL (which, unlike OpenCV, fails
    on missing data) before being called truncated, because some writers append data after the marker. Only such
    suspicious files pay for a decode; the others cost two small reads.
    """
    with path.open("rb") as handle:
        if handle.read(2) != _JPEG_START:
            return False
        handle.seek(-2, os.SEEK_END)
        if handle.read(2) == _JPEG_END:
            return False
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, ImportError):  # ImportError: see read_image_size
        return True
    return False


def image_file_problem(path: str | Path) -> str | None:
    """Check an image file without decoding its pixels: present, a header PIL recognises, a JPEG not cut short.

    Returns:
        None for a good file, else the one-line message `read_image_rgb` would raise (naming the file).
    """
    path = Path(path)
    try:
        read_image_size(path)
        if _jpeg_cut_short(path):
            return f"truncated JPEG (the data stops before the end-of-image marker): {path}"
    except UserError as error:
        return str(error)
    except OSError as error:
        return f"cannot read image ({error.__class__.__name__}): {path}"
    return None


def read_image_size(path: str | Path) -> tuple[int, int]:
    """Read `(height, width)` from an image header without decoding the pixels (PIL), after EXIF orientation.

    Raises:
        UserError: the file is missing or is not an image PIL recognises.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, ImportError):
        # ImportError: where Ultralytics is imported (tests, benches) it patches PIL.Image.open to import pi-heif on
        # an unidentified file; without that package the patch raises ImportError for what is simply not an image.
        raise UserError(f"cannot read image header (not an image format PIL recognises): {path}") from None
    except OSError as error:
        raise UserError(f"cannot read image header ({error.__class__.__name__}): {path}") from error
    if orientation in _EXIF_SWAPS_SIDES:
        width, height = height, width
    return int(height), int(width)


class ImageFiles:
    """The file side of a detection source: one image file per index, `(height, width)` from its header, cached.

    CubDetection, CocoDetection and YoloDetection inherit `__len__`, `image_path`, `image_size` and `load_image`
    from it; they set `self._files` (and may pre-fill `self._sizes`, e.g. from a COCO json) and add `annotations`.
    """

    _files: list[Path]
    _sizes: dict[int, tuple[int, int]]

    def __len__(self) -> int:
        return len(self._files)

    def image_path(self, index: int) -> Path:
        """Path of image `index`."""
        return self._files[index]

    def image_size(self, index: int) -> tuple[int, int]:
        """`(height, width)` of image `index`: as given, else from its header (cached)."""
        if index not in self._sizes:
            self._sizes[index] = read_image_size(self._files[index])
        return self._sizes[index]

    def load_image(self, index: int) -> np.ndarray:
        """Image `index` as `uint8 [H, W, 3]` RGB (grayscale and palette images are expanded)."""
        return read_image_rgb(self._files[index])


class SanitizedBoxes(NamedTuple):
    """Result of `sanitize_boxes`: kept boxes and labels, and how many boxes were clipped or dropped."""

    boxes: np.ndarray  # float32 [k, 4] xyxy
    labels: np.ndarray  # int64 [k]
    clipped: int
    dropped: int


def sanitize_boxes(
    boxes: np.ndarray, labels: np.ndarray, height: int, width: int, tolerance: float = 1e-3
) -> SanitizedBoxes:
    """Clip xyxy boxes to the image and drop those left with zero or negative area (or non-finite corners).

    Args:
        boxes: `[n, 4]` xyxy pixels.
        labels: `[n]` class indices.
        height: image height in pixels.
        width: image width in pixels.
        tolerance: a corner that moves by at most this many pixels (rounding of normalised coordinates) is clipped
            without being counted.

    Returns:
        `SanitizedBoxes(boxes float32 [k, 4], labels int64 [k], clipped, dropped)`, `k = n - dropped`; `clipped`
        counts kept boxes whose corners moved by more than `tolerance`.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # [n, 4]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)  # [n]
    finite = np.isfinite(boxes).all(axis=1)
    safe = np.where(finite[:, None], boxes, 0.0)
    limits = np.array([width, height, width, height], dtype=np.float64)
    clipped_boxes = np.clip(safe, 0.0, limits)  # [n, 4]
    stored = clipped_boxes.astype(np.float32)  # area judged in the precision kept: 1e-189 high is 0 in float32
    keep = finite & (stored[:, 2] > stored[:, 0]) & (stored[:, 3] > stored[:, 1])
    moved = (np.abs(clipped_boxes - safe) > tolerance).any(axis=1) & keep
    return SanitizedBoxes(
        boxes=stored[keep],
        labels=labels[keep],
        clipped=int(moved.sum()),
        dropped=int((~keep).sum()),
    )


class BoxFixLog:
    """Counts clipped / dropped boxes of one source and logs the first few fixes as warnings.

    Each image is counted once however often it is read; after `max_messages` warnings the rest are only counted
    (`summary()` and `audit_boxes` report the totals).
    """

    def __init__(self, source_name: str, max_messages: int = 5) -> None:
        self.source_name = source_name
        self.max_messages = max_messages
        self.clipped = 0
        self.dropped = 0
        self._seen: set[int] = set()
        self._messages = 0

    def record(self, index: int, where: str, clipped: int, dropped: int) -> None:
        """Count the fixes of image `index` (`where` names its file and line) and warn about the first ones."""
        if (clipped == 0 and dropped == 0) or index in self._seen:
            return
        self._seen.add(index)
        self.clipped += clipped
        self.dropped += dropped
        self._messages += 1
        if self._messages <= self.max_messages:
            message = "%s: %d box(es) clipped to the image, %d of zero area dropped: %s"
            LOGGER.warning(message, self.source_name, clipped, dropped, where)
            if self._messages == self.max_messages:
                LOGGER.warning("%s: further box fixes are counted without a message", self.source_name)

    def summary(self) -> str:
        """One line with the totals so far."""
        return f"{self.source_name}: {self.clipped} box(es) clipped to the image, {self.dropped} dropped (zero area)"


def audit_boxes(source: DetectionSource) -> tuple[int, int]:
    """Read every annotation of `source` once and log one warning with the totals if any box was fixed.

    Reads image headers (not pixels), so it costs about a millisecond per image. Sources that keep a `BoxFixLog`
    in `box_fixes` (all of ours) report their counts; others give `(0, 0)`.

    Returns:
        `(clipped, dropped)` box counts over the whole source.
    """
    for index in range(len(source)):
        source.annotations(index)  # fills source.box_fixes
    fix_log = getattr(source, "box_fixes", None)
    if not isinstance(fix_log, BoxFixLog):
        return 0, 0
    if fix_log.clipped or fix_log.dropped:
        LOGGER.warning(fix_log.summary())
    return fix_log.clipped, fix_log.dropped


class UnreadableImages:
    """Training's policy for images that cannot be read: skip each one with a warning, stop when too many fail.

    A long run must not die at hour 5 because of one bad file. A sample whose image is missing, corrupt or truncated
    is built from the next readable image instead (index + 1, + 2, ... cyclically: deterministic, so resumed and
    uninterrupted runs still see the same samples), and the file is reported once on the `plugdet.data` logger with
    the running count. When more than `max_fraction` of the images (and more than one), or all of them, are
    unreadable, `UserError` stops the run: the data set is broken, not one file.

    The flags live in shared memory, so DataLoader workers (forked or spawned) and the main process share one count.

    Args:
        num_images: size of the data set.
        what: how messages name the data set (e.g. "CUB train images").
        max_fraction: the share of unreadable images tolerated (at least one image is always tolerated, unless it is
            the only one).
        max_messages: warnings logged; later bad files are only counted.
    """

    def __init__(self, num_images: int, what: str, max_fraction: float = 0.01, max_messages: int = 10) -> None:
        self.num_images = int(num_images)
        self.what = what
        self.limit = max(1, int(max_fraction * self.num_images))
        self.max_fraction = max_fraction
        self.max_messages = max_messages
        self._flags = torch.zeros(max(self.num_images, 1), dtype=torch.uint8).share_memory_()

    @property
    def count(self) -> int:
        """Unreadable images found so far (by any process)."""
        return int(self._flags.sum())

    def is_bad(self, index: int) -> bool:
        """Whether image `index` was found unreadable."""
        return bool(self._flags[index])

    def mark(self, index: int, message: str) -> None:
        """Record image `index` as unreadable (`message` names the file); warns, or raises `UserError` if too many."""
        if self._flags[index]:
            return
        self._flags[index] = 1
        count = self.count
        if count == self.num_images or count > self.limit:
            raise UserError(
                f"{self.what}: {count} of {self.num_images} images are unreadable (more than "
                f"{self.max_fraction:.0%} can be skipped); the last one: {message}"
            )
        if count <= self.max_messages:
            LOGGER.warning("%s: skipping unreadable image %d of at most %d, the next image is used: %s", self.what,
                           count, self.limit, message)  # fmt: skip

    def load(self, index: int, read: Callable[[int], T]) -> tuple[int, T]:
        """`(j, read(j))` for the first readable image j among index, index + 1, ... (cyclic).

        `read` raises `UserError` for an unreadable image; that image is marked (see `mark`) and the next one tried.
        """
        for step in range(self.num_images):
            j = (index + step) % self.num_images
            if self._flags[j]:
                continue
            try:
                return j, read(j)
            except UserError as error:
                self.mark(j, str(error))
        raise UserError(f"{self.what}: no readable image")  # not reached: `mark` raises once all are unreadable
