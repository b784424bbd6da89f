"""Tests of detect/data/detection.py: purity in (seed, epoch, index), workers, letterbox mode, collate, box validity."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Sampler

from backbones.errors import UserError
from detect.data.detection import DetectionDataset, detection_collate
from detect.data.transforms import letterbox
from detect.precision import to_input

SIZES = [(120, 160), (200, 140), (96, 96), (150, 260), (90, 200), (180, 120)]


class TinySource:
    """In-memory detection source: noisy images with drawn rectangles; image 2 has no boxes."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.items = []
        for k, (h, w) in enumerate(SIZES):
            n = 0 if k == 2 else 1 + k % 3
            x = np.sort(rng.uniform(0, w, (n, 2)), 1)
            y = np.sort(rng.uniform(0, h, (n, 2)), 1)
            boxes = np.stack([x[:, 0], y[:, 0], x[:, 1] + 4, y[:, 1] + 4], 1).clip(0, [w, h, w, h])
            self.items.append((h, w, boxes.astype(np.float32), rng.integers(0, 3, n).astype(np.int64)))
        self.class_names = ["a", "b", "c"]
        self.category_ids = [1, 2, 3]
        self.image_ids = [10 * k + 1 for k in range(len(SIZES))]

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, i: int) -> Path:
        return Path(f"/nonexistent/{i}.jpg")

    def image_size(self, i: int) -> tuple[int, int]:
        return self.items[i][:2]

    def load_image(self, i: int) -> np.ndarray:
        h, w, boxes, labels = self.items[i]
        image = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels, strict=True):
            image[y1:y2, x1:x2] = (255 * (label == 0), 255 * (label == 1), 255 * (label == 2))
        return image

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.items[i][2].copy(), self.items[i][3].copy()


class EpochIndexSampler(Sampler):
    """Yields (i, epoch) in a fixed shuffled order: what the training engine's sampler does."""

    def __init__(self, n: int, epoch: int) -> None:
        self.n, self.epoch = n, epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng(self.epoch).permutation(self.n)
        return iter((int(i), self.epoch) for i in order)

    def __len__(self) -> int:
        return self.n


def assert_same(a: tuple, b: tuple) -> None:
    for x, y in zip(a[:3], b[:3], strict=True):
        assert torch.equal(x, y)
    assert a[3] == b[3]


def test_sample_types_and_meta() -> None:
    data = DetectionDataset(TinySource(), 64, train=True, seed=1)
    image, boxes, labels, meta = data[(3, 0)]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4) and labels.dtype == torch.int64
    assert meta["image_id"] == 31 and meta["index"] == 3 and meta["orig_size"] == (150, 260)
    assert meta["ratio"] == (64 / 260, 64 / 260) and set(meta) == {"image_id", "orig_size", "ratio", "pad", "index"}


def test_pure_function_of_seed_epoch_index() -> None:
    source = TinySource()
    data = DetectionDataset(source, 64, train=True, seed=5)
    assert_same(data[(4, 2)], data[(4, 2)])
    assert_same(data[(4, 2)], DetectionDataset(source, 64, train=True, seed=5)[(4, 2)])
    data.set_epoch(2)
    assert_same(data[4], data[(4, 2)])
    assert not torch.equal(data[(4, 2)][0], data[(4, 3)][0])
    assert not torch.equal(data[(4, 2)][0], DetectionDataset(source, 64, train=True, seed=6)[(4, 2)][0])


def test_workers_do_not_change_batches() -> None:
    data = DetectionDataset(TinySource(), 64, train=True, seed=3)
    batches = []
    for workers in (0, 2):
        sampler = EpochIndexSampler(len(data), 7)
        loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=detection_collate)
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 2
    for (im0, t0, m0), (im1, t1, m1) in zip(*batches, strict=True):
        assert torch.equal(im0, im1) and torch.equal(t0, t1) and m0 == m1


def test_close_mosaic_equals_no_mosaic() -> None:
    source = TinySource()
    data = DetectionDataset(source, 64, train=True, mosaic=1.0, seed=2)
    plain = DetectionDataset(source, 64, train=True, mosaic=0.0, seed=2)
    with_mosaic = data[(1, 0)]
    data.close_mosaic()
    assert_same(data[(1, 0)], plain[(1, 0)])
    assert not torch.equal(with_mosaic[0], plain[(1, 0)][0])


def test_close_mosaic_reaches_persistent_workers() -> None:
    source = TinySource()
    data = DetectionDataset(source, 64, train=True, mosaic=1.0, seed=4)
    plain = DetectionDataset(source, 64, train=True, mosaic=0.0, seed=4)
    loader = DataLoader(data, batch_size=6, num_workers=1, persistent_workers=True, collate_fn=detection_collate)
    first = next(iter(loader))
    data.close_mosaic()
    second = next(iter(loader))  # same worker process, which got its copy of the data set before the call
    expected = detection_collate([plain[i] for i in range(6)])
    assert not torch.equal(first[0], expected[0])
    assert torch.equal(second[0], expected[0]) and torch.equal(second[1], expected[1])


class VanishingSource(TinySource):
    """TinySource whose files can vanish (`gone`) or be unreadable (`bad`): proves what the RAM cache serves."""

    def __init__(self, bad: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.gone, self.bad = False, bad

    def load_image(self, i: int) -> np.ndarray:
        if self.gone or i in self.bad:
            raise UserError(f"/nonexistent/{i}.jpg: cannot read")
        return super().load_image(i)


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
def test_ram_cache_changes_no_sample(mosaic: float) -> None:
    """Cached and uncached data sets give identical samples; once cached, no image is read from its file again."""
    source = VanishingSource()
    plain = DetectionDataset(TinySource(), 64, train=True, mosaic=mosaic, seed=8)
    cached = DetectionDataset(source, 64, train=True, mosaic=mosaic, seed=8)
    size = cached.cache_images(threads=2)
    assert size == sum(cached._read_resized(i)[0].nbytes for i in range(len(SIZES)))
    source.gone = True  # every later read must come from RAM
    for epoch in range(3):
        for i in range(len(SIZES)):
            assert_same(cached[(i, epoch)], plain[(i, epoch)])
    with pytest.raises(ValueError, match="read-only"):
        cached._read_resized(0)[0][0, 0, 0] = 1  # a transform writing into the cache would corrupt later samples


def test_cache_bytes_is_exact_before_decoding() -> None:
    """The memory estimate from image sizes alone equals what cache_images then holds."""
    data = DetectionDataset(TinySource(), 64, train=True)
    expected = data.cache_bytes()
    assert expected == data.cache_images() == sum(a[0].nbytes for a in data._cache)


def test_cache_that_would_not_fit_falls_back_to_disk(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """data.cache=true with too little memory: one warning, no cache, the same samples read from disk."""
    import detect.train.memory

    data = DetectionDataset(TinySource(), 64, train=True, seed=2)
    monkeypatch.setattr(detect.train.memory, "available_memory", lambda: 2 * data.cache_bytes() - 1)
    assert not detect.train.memory.cache_train_images(data) and data._cache is None
    assert "reading them from disk instead" in caplog.text
    assert_same(data[(1, 0)], DetectionDataset(TinySource(), 64, train=True, seed=2)[(1, 0)])
    monkeypatch.setattr(detect.train.memory, "available_memory", lambda: 2 * data.cache_bytes())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this node would need twice as much
    assert not detect.train.memory.cache_train_images(data)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert detect.train.memory.cache_train_images(data) and data._cache is not None


def test_ram_cache_reaches_forked_workers() -> None:
    """Workers forked after cache_images() serve every image from the inherited cache (the files are gone)."""
    source = VanishingSource()
    data = DetectionDataset(source, 64, train=True, seed=3)
    data.cache_images()
    source.gone = True
    loader = DataLoader(data, batch_size=4, sampler=EpochIndexSampler(len(data), 7), num_workers=2,
                        collate_fn=detection_collate, multiprocessing_context="fork")  # fmt: skip
    expected = DataLoader(DetectionDataset(TinySource(), 64, train=True, seed=3), batch_size=4,
                          sampler=EpochIndexSampler(len(data), 7), collate_fn=detection_collate)  # fmt: skip
    for (im0, t0, m0), (im1, t1, m1) in zip(loader, expected, strict=True):
        assert torch.equal(im0, im1) and torch.equal(t0, t1) and m0 == m1


def test_ram_cache_leaves_unreadable_images_to_the_usual_path() -> None:
    """An image that fails while caching is not cached; its samples come from the next readable image, as uncached."""
    cached = DetectionDataset(VanishingSource(bad=frozenset({2})), 64, train=True, mosaic=0.0, seed=1)
    plain = DetectionDataset(VanishingSource(bad=frozenset({2})), 64, train=True, mosaic=0.0, seed=1)
    cached.cache_images()
    assert cached._cache is not None and cached._cache[2] is None and cached.unreadable.count == 0
    assert_same(cached[(2, 0)], plain[(2, 0)])
    assert cached.unreadable.is_bad(2)
    with pytest.raises(ValueError, match="train mode"):
        DetectionDataset(TinySource(), 64, train=False).cache_images()


def test_val_mode_is_letterbox_only() -> None:
    source = TinySource()
    data = DetectionDataset(source, 96, train=False)
    for i in range(len(source)):
        image, boxes, labels, meta = data[(i, 9)]
        expected, eboxes, emeta = letterbox(source.load_image(i), 96, source.annotations(i)[0])
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
        assert np.array_equal(boxes.numpy(), eboxes) and np.array_equal(labels.numpy(), source.annotations(i)[1])
        assert meta == {**emeta, "image_id": source.image_ids[i], "index": i}


def test_train_without_augmentation_is_letterbox() -> None:
    """scale 0, translate 0, no Mosaic / HSV / flip: the affine of the long-side-resized image is a letterbox."""
    source = TinySource()
    data = DetectionDataset(source, 64, train=True, mosaic=0.0, hsv=(0, 0, 0), fliplr=0.0, scale=0.0, translate=0.0)
    val = DetectionDataset(source, 64, train=False)
    for i in (0, 2):  # even padding (48 and 64 rows), so both paths put the content at the same place
        image, boxes, labels, _ = data[i]
        vimage, vboxes, vlabels, _ = val[i]
        assert torch.equal(image, vimage) and torch.equal(boxes, vboxes)
        assert torch.equal(labels, vlabels)


def test_collate_builds_targets() -> None:
    data = DetectionDataset(TinySource(), 64, train=False)
    batch = [data[i] for i in (0, 2, 1)]  # image 2 has no boxes
    images, targets, metas = detection_collate(batch)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8
    n0, n1 = len(batch[0][2]), len(batch[2][2])
    assert targets.shape == (n0 + n1, 6) and targets.dtype == torch.float32
    assert targets[:, 0].tolist() == [0.0] * n0 + [2.0] * n1
    assert torch.equal(targets[:n0, 1], batch[0][2].float()) and torch.equal(targets[n0:, 2:], batch[2][1])
    assert [m["index"] for m in metas] == [0, 2, 1]


def test_batches_stay_hwc_in_memory_until_the_model_input() -> None:
    """No transpose copy on the way: the collated batch is channels_last; to_input gives either layout, same values."""
    data = DetectionDataset(TinySource(), 64, train=True, seed=0)
    images, _, _ = detection_collate([data[(i, 0)] for i in range(4)])
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    nhwc, nchw = to_input(images, torch.device("cpu"), True), to_input(images, torch.device("cpu"), False)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and nchw.is_contiguous()
    assert torch.equal(nhwc, nchw) and torch.equal(nchw, images.contiguous().float() / 255)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), epoch=st.integers(0, 300), index=st.integers(0, 5), degrees=st.sampled_from([0, 30]))
def test_augmented_boxes_inside_with_positive_area(seed: int, epoch: int, index: int, degrees: int) -> None:
    data = DetectionDataset(TinySource(), 64, train=True, seed=seed, degrees=degrees, shear=degrees / 3)
    image, boxes, labels, _ = data[(index, epoch)]
    assert image.shape == (3, 64, 64) and len(boxes) == len(labels)
    assert (boxes >= 0).all() and (boxes <= 64).all()
    assert (boxes[:, 2] - boxes[:, 0] > 2).all() and (boxes[:, 3] - boxes[:, 1] > 2).all()
    assert set(labels.tolist()) <= {0, 1, 2}


def test_bad_arguments_raise_user_error() -> None:
    with pytest.raises(UserError, match="img_size"):
        DetectionDataset(TinySource(), 0, train=True)
    with pytest.raises(UserError, match="mosaic"):
        DetectionDataset(TinySource(), 64, train=True, mosaic=1.5)
    with pytest.raises(IndexError):
        DetectionDataset(TinySource(), 64, train=True)[6]


def test_cub_detection_through_both_modes(synth_cub_root: Path) -> None:
    from detect.boxes import scale_boxes_to_original
    from detect.data.cub import CubDetection

    source = CubDetection(synth_cub_root, split="train", labels="species")
    train = DetectionDataset(source, 64, train=True, seed=0)
    val = DetectionDataset(CubDetection(synth_cub_root, split="test", labels="species"), 64, train=False)
    images, targets, metas = detection_collate([train[(i, 1)] for i in range(len(train))])
    assert images.shape == (len(source), 3, 64, 64) and targets.shape[1] == 6 and len(targets) >= 1
    assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 64).all()
    assert set(targets[:, 1].long().tolist()) <= set(range(len(source.class_names)))
    assert [m["image_id"] for m in metas] == source.image_ids
    assert_same(train[(5, 1)], train[(5, 1)])
    for i in range(len(val)):
        _, boxes, labels, meta = val[i]
        expected_boxes, expected_labels = val.source.annotations(i)
        back = scale_boxes_to_original(boxes.double(), meta["ratio"], meta["pad"], meta["orig_size"])
        np.testing.assert_allclose(back.numpy(), expected_boxes, atol=1e-3)
        assert np.array_equal(labels.numpy(), expected_labels) and meta["orig_size"] == val.source.image_size(i)
