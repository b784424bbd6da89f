"""Detection training set-up: the `build_*` functions that turn a `DetConfig` into objects (STYLE 4).

`detect.train.detection` is a linear run over these and `detect/train/engine.py`'s loops (STYLE 8).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from backbones.errors import UserError
from backbones.freeze import freeze_stages
from detect.checkpoints import load_detector_weights
from detect.config import DetConfig, config_to_dict
from detect.data.build import build_source
from detect.data.detection import DetectionDataset, detection_collate
from detect.data.workers import quiet_worker
from detect.losses import build_criterion
from detect.losses.registry import check_loss_settings
from detect.models import Detector, DetectorSpec, PartSpec, build_detector
from detect.models.build import neck_takes_scale
from detect.models.registry import default_neck
from detect.models.yolo_family import FAMILY_BACKBONES
from detect.train.distributed import DistInfo, unwrap
from detect.train.engine import Schedule
from detect.train.memory import cache_train_images
from detect.train.optim import (
    build_musgd_param_groups,
    build_optimizer,
    build_param_groups,
    scale_backbone_lr,
    scaled_weight_decay,
    warmup_iterations,
)
from detect.train.samples import NamedSamples
from detect.train.seeding import DistributedEpochSampler

logger = logging.getLogger("plugdet")


def build_det_datasets(cfg: DictConfig) -> tuple[DetectionDataset, DetectionDataset]:
    """Train (YOLOv8 augmentation, Mosaic) and val (letterbox) datasets over the configured sources.

    Both splits are scanned once (`DetectionDataset.check_images`, ~0.1 s per 1,000 images): an unreadable validation
    image or too many unreadable training images raise `UserError` here, before anything is written.
    """
    t = cfg.train
    train_source, val_source = build_source(cfg.data, "train"), build_source(cfg.data, "val")
    if len(train_source) == 0 or len(val_source) == 0:
        raise UserError(f"empty split: {len(train_source)} train / {len(val_source)} val images in {cfg.data.root}")
    if list(train_source.class_names) != list(val_source.class_names):
        raise UserError("train and val splits have different class lists: check the data set's categories")
    train = DetectionDataset(train_source, cfg.data.img_size, True, mosaic=t.mosaic, hsv=(t.hsv_h, t.hsv_s, t.hsv_v),
                             fliplr=t.fliplr, scale=t.scale, translate=t.translate, seed=cfg.seed)  # fmt: skip
    val = DetectionDataset(val_source, cfg.data.img_size, False, seed=cfg.seed)
    val.check_images()  # a bad validation image stops the run now, not after the first epoch
    train.check_images()  # bad training images are skipped (counted warnings) unless there are too many
    return train, val


def build_det_loaders(
    train: DetectionDataset, val: DetectionDataset, cfg: DictConfig, info: DistInfo
) -> tuple[DataLoader, DistributedEpochSampler, DataLoader]:
    """Loaders of this process's shards; `train.batch_size` is the global batch and must divide by the world size.

    The train sampler yields `(index, epoch)`, so every augmented image is a function of (seed, epoch, index) and
    neither workers nor a resume change it. Validation runs on rank 0 over the whole split. With `data.cache` the
    train images are decoded into RAM here, after every input was checked and before the workers start.
    """
    total, world = cfg.train.batch_size, info.world_size
    if total % world:
        raise UserError(f"train.batch_size={total} must be a multiple of the number of processes ({world})")
    batch = total // world
    sampler = DistributedEpochSampler(len(train), world, info.rank, cfg.seed, True, batch, True)
    if cfg.data.cache and train.train:  # before any worker exists: forked workers share the decoded images
        cache_train_images(train)
    workers = cfg.train.workers
    common = {"num_workers": workers, "pin_memory": info.device.type == "cuda", "collate_fn": detection_collate,
              "persistent_workers": workers > 0, "worker_init_fn": quiet_worker}  # fmt: skip
    # Each loader draws its workers' base seed from a generator of its own, not from the global torch RNG, which the
    # model's forward may read (DETR denoising) and a resume restores: creating an iterator (each epoch, and again
    # on resume) must not move it. Augmentation is seeded per sample (`sample_seed`), so these seeds change nothing.
    own = {"generator": torch.Generator().manual_seed(cfg.seed)}
    train_loader = DataLoader(NamedSamples(train), batch_size=batch, sampler=sampler, drop_last=False, **common, **own)
    # rect validation: batches of similar aspect ratio, each letterboxed to its own smallest canvas (DESIGN §6)
    own = {"generator": torch.Generator().manual_seed(cfg.seed)}
    val_loader = DataLoader(NamedSamples(val), batch_sampler=val.rect_batches(batch * 2), **common, **own)
    return train_loader, sampler, val_loader


def _plain(kwargs: Any) -> dict[str, Any]:
    """A config section's kwargs as plain data (lists, not OmegaConf's ListConfig): they go into the checkpoint's
    `arch`, which loads with weights_only."""
    return OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else dict(kwargs)


def detector_spec(cfg: DictConfig, num_classes: int) -> DetectorSpec:
    """The spec of the configured detector (`model.*`), stored as `arch` in every detector checkpoint.

    `model.neck` None is the head family's own neck (`detect.models.registry.default_neck`: yolov8's PAN for yolov8,
    torchvision's FPN with P6/P7 for retinanet, ...), with its kwargs under `model.neck_kwargs`. `model.backbone`
    None is the YOLO family's own backbone at `model.scale` (cspdarknet_<scale>, csp11_<scale> for the yolo11 neck;
    cspdarknet_<scale> for every other neck); `model.scale` goes to the neck when its factory takes a `scale`.
    """
    m = cfg.model
    neck, own_kwargs = (m.neck, {}) if m.neck else default_neck(m.head)
    backbone = m.backbone or f"{FAMILY_BACKBONES.get(neck, FAMILY_BACKBONES['yolov8'])}_{m.scale}"
    neck_kwargs = {"scale": m.scale} if neck_takes_scale(neck) else {}
    return DetectorSpec(
        num_classes=int(num_classes),
        backbone=PartSpec(backbone, _plain(m.backbone_kwargs)),
        neck=PartSpec(neck, {**neck_kwargs, **own_kwargs, **_plain(m.neck_kwargs)}),
        head=PartSpec(m.head, _plain(m.head_kwargs)),
    )


def build_det_model(cfg: DictConfig, num_classes: int, load_backbone: bool = True) -> Detector:
    """The detector, its initial weights (not when resuming): the backbone's (`model.backbone_weights`, e.g. train_cls's
    backbone.pt) or the whole detector's (`model.weights`, a detector checkpoint), and its frozen stages."""
    if cfg.model.weights and cfg.model.backbone_weights and load_backbone:
        raise UserError("model.weights (the whole detector) and model.backbone_weights are both set: keep one "
                        "(model.backbone_weights=null to fine-tune from model.weights)")  # fmt: skip
    weights = cfg.model.backbone_weights if load_backbone else None
    model = build_detector(detector_spec(cfg, num_classes), weights)
    if cfg.model.weights and load_backbone:
        load_detector_weights(model, cfg.model.weights)
    if cfg.train.freeze_stages:
        count = freeze_stages(model.backbone, cfg.train.freeze_stages)
        logger.info("froze %d backbone tensors (train.freeze_stages=%d)", count, cfg.train.freeze_stages)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_det_criterion(cfg: DictConfig, model: Detector) -> Callable:
    """The head family's criterion (or the registered `loss.name`), from the `loss.*` and `assign.*` sections."""
    plain, defaults = config_to_dict(cfg), config_to_dict(OmegaConf.structured(DetConfig))
    loss = {k: v for k, v in plain["loss"].items() if k not in ("name", "kwargs")}
    changed = {k: v for k, v in loss.items() if v != defaults["loss"][k]}
    assign_changed = {k: v for k, v in plain["assign"].items() if v != defaults["assign"][k]}
    check_loss_settings(cfg.loss.name or model.head.default_loss, changed, plain["loss"]["kwargs"], assign_changed,
                        cfg.model.head)  # fmt: skip
    loss.update(plain["loss"]["kwargs"])
    return build_criterion(model.head, cfg.loss.name, loss, plain["assign"])


def build_det_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD / AdamW over YOLOv8's three groups, or MuSGD over Ultralytics' eight (the head's class branches at 3x the
    lr); weight decay scaled to the nominal batch size; the backbone's groups at `train.backbone_lr_scale` x the lr."""
    t = cfg.train
    decay = scaled_weight_decay(t.weight_decay, t.batch_size, t.nominal_batch_size)
    if t.optimizer == "musgd":
        head = getattr(model, "head", model)
        boosted = [p for name, p in head.named_parameters() if "cls_branch" in name]
        groups = build_musgd_param_groups(model, decay, boosted)
    else:
        groups = build_param_groups(model, decay)
    groups = scale_backbone_lr(groups, getattr(unwrap(model), "backbone", None), t.backbone_lr_scale)
    return build_optimizer(t.optimizer, groups, t.lr, t.momentum)


def build_schedule(cfg: DictConfig, iters_per_epoch: int) -> Schedule:
    t = cfg.train
    return Schedule(lr=t.lr, lrf=t.lrf, epochs=t.epochs, scheduler=t.scheduler, momentum=t.momentum,
                    warmup_iters=warmup_iterations(t.warmup_epochs, iters_per_epoch),
                    warmup_bias_lr=t.warmup_bias_lr, warmup_momentum=t.warmup_momentum,
                    batch_size=t.batch_size, nominal_batch_size=t.nominal_batch_size)  # fmt: skip
