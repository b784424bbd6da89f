"""Detection training set-up: the `build_*` functions that read a `DetConfig`, and last.pt's training state.

`tools/train_det.py` is a linear `main()` over these and `detect/train/engine.py`'s loops (STYLE 8).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from backbones.errors import UserError
from backbones.freeze import freeze_stages
from detect.config import config_to_dict
from detect.data.build import build_source
from detect.data.detection import DetectionDataset, detection_collate
from detect.losses import build_criterion
from detect.losses.yolo import LEGACY_PART_ORDER
from detect.models import Detector, DetectorSpec, PartSpec, build_detector
from detect.models.build import neck_takes_scale
from detect.models.checkpoint import read_detector_checkpoint
from detect.models.registry import default_neck
from detect.models.yolo import FAMILY_BACKBONES
from detect.train.distributed import DistInfo
from detect.train.engine import Schedule, pending_gradients, restore_gradients
from detect.train.optim import ModelEMA, build_optimizer, build_param_groups, scaled_weight_decay, warmup_iterations
from detect.train.resume import restore_resume_state, resume_state
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


def quiet_worker(worker_id: int) -> None:
    """A loader worker uses one torch thread: on a few cores, threads inside workers only compete.

    OpenCV's thread count is deliberately left alone: `cv2.setNumThreads` in a forked worker hangs for good when the
    parent process had already used OpenCV's thread pool (e.g. a second run in the same process, a notebook, a
    test), while OpenCV's own functions work in the fork either way.
    """
    torch.set_num_threads(1)


def _read_int(path: Path) -> int | None:
    """The integer a one-line cgroup file holds; None for "max", an absent or unreadable file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_paths(proc: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and v1 memory-controller path, from `<proc>/self/cgroup`."""
    v2 = v1 = None
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def cgroup_memory_left(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's container (cgroup) still lets it allocate: the smallest limit minus usage over its own
    cgroup and the ones above it, v2 (`memory.max`, `memory.current`) or v1 (`memory.limit_in_bytes`,
    `memory.usage_in_bytes`); None without a limit.

    Args:
        proc: the proc file system (a parameter so that tests can fake one).
        cgroup_root: where the cgroup file systems are mounted.
    """
    v2, v1 = _cgroup_paths(proc)
    candidates: list[tuple[Path, str, str]] = []
    for relative, base, limit, usage in ((v2, cgroup_root, "memory.max", "memory.current"),
                                         (v1, cgroup_root / "memory", "memory.limit_in_bytes",
                                          "memory.usage_in_bytes")):  # fmt: skip
        if relative is None:
            continue
        folder = base / relative.lstrip("/")
        while True:  # the process's own cgroup, then each parent up to the mount point (a parent's limit binds too)
            candidates.append((folder, limit, usage))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    left = None
    for folder, limit_name, usage_name in candidates:
        limit = _read_int(folder / limit_name)
        if limit is None or limit >= 1 << 60:  # "max", or v1's "no limit" (a huge page-rounded number)
            continue
        room = max(limit - (_read_int(folder / usage_name) or 0), 0)
        left = room if left is None else min(left, room)
    return left


def available_memory(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory new allocations can get: the smaller of Linux's `MemAvailable` (the host's view) and what the
    container's cgroup limit leaves (`cgroup_memory_left`); None where neither can be read."""
    host = None
    try:
        with open(proc / "meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        host = None
    container = cgroup_memory_left(proc, cgroup_root)
    known = [value for value in (host, container) if value is not None]
    return min(known) if known else None


class NamedSamples(Dataset):
    """A dataset whose errors name the sample: an exception raised while loading index i carries the note
    "(sample index i)", which a DataLoader worker's re-raised error keeps (`detect.cli.loader_failure` reads it).
    A `UserError` (bad data, already naming its file) passes unchanged. Other attributes are the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        try:
            return self.dataset[item]
        except UserError:
            raise
        except Exception as exc:
            index = item[0] if isinstance(item, tuple) else item
            exc.add_note(f"(sample index {index})")
            raise

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def cache_train_images(train: DetectionDataset) -> bool:
    """`data.cache=true`: decode the train images into RAM when they fit, else warn and read them from disk.

    They fit when every process on this node (`LOCAL_WORLD_SIZE` under torchrun; each caches the whole set) together
    needs at most half of the available memory, leaving the rest to models, activations and loader workers.
    """
    need = train.cache_bytes() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    free = available_memory()
    if free is not None and need > free // 2:
        logger.warning("data.cache=true: caching %d train images at %d px needs ~%.1f GB on this node, more than half "
                       "of the %.1f GB available; reading them from disk instead (data.cache=false silences this)",
                       len(train), train.img_size, need / 1e9, free / 1e9)  # fmt: skip
        return False
    start = time.perf_counter()
    size = train.cache_images()
    logger.info("cached %d train images in RAM (%.0f MB) in %.1f s (data.cache=true)", len(train), size / 2**20,
                time.perf_counter() - start)  # fmt: skip
    return True


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
    train_loader = DataLoader(NamedSamples(train), batch_size=batch, sampler=sampler, drop_last=False, **common)
    # rect validation: batches of similar aspect ratio, each letterboxed to its own smallest canvas (DESIGN §6)
    val_loader = DataLoader(NamedSamples(val), batch_sampler=val.rect_batches(batch * 2), **common)
    return train_loader, sampler, val_loader


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
        backbone=PartSpec(backbone, dict(m.backbone_kwargs)),
        neck=PartSpec(neck, {**neck_kwargs, **own_kwargs, **m.neck_kwargs}),
        head=PartSpec(m.head, dict(m.head_kwargs)),
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


def load_detector_weights(model: Detector, path: str) -> int:
    """Initialise a detector from a detector checkpoint (`model.weights`: a train_det best.pt / last.pt, or an
    imported Ultralytics file), as fine-tuning does: every tensor whose name and shape match is copied; tensors of
    another shape (the class layers, for another number of classes) keep their initialisation and are listed in the
    log. A checkpoint that shares no tensor, or lacks one of the model's, is a UserError naming the key.

    Returns:
        The number of tensors copied.
    """
    saved = read_detector_checkpoint(path)["model"]
    own = model.state_dict()
    missing = [key for key in own if key not in saved]
    if missing:
        raise UserError(f"model.weights={path}: the checkpoint has no {missing[0]!r} ({len(missing)} of the model's "
                        f"{len(own)} tensors missing): it is another architecture than model.*")  # fmt: skip
    reshaped = [key for key in own if saved[key].shape != own[key].shape]
    model.load_state_dict({k: saved[k] if k not in reshaped else v for k, v in own.items()})
    kept = f"; kept {len(reshaped)} of other shapes ({', '.join(reshaped[:3])}...)" if reshaped else ""
    logger.info("model.weights: copied %d of %d tensors from %s%s", len(own) - len(reshaped), len(own), path, kept)
    return len(own) - len(reshaped)


def build_det_criterion(cfg: DictConfig, model: Detector) -> Callable:
    """The head family's criterion (or the registered `loss.name`), from the `loss.*` and `assign.*` sections."""
    plain = config_to_dict(cfg)
    loss = {k: v for k, v in plain["loss"].items() if k not in ("name", "kwargs")}
    loss.update(plain["loss"]["kwargs"])
    return build_criterion(model.head, cfg.loss.name, loss, plain["assign"])


def build_det_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD / AdamW over YOLOv8's three groups; weight decay scaled to the nominal batch size."""
    t = cfg.train
    decay = scaled_weight_decay(t.weight_decay, t.batch_size, t.nominal_batch_size)
    return build_optimizer(t.optimizer, build_param_groups(model, decay), t.lr, t.momentum)


def build_schedule(cfg: DictConfig, iters_per_epoch: int) -> Schedule:
    t = cfg.train
    return Schedule(lr=t.lr, lrf=t.lrf, epochs=t.epochs, scheduler=t.scheduler, momentum=t.momentum,
                    warmup_iters=warmup_iterations(t.warmup_epochs, iters_per_epoch),
                    warmup_bias_lr=t.warmup_bias_lr, warmup_momentum=t.warmup_momentum,
                    batch_size=t.batch_size, nominal_batch_size=t.nominal_batch_size)  # fmt: skip


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: ModelEMA | None,
    scaler: torch.amp.GradScaler | None,
    position: tuple[int, int],
    last_step: int,
    best: dict[str, Any],
    partial_sums: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a resume needs beyond the inference weights (stored as last.pt's `train_state`).

    `position` is (epoch, batches of it folded into an optimizer step); `partial_sums` the loss sums of those
    batches (an interrupted epoch), so the resumed epoch's results row equals an uninterrupted one.
    """
    return {
        **resume_state(model, optimizer, ema, scaler, position, best),
        "last_step": last_step,
        "partial_sums": dict(partial_sums) if partial_sums is not None else None,
        "gradients": pending_gradients(model),
    }


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: ModelEMA | None,
    scaler: torch.amp.GradScaler | None,
    path: str,
) -> tuple[tuple[int, int], int, dict[str, Any], dict[str, Any] | None]:
    """Load `training_state` into the training objects and the global RNGs.

    Returns:
        (position, last_step, best, partial_sums `LossSums` state) to continue from.
    """
    position, best = restore_resume_state(state, model, optimizer, ema, scaler, path)
    restore_gradients(model, state.get("gradients") or {})
    return position, int(state["last_step"]), best, read_loss_sums(state.get("partial_sums"))


def read_loss_sums(saved: Any) -> dict[str, Any] | None:
    """An interrupted epoch's saved loss sums as a `LossSums` state; the YOLOv8 list [box, cls, dfl, batches] of a
    last.pt written before the parts were named is read as those names."""
    if isinstance(saved, list | tuple):
        return {"parts": dict(zip(LEGACY_PART_ORDER, saved[:-1], strict=True)), "batches": int(saved[-1])}
    return saved
