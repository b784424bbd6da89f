"""The config schemas: every key of every tool, with its type, default and bounds (`detect.config` loads them).

`ClsConfig` (tools/train_cls.py) and `DetConfig` (train_det, val_det) are dataclasses of sections; a field's
`metadata` holds its choices, its range (`min`, `max`, open ends) or the multiple it must be, which
`detect.config.load_config` checks when the config is resolved and `--help` shows (`detect.config.help`). The trailing
comment of a field is its help text.

This module imports nothing heavy: `--help` reads it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _choice(default: str, *choices: str) -> Any:
    """A string field that must be one of `choices` (checked by `load_config`)."""
    return field(default=default, metadata={"choices": (default, *choices)})


def _at_least(default: Any, low: float, *, multiple: int | None = None) -> Any:
    """A number field that must be >= `low` (and a multiple of `multiple`, where given; checked by `load_config`)."""
    return field(default=default, metadata={"min": low, **({"multiple": multiple} if multiple else {})})


def _in_range(default: Any, low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Any:
    """A number field in [low, high] (`high_open` / `low_open`: that end excluded; checked by `load_config`)."""
    return field(default=default, metadata={"min": low, "max": high, "min_open": low_open, "max_open": high_open})


def _optional_at_least(low: float) -> Any:
    """A number field that is None or >= `low`."""
    return field(default=None, metadata={"min": low})


# ----------------------------------------------------------------------------------------------------------------------
# Classification (tools/train_cls.py). The defaults are the synthetic mini-CUB demo run (configs/cls/default.yaml).
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ClsDataConfig:
    root: str = "data/synth_cub"  # folder holding CUB_200_2011/ (or that folder); the default is generated if absent
    img_size: int = _at_least(128, 8)  # network input side (train crop, val centre crop)
    resize_size: int = _at_least(146, 8)  # shorter side (val) / square side (train) before cropping
    random_resized_crop: bool = False  # RandomResizedCrop(img_size) instead of Resize + RandomCrop


@dataclass
class ClsModelConfig:
    backbone: str = "cspdarknet_n"  # a registered backbone name (backbones.list_backbones())
    backbone_weights: str | None = None  # local file, or a torchvision weights name already in the torch cache
    dropout: float = _in_range(0.0, 0.0, 1.0, high_open=True)  # before the linear classifier


@dataclass
class ClsTrainConfig:
    epochs: int = _at_least(40, 1)  # passes over the training split
    batch_size: int = _at_least(32, 1)  # total over all processes
    lr: float = _at_least(0.002, 0.0)  # peak learning rate (after warmup)
    lrf: float = _in_range(0.01, 0.0, 1.0)  # final lr = lr * lrf (cosine, linear)
    optimizer: str = _choice("adamw", "sgd")
    momentum: float = _in_range(0.9, 0.0, 1.0, high_open=True)  # SGD momentum (nesterov) or AdamW beta1
    weight_decay: float = _at_least(0.05, 0.0)  # not applied to norm weights and biases
    scheduler: str = _choice("cosine", "step", "multistep", "linear")
    milestones: list[int] = field(default_factory=list)  # multistep: epochs where lr *= gamma
    step_size: int = _at_least(30, 1)  # step: lr *= gamma every step_size epochs
    gamma: float = _in_range(0.1, 0.0, 1.0)  # step / multistep: lr *= gamma
    warmup_epochs: float = _at_least(1.0, 0.0)  # linear warmup from lr * warmup_start, per iteration
    warmup_start: float = _in_range(0.1, 0.0, 1.0)  # warmup starts at lr * warmup_start
    label_smoothing: float = _in_range(0.1, 0.0, 1.0, high_open=True)  # of the cross-entropy targets
    precision: str = _choice("auto", "fp32", "bf16", "fp16")  # auto: fp32 on CPU (bf16 lost top-1), fp16 on CUDA
    channels_last: bool = False  # NHWC memory format
    ema: bool = False  # evaluate and save an exponential moving average of the weights
    finetune: str = _choice("all", "freeze", "classifier")  # freeze: the first train.freeze_stages stages
    freeze_stages: int = _at_least(0, -1)  # with finetune=freeze: k first stages (-1 = the whole backbone)
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    device: str = _choice("auto", "cpu", "cuda")
    workers: int = _at_least(2, 0)  # DataLoader worker processes (0: load in the main process)
    threads: int | None = _optional_at_least(1)  # torch.set_num_threads (None: torch's default)
    ddp_timeout: float = _at_least(5.0, 0.05)  # torchrun: minutes a rank waits for a hung one (not for rank 0's eval)
    resume: str | None = None  # a last.pt to continue from (its run directory and config)


@dataclass
class ClsConfig:
    imports: list[str] = field(default_factory=list)  # plugin modules (registering parts) imported first
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    train: ClsTrainConfig = field(default_factory=ClsTrainConfig)
    output_dir: str = "runs/cls/default"  # a run never overwrites another: default-2, default-3, ...
    seed: int = 0  # every random choice (sample order, augmentation, initial weights) follows from it


# ----------------------------------------------------------------------------------------------------------------------
# Detection (tools/train_det.py, val_det.py). YOLOv8 defaults (DESIGN §5).
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class DetDataConfig:
    format: str = "cub"  # a registered data format: cub, coco, yolo, or a plugin's own (detect/data/formats.py)
    root: str = "data/synth_cub"  # the data set's folder (cub: the folder holding CUB_200_2011/)
    labels: str = _choice("bird", "species")  # cub: one class, or one per species
    img_size: int = _at_least(256, 32, multiple=32)  # letterboxed square side (refused, not rounded)
    train_json: str | None = None  # coco
    val_json: str | None = None  # coco
    image_dir: str | None = None  # coco: images folder (default: beside the json)
    yaml: str | None = None  # yolo: Ultralytics data.yaml
    cache: bool = False  # train images decoded once into RAM (N x S^2 x 3 x aspect bytes; see detect/data/detection.py)
    options: dict[str, Any] = field(default_factory=dict)  # the format's own keys (data.options.KEY=VALUE)


@dataclass
class DetModelConfig:
    scale: str = _choice("n", "s", "m", "l", "x")  # given to the neck when its factory takes a `scale`
    num_classes: int | None = _optional_at_least(1)  # None: from the data
    backbone: str | None = None  # None: the family's own at the scale (cspdarknet_<scale>, csp11_<scale> for yolo11)
    backbone_weights: str | None = None  # e.g. a backbone.pt from train_cls
    weights: str | None = None  # the whole detector's initial weights: a detector checkpoint (fine-tuning)
    neck: str | None = None  # a registered neck (list_necks()); None: the head family's own (yolov8 -> yolov8, fpn ...)
    head: str = "yolov8"  # a registered head family (list_heads())
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the backbone factory
    neck_kwargs: dict[str, Any] = field(default_factory=dict)  # ... of the neck factory
    head_kwargs: dict[str, Any] = field(default_factory=dict)  # ... of the head factory (yolo: reg_max)


@dataclass
class DetTrainConfig:
    epochs: int = _at_least(30, 1)  # passes over the training split
    batch_size: int = _at_least(16, 1)  # total over all processes
    nominal_batch_size: int = _at_least(64, 1)  # gradients accumulate up to this; weight decay scales with it
    lr: float = _at_least(0.01, 0.0)  # initial learning rate (after warmup)
    lrf: float = _in_range(0.01, 0.0, 1.0)  # final lr = lr * lrf
    optimizer: str = _choice("sgd", "adamw", "musgd")
    momentum: float = _in_range(0.937, 0.0, 1.0, high_open=True)  # SGD momentum or AdamW beta1
    weight_decay: float = _at_least(5e-4, 0.0)  # at the nominal batch size; none on norm weights and biases
    warmup_epochs: float = _at_least(3.0, 0.0)  # warmup lasts max(warmup_epochs, 100 iterations)
    warmup_bias_lr: float = _at_least(0.1, 0.0)  # the bias group's lr at the start of warmup
    warmup_momentum: float = _in_range(0.8, 0.0, 1.0, high_open=True)  # momentum at the start of warmup
    scheduler: str = _choice("linear", "cosine")
    close_mosaic: int = _at_least(10, 0)  # last epochs without Mosaic
    mosaic: float = _in_range(1.0, 0.0, 1.0)  # probability of a Mosaic of 4
    hsv_h: float = _in_range(0.015, 0.0, 1.0)  # hue gain (fraction)
    hsv_s: float = _in_range(0.7, 0.0, 1.0)  # saturation gain (fraction)
    hsv_v: float = _in_range(0.4, 0.0, 1.0)  # value gain (fraction)
    fliplr: float = _in_range(0.5, 0.0, 1.0)  # probability of a horizontal flip
    scale: float = _in_range(0.5, 0.0, 1.0, high_open=True)  # random scale gain: 1 +/- scale
    translate: float = _in_range(0.1, 0.0, 1.0)  # random translation (fraction of the side)
    ema: bool = True  # evaluate and save an exponential moving average of the weights
    grad_clip: float = _at_least(10.0, 0.0)  # max gradient norm (0 = off)
    backbone_lr_scale: float = _at_least(1.0, 0.0)  # the backbone's lr = lr * this (DETR recipes: 0.1 / 0.5)
    freeze_stages: int = _at_least(0, -1)  # backbone stages frozen (-1 = all)
    precision: str = _choice("auto", "fp32", "bf16", "fp16")  # auto: bf16 on a CPU with native bf16, fp16 on CUDA
    channels_last: bool = True  # NHWC convolutions: ~1.2-1.45x faster training on CPU, faster on CUDA
    sync_bn: bool = False  # SyncBatchNorm under torchrun (CUDA)
    device: str = _choice("auto", "cpu", "cuda")
    workers: int = _at_least(2, 0)  # DataLoader worker processes (0: load in the main process)
    threads: int | None = _optional_at_least(1)  # torch.set_num_threads (None: torch's default)
    ddp_timeout: float = _at_least(5.0, 0.05)  # torchrun: minutes a rank waits for a hung one (not for rank 0's eval)
    resume: str | None = None  # a last.pt to continue from (its run directory and config)


@dataclass
class DetLossConfig:
    name: str | None = None  # a registered loss (list_losses()); None: the head family's own (yolo heads: "yolo")
    box: float = _at_least(7.5, 0.0)  # yolo: gain of the box (IoU) part
    cls: float = _at_least(0.5, 0.0)  # yolo: gain of the classification part
    dfl: float = _at_least(1.5, 0.0)  # yolo: gain of the DFL part
    iou: str = _choice("ciou", "diou", "giou", "iou")  # yolo: the box part's overlap
    kwargs: dict[str, Any] = field(default_factory=dict)  # settings of a plugin loss


@dataclass
class DetAssignConfig:
    topk: int = _at_least(10, 1)  # TaskAligned assigner (TOOD): positives per ground truth
    alpha: float = _at_least(0.5, 0.0)  # score exponent of the alignment metric
    beta: float = _at_least(6.0, 0.0)  # IoU exponent of the alignment metric
    eps: float = _at_least(1e-9, 0.0)  # numerical floor of the alignment metric
    iou: str = _choice("ciou", "diou", "giou", "iou")  # the alignment metric's overlap
    min_gt_side: float | None = _optional_at_least(0.0)  # boxes smaller (px) widen their candidates; None: mid stride


@dataclass
class DetEvalConfig:
    interval: int = _at_least(1, 1)  # evaluate every k epochs (and after the last)
    conf: float = _in_range(0.001, 0.0, 1.0)  # NMS score threshold
    iou: float = _in_range(0.7, 0.0, 1.0)  # NMS IoU threshold
    max_det: int = _at_least(300, 1)  # boxes kept per image after NMS
    coco_max_dets: int = _at_least(100, 10)  # COCO's last maxDets cap (AP, AR rows); 300 counts every kept box
    backend: str = _choice("pycocotools", "faster")


@dataclass
class DetConfig:
    imports: list[str] = field(default_factory=list)  # plugin modules (registering parts) imported first
    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    train: DetTrainConfig = field(default_factory=DetTrainConfig)
    loss: DetLossConfig = field(default_factory=DetLossConfig)
    assign: DetAssignConfig = field(default_factory=DetAssignConfig)
    eval: DetEvalConfig = field(default_factory=DetEvalConfig)
    output_dir: str = "runs/det/default"  # a run never overwrites another: default-2, default-3, ...
    seed: int = 0  # every random choice (sample order, augmentation, initial weights) follows from it


# Keys that moved: an old key in a file or an override is one line naming the new key; a checkpoint's saved config
# (written before the move) is mapped silently, so old runs still load and resume.
MOVED_KEYS: dict[str, str] = {"train.box": "loss.box", "train.cls": "loss.cls", "train.dfl": "loss.dfl",
                              "train.amp": "train.precision", "train.bf16": "train.precision"}  # fmt: skip
# Moved keys whose value changes too: the new value for the old one, in the moved-key line and in a saved config.
MOVED_VALUES: dict[str, dict[bool, str]] = {"train.amp": {True: "fp16", False: "fp32"},
                                            "train.bf16": {True: "bf16", False: "fp32"}}  # fmt: skip


# Ultralytics' names (`yolo train epochs=3 imgsz=640 ...`) and where the same setting lives here: an unknown key with
# one of these names gets "did you mean" with ours. Only the targets a schema has are offered.
ULTRALYTICS_KEYS: dict[str, str] = {
    "epochs": "train.epochs", "imgsz": "data.img_size", "batch": "train.batch_size", "lr0": "train.lr",
    "lrf": "train.lrf", "momentum": "train.momentum", "weight_decay": "train.weight_decay",
    "workers": "train.workers", "device": "train.device", "box": "loss.box", "cls": "loss.cls", "dfl": "loss.dfl",
    "close_mosaic": "train.close_mosaic", "mosaic": "train.mosaic", "fliplr": "train.fliplr", "hsv_h": "train.hsv_h",
    "hsv_s": "train.hsv_s", "hsv_v": "train.hsv_v", "translate": "train.translate", "scale": "train.scale",
    "warmup_epochs": "train.warmup_epochs", "warmup_momentum": "train.warmup_momentum",
    "warmup_bias_lr": "train.warmup_bias_lr", "optimizer": "train.optimizer", "seed": "seed",
    "resume": "train.resume", "data": "data.yaml", "model": "model.backbone", "cfg": "CONFIG.yaml (the positional "
    "argument)", "conf": "eval.conf", "iou": "eval.iou", "max_det": "eval.max_det", "amp": "train.precision",
    "cache": "data.cache", "project": "output_dir", "name": "output_dir", "label_smoothing": "train.label_smoothing",
    "freeze": "train.freeze_stages", "nbs": "train.nominal_batch_size", "cos_lr": "train.scheduler",
    "dropout": "model.dropout", "pretrained": "model.backbone_weights", "weights": "model.weights",
}  # fmt: skip
