"""Classification pipelines (DESIGN §4): albumentations `Compose` objects, where albumentations' resize / crop / flip /
colour-jitter transforms are exactly the recipe; `seed_transform` makes them per-sample seedable.

A module of its own so that detection (train_det, val_det, predict, the API) never imports albumentations: its
import costs ~1.3 s of a short detection run's start-up (issue 20), and no detection transform uses it
(`detect.data.transforms` says why).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from backbones.errors import UserError


def build_cls_transforms(train: bool, img_size: int, resize_size: int, random_resized_crop: bool = False) -> A.Compose:
    """Classification pipeline (DESIGN §4): the fine-grained seed recipe, as an albumentations Compose.

    train: SmallestMaxSize(resize_size) + RandomCrop(img_size), or RandomResizedCrop(img_size) on the raw image when
    `random_resized_crop`; HorizontalFlip(0.5); ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, no hue),
    always applied as torchvision's is. val: SmallestMaxSize(resize_size) + CenterCrop(img_size). Both end with
    ImageNet Normalize and ToTensorV2. Call `seed_transform(t, seed)` before `t(image=img)` for per-sample results.

    Args:
        train: training (random) or validation (deterministic) pipeline.
        img_size: output side S.
        resize_size: shorter side after the first resize (ignored by RandomResizedCrop); must be >= img_size.
        random_resized_crop: use RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) instead of resize + random crop.

    Returns:
        callable `t(image=[H, W, 3] uint8 RGB)["image"] -> float32 tensor [3, S, S]`.
    """
    if img_size <= 0 or resize_size < img_size:
        raise UserError(f"need 0 < img_size <= resize_size, got img_size={img_size} resize_size={resize_size}")
    resize = A.SmallestMaxSize(max_size=resize_size, interpolation=cv2.INTER_LINEAR)
    if not train:
        geometry = [resize, A.CenterCrop(height=img_size, width=img_size)]
    elif random_resized_crop:
        geometry = [A.RandomResizedCrop(size=(img_size, img_size), interpolation=cv2.INTER_LINEAR)]
    else:
        geometry = [resize, A.RandomCrop(height=img_size, width=img_size)]
    colour = []
    if train:
        colour = [A.HorizontalFlip(p=0.5), A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, p=1.0)]
    return A.Compose([*geometry, *colour, A.Normalize(), ToTensorV2()])


def seed_transform(transform: A.Compose, seed: int | Sequence[int]) -> A.Compose:
    """Give an albumentations Compose one fresh random stream derived from `seed` (e.g. (seed, epoch, index)).

    `Compose.set_random_seed` would give every child transform its own generator started from the same seed, so
    their draws would be correlated; here all children share one NumPy and one Python generator.

    Args:
        transform: pipeline from `build_cls_transforms` (any Compose).
        seed: int or sequence of non-negative ints.

    Returns:
        `transform` itself, reseeded.
    """
    seq = np.random.SeedSequence(seed)
    py_seed = int(seq.generate_state(1, np.uint64)[0])
    transform.set_random_state(np.random.default_rng(seq), random.Random(py_seed))
    return transform
