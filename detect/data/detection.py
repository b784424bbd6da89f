"""Detection data set over any detection source: YOLOv8 train augmentation or letterbox, and the batch collate.

Every sample is a pure function of (seed, epoch, index): one generator `np.random.default_rng([seed, epoch, i])`
drives every random choice (Mosaic or not, Mosaic partners and centre, affine, HSV, flip). Which DataLoader worker
builds a sample, and in which order, changes nothing, so a resumed run sees exactly the images an uninterrupted run
would have seen.

Passing the epoch: `dataset[i]` uses the epoch last given to `set_epoch` (fine with `num_workers=0`; with workers
the call must happen before the DataLoader iterator, and hence the workers, are created). The robust way is to make
the sampler yield `(i, epoch)` tuples, which DataLoader hands to `__getitem__` unchanged::

    class EpochSampler(torch.utils.data.Sampler):
        def __iter__(self):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + self.epoch))
            return iter((int(i), self.epoch) for i in order)

    DataLoader(dataset, batch_size=16, sampler=sampler, collate_fn=detection_collate)

`close_mosaic()` flips a flag in shared memory, so it reaches DataLoader workers that already hold a copy of the data
set (persistent workers): call it between epochs, before the next `iter(loader)`, and every later sample is built
without Mosaic whichever process builds it.

Unreadable images (missing, corrupt, truncated; DESIGN §8): in train mode a sample whose image (or a Mosaic
partner's) cannot be read is built from the next readable image instead, with one counted warning per bad file, and
the run stops with a `UserError` only when more than 1% of the images fail (`detect.data.source.UnreadableImages`).
In validation mode an unreadable image is a `UserError` naming the file: an evaluation must see every image.
`check_images()` finds most such files at start-up without decoding (a fraction of a millisecond per image) and
reports clipped / dropped boxes, so a broken validation image stops a run before training, not after epoch 1.

RAM cache (`data.cache`, `cache_images()`): decoding and resizing a JPEG is most of a Mosaic sample's CPU cost
(about 1.1 ms of 1.4 ms per image at 256 px here), and a Mosaic reads 4 images. `cache_images()` decodes every
training image once, long side resized to S, in the main process before the loader starts; forked DataLoader workers
share those pages copy-on-write. Samples are unchanged (the cache holds exactly what `_read_resized` returns, read
only). Memory: about N x S^2 x 3 x (short / long side) bytes (`cache_bytes()`, from the headers), e.g. 600 x 256 px =
88 MB, 6,000 CUB images at 640 px = 5.5 GB, which is why the schema default is off and only the synthetic default
config turns it on; training falls back to reading from disk, with a warning, when it would not fit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from backbones.errors import UserError
from detect.data.mosaic import mosaic4, random_centre
from detect.data.source import LOGGER, BoxFixLog, UnreadableImages, image_file_problem
from detect.data.transforms import (
    hflip,
    letterbox,
    letterbox_geometry,
    long_side_size,
    random_affine,
    random_hsv,
    rect_shape,
    resize_long_side,
)

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]
ResizedImage = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]  # image long side S, boxes, labels, (h, w)


class DetectionDataset(torch.utils.data.Dataset):
    """YOLOv8-style detection samples from a detection source (see `detect/data/source.py` for the protocol).

    train: with probability `mosaic` a Mosaic of this image and 3 random others (long sides resized to S) on a
    2S x 2S canvas, else this image with its long side resized to S; then the random affine to S x S (scale
    1 +- `scale`, shift +- `translate` * S), HSV with gains `hsv`, horizontal flip with probability `fliplr`.
    Not train: letterbox to S x S only, no randomness.

    Args:
        source: detection source (class_names, image_ids, load_image, annotations, ...).
        img_size: output side S in pixels.
        train: augment (True) or letterbox only (False).
        mosaic: probability of Mosaic in train mode.
        hsv: (h, s, v) gains.
        fliplr: horizontal flip probability.
        scale: affine scale range.
        translate: affine translation range, as a fraction of S.
        seed: base seed of the per-sample generators.
        degrees: affine rotation range in degrees (YOLOv8 default 0).
        shear: affine shear range in degrees (YOLOv8 default 0).
    """

    def __init__(
        self,
        source: Any,
        img_size: int,
        train: bool,
        mosaic: float = 1.0,
        hsv: Sequence[float] = (0.015, 0.7, 0.4),
        fliplr: float = 0.5,
        scale: float = 0.5,
        translate: float = 0.1,
        seed: int = 0,
        degrees: float = 0.0,
        shear: float = 0.0,
    ) -> None:
        if int(img_size) <= 0:
            raise UserError(f"img_size must be a positive number of pixels, got {img_size}: data.img_size")
        for name, p in (("mosaic", mosaic), ("fliplr", fliplr)):
            if not 0.0 <= p <= 1.0:
                raise UserError(f"{name} is a probability in [0, 1], got {p}: train.{name}")
        if len(hsv) != 3 or not 0.0 <= scale < 1.0 or not 0.0 <= translate <= 0.5:
            raise UserError(
                f"need 3 hsv gains, 0 <= scale < 1, 0 <= translate <= 0.5; got hsv={tuple(hsv)} scale={scale} "
                f"translate={translate}: train.hsv_h/hsv_s/hsv_v, train.scale, train.translate"
            )
        self.source = source
        self.img_size = int(img_size)
        self.train = train
        self.mosaic = float(mosaic)
        self.hsv = tuple(float(g) for g in hsv)
        self.fliplr = float(fliplr)
        self.scale = float(scale)
        self.translate = float(translate)
        self.degrees = float(degrees)
        self.shear = float(shear)
        self.seed = int(seed) % 2**64  # SeedSequence wants non-negative entropy; a negative seed still works
        self.epoch = 0
        # shared with DataLoader workers (fork or spawn), so close_mosaic() reaches persistent workers too
        self._mosaic_closed = torch.zeros(1, dtype=torch.uint8).share_memory_()
        self.unreadable = UnreadableImages(len(source), "training images") if train else None
        self._cache: list[ResizedImage | None] | None = None  # filled by cache_images()
        self.shapes: list[tuple[int, int]] | None = None  # per-image (H, W) canvas of rect val (`rect_batches`)

    def check_images(self) -> int:
        """Scan every image once without decoding (header, JPEG end marker) and read every annotation.

        Train mode: unreadable images are marked (skipped from the start, one warning each; too many -> UserError),
        and a split without a single box, or with a class that never occurs, is a UserError (`check_training_labels`).
        Validation mode: any unreadable image is a UserError naming the first one and the count.
        Clipped / dropped boxes are logged as one warning with the totals. A label outside 0..C-1 (a reader's bug,
        e.g. a plugin format's) is a UserError naming the image.

        Returns:
            The number of unreadable images.
        """
        problems = []
        num_classes = len(self.source.class_names)
        counts = np.zeros(num_classes, dtype=np.int64)  # [C] boxes per class
        for index in range(len(self.source)):
            problem = image_file_problem(self.source.image_path(index))
            if problem is not None:
                problems.append(problem)
                if self.unreadable is not None:
                    self.unreadable.mark(index, problem)
                continue
            _, labels = self.source.annotations(index)  # also fills the source's box-fix counts
            outside = labels[(labels < 0) | (labels >= num_classes)]
            if len(outside):
                raise UserError(f"{source_name(self.source)}: label {int(outside[0])} outside 0..{num_classes - 1} "
                                f"for image {self.source.image_path(index)}")  # fmt: skip
            counts += np.bincount(labels, minlength=num_classes)
        if problems and self.unreadable is None:
            raise UserError(f"{len(problems)} unreadable validation image(s); the first: {problems[0]}")
        fixes = getattr(self.source, "box_fixes", None)
        if isinstance(fixes, BoxFixLog) and (fixes.clipped or fixes.dropped):
            LOGGER.warning(fixes.summary())
        if self.train:
            check_training_labels(self.source, counts, len(self.source) - len(problems))
        return len(problems)

    def cache_bytes(self) -> int:
        """Bytes `cache_images` will hold, from the images' sizes alone (headers, no decoding): h' x w' x 3 each."""
        total = 0
        for i in range(len(self)):
            if self.unreadable is not None and self.unreadable.is_bad(i):
                continue
            new_h, new_w = long_side_size(*self.source.image_size(i), self.img_size)
            total += new_h * new_w * 3
        return total

    def cache_images(self, threads: int | None = None) -> int:
        """Decode every readable training image once (long side resized to S) and keep it in RAM; see the module doc.

        Call it before the DataLoader's workers start (they inherit the cache when forked). Images already known to
        be unreadable (`check_images`) or failing now are left out; reading them later takes the usual path.

        Args:
            threads: decoding threads (OpenCV releases the GIL); default: the CPU count, at most 8.

        Returns:
            Bytes held by the cached images.
        """
        if not self.train:
            raise ValueError("cache_images is for train mode (validation letterboxes the original images)")

        def read(i: int) -> ResizedImage | None:
            if self.unreadable is not None and self.unreadable.is_bad(i):
                return None
            try:
                item = self._read_resized(i)
            except UserError:
                return None  # marked and reported when a sample first needs it
            for array in item[:3]:
                array.flags.writeable = False  # every transform makes new arrays; a write would corrupt the cache
            return item

        workers = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            self._cache = list(pool.map(read, range(len(self))))
        return sum(item[0].nbytes for item in self._cache if item is not None)

    def rect_batches(self, batch_size: int, stride: int = 32) -> list[list[int]]:
        """Rect validation: batches of images of similar aspect ratio, each letterboxed to its own smallest canvas.

        The images are sorted by aspect ratio h / w (from their file headers, no decoding) and cut into consecutive
        batches; a batch's canvas is the smallest (H, W), multiples of `stride`, that holds every image of it with
        its long side at S (for one image: `rect_shape`). CUB-shaped 500 x 375 photos at 256 px need 256 x 192
        instead of 256 x 256. After this call, `dataset[i]` letterboxes to its batch's canvas; pass the batches as a
        DataLoader's `batch_sampler`. Boxes still map back through each image's meta (ratio, pad).

        Returns:
            The batches, lists of indices (every index once).
        """
        if self.train:
            raise ValueError("rect batches are for validation (training samples are S x S after the affine)")
        if self.img_size % stride:
            raise UserError(f"img_size {self.img_size} must be a multiple of the stride {stride} for rect batches")
        sizes = [self.source.image_size(i) for i in range(len(self))]  # (h, w) each
        order = sorted(range(len(self)), key=lambda i: (sizes[i][0] / sizes[i][1], i))
        shapes: list[tuple[int, int]] = [(self.img_size, self.img_size)] * len(self)
        batches = [order[k : k + batch_size] for k in range(0, len(order), max(1, batch_size))]
        for batch in batches:
            rects = [rect_shape(*sizes[i], self.img_size, stride) for i in batch]
            canvas = (max(r[0] for r in rects), max(r[1] for r in rects))
            for i in batch:
                shapes[i] = canvas
        self.shapes = shapes
        return batches

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for plain integer indices."""
        self.epoch = int(epoch)

    def close_mosaic(self) -> None:
        """Turn Mosaic off for good, in this process and in its DataLoader workers (YOLOv8's last epochs)."""
        self._mosaic_closed[0] = 1

    @property
    def mosaic_closed(self) -> bool:
        """Whether `close_mosaic()` was called."""
        return bool(self._mosaic_closed[0])

    def __getitem__(self, index: int | tuple[int, int]) -> Sample:
        """One sample.

        Args:
            index: i, or (i, epoch).

        Returns:
            (image uint8 [3, S, S] RGB, a view of the [S, S, 3] pixels (no transpose copy), boxes float32 [n, 4]
            xyxy in S x S pixels, labels int64 [n],
            meta {"image_id", "orig_size": (h, w), "ratio": (r, r), "pad": (left, top), "index": i}). In train mode
            ratio and pad describe the letterbox validation would apply to this image; augmented images are never
            mapped back.
        """
        i, epoch = (int(index[0]), int(index[1])) if isinstance(index, tuple) else (int(index), self.epoch)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, i])
            image, boxes, labels, orig_hw = self._augmented(i, rng)
            r, _, pad = letterbox_geometry(*orig_hw, self.img_size)
            meta = {"ratio": (r, r), "pad": (float(pad[0]), float(pad[1])), "orig_size": orig_hw}
        else:
            image = self.source.load_image(i)
            boxes, labels = self.source.annotations(i)
            shape = self.shapes[i] if self.shapes is not None else None
            image, boxes, meta = letterbox(image, self.img_size, boxes, shape=shape)
        meta = {"image_id": self.source.image_ids[i], **meta, "index": i}
        image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # [3, H, W] view of the HWC pixels
        boxes_t = torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))  # [n, 4]
        labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1))  # [n]
        return image_t, boxes_t, labels_t, meta

    def _load_resized(self, i: int) -> ResizedImage:
        """Image i (or the next readable one, see `UnreadableImages`) with its long side resized to S, its boxes,
        labels and original (h, w)."""
        if self.unreadable is not None:
            return self.unreadable.load(i, self._read_resized)[1]
        return self._read_resized(i)

    def _read_resized(self, i: int) -> ResizedImage:
        if self._cache is not None and self._cache[i] is not None:
            return self._cache[i]
        image = self.source.load_image(i)
        boxes, labels = self.source.annotations(i)
        orig_hw = (int(image.shape[0]), int(image.shape[1]))
        image, boxes = resize_long_side(image, self.img_size, boxes)
        return image, boxes, np.asarray(labels, dtype=np.int64).reshape(-1), orig_hw

    def _augmented(
        self, i: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """YOLOv8 train pipeline: (Mosaic) -> affine -> HSV -> flip, all draws from `rng`, in a fixed order."""
        size = self.img_size
        use_mosaic = rng.random() < self.mosaic and not self.mosaic_closed  # always draw: same stream either way
        if use_mosaic:
            partners = rng.integers(0, len(self), 3)
            items = [self._load_resized(int(j)) for j in (i, *partners)]
            orig_hw = items[0][3]
            image, boxes, labels = mosaic4([item[:3] for item in items], size, random_centre(size, rng))
        else:
            image, boxes, labels, orig_hw = self._load_resized(i)
        image, boxes, labels = random_affine(
            image, boxes, labels, size, rng, self.scale, self.translate, self.degrees, self.shear
        )
        image = random_hsv(image, self.hsv, rng)
        if rng.random() < self.fliplr:
            image, boxes = hflip(image, boxes)
        return image, boxes, labels, orig_hw


def source_name(source: Any) -> str:
    """How messages name a source: its reader and the file or folder it reads (COCO json, data.yaml or root)."""
    where = next((getattr(source, key) for key in ("json_path", "yaml_path", "root") if getattr(source, key, None)), "")
    return f"{type(source).__name__}({where})" if where else type(source).__name__


def check_training_labels(source: Any, counts: np.ndarray, images: int) -> None:
    """Refuse a training split that cannot teach the detector: no box at all, or a class without a single box.

    Both are a whole run spent on nothing (a label folder in the wrong place reads as images without boxes; a class
    list longer than the classes annotated gives classes no positive sample). A class absent from the validation
    split only is fine: `check_images` calls this for the training split only.

    Args:
        source: the training split's detection source.
        counts: `[C]` boxes per class over the readable images (after clipping / dropping).
        images: readable images scanned.

    Raises:
        UserError: one line naming the source, what is missing, and how many images and boxes were read.
    """
    read = f"{images} images and {int(counts.sum())} boxes read"
    fixes = getattr(source, "box_fixes", None)
    if isinstance(fixes, BoxFixLog) and fixes.dropped:
        read += f" ({fixes.dropped} more dropped as zero-area)"
    if counts.sum() == 0:
        raise UserError(f"training split of {source_name(source)} has no labelled box ({read}): check that the "
                        "annotation files are where the data format expects them")  # fmt: skip
    missing = [str(source.class_names[k]) for k in np.flatnonzero(counts == 0)]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UserError(f"training split of {source_name(source)}: {len(missing)} of {len(counts)} classes never "
                        f"occur ({shown}; {read}): a detector cannot learn a class it never sees; remove them from "
                        "the class list or add labelled images")  # fmt: skip


def detection_collate(batch: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Stack a list of `DetectionDataset` samples.

    Args:
        batch: B samples (image [3, S, S], boxes [n_b, 4], labels [n_b], meta).

    Returns:
        (images uint8 [B, 3, S, S] in channels_last memory: the pixels stay HWC, the layout a channels_last model
        wants, and `detect.precision.to_input` makes them NCHW-contiguous for other models; targets float32 [N, 6] rows
        (image_index, class, x1, y1, x2, y2) with N = sum n_b; metas, a list of B dicts).
    """
    images = torch.stack([sample[0].permute(1, 2, 0) for sample in batch]).permute(0, 3, 1, 2)  # [B, 3, S, S]
    rows = []
    for b, (_, boxes, labels, _) in enumerate(batch):
        index = torch.full((len(labels), 1), float(b))
        rows.append(torch.cat((index, labels.to(torch.float32).view(-1, 1), boxes.view(-1, 4)), 1))  # [n_b, 6]
    targets = torch.cat(rows, 0) if rows else torch.zeros((0, 6))  # [N, 6]
    return images, targets, [sample[3] for sample in batch]
