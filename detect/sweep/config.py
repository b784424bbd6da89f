"""The sweep's config: what to cross (backbones, heads, initialisations, seeds) and how each tool runs.

`SweepConfig` is loaded by `detect.config.load_config` like the tools' configs: defaults, then a YAML file, then
`key=value` overrides, and an unknown key or a wrong type is one line (exit 2). What the schema cannot type is
checked by `check_sweep`: a head entry (a det CONFIG file, or a mapping of `config`, `overrides` and `head`), the
initialisations, the imagenet files. `check_sweep` also resolves each head's train_det config and the train_cls
config in-process, so a bad key in `det.overrides` or in a head's overrides stops the sweep before its first run,
instead of failing once per cell an hour later.

This module imports no torch (`--help` reads the schema); `check_sweep` imports the registries when it runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbones.errors import UserError
from detect.config.schema import _at_least, _optional_at_least

INITS = ("scratch", "pretrained", "imagenet")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a head's name becomes part of a folder name
_HEAD_KEYS = ("config", "overrides", "head")


@dataclass
class SweepToolConfig:
    config: str | None = None  # the tool's CONFIG file (null: the tool's own default)
    overrides: list[str] = field(default_factory=list)  # key=value given to every run of the tool


@dataclass
class SweepMeasureConfig:
    img_size: int | None = field(default=None, metadata={"min": 32, "multiple": 32})  # null: each cell's data.img_size
    threads: int = _at_least(2, 1)  # torch threads of the CPU latency measurement
    runs: int = _at_least(20, 1)  # timed batch-1 forwards of the fused model; the median is reported
    warmup: int = _at_least(3, 0)  # untimed forwards before them


@dataclass
class SweepConfig:
    backbones: list[str] = field(default_factory=lambda: ["cspdarknet_n"])  # registered names (list_backbones())
    heads: dict[str, Any] = field(default_factory=dict)  # name: det CONFIG file, or {config, overrides, head}
    init: list[str] = field(default_factory=lambda: ["scratch", "pretrained"])  # of scratch, pretrained, imagenet
    seeds: list[int] = field(default_factory=lambda: [0])  # seed= of every detection cell
    imagenet: dict[str, str] = field(default_factory=dict)  # backbone: local weights file (for init imagenet)
    data_root: str | None = None  # data.root of every run (null: as the tools' configs say)
    threads: int | None = _optional_at_least(1)  # train.threads of every run and its OMP_NUM_THREADS
    cls: SweepToolConfig = field(default_factory=SweepToolConfig)  # train_cls: one pretraining per backbone
    det: SweepToolConfig = field(default_factory=SweepToolConfig)  # train_det: every cell (the head's come after)
    measure: SweepMeasureConfig = field(default_factory=SweepMeasureConfig)
    output_dir: str = "runs/sweep/default"  # cells/, cls/, logs/ and the report (re-runs continue in it)


@dataclass(frozen=True)
class HeadEntry:
    """One head of the sweep, as its cells run it.

    Attributes:
        name: the label in the tables and in cell folder names (the key under `heads`).
        head: the registered head family given as `model.head=` (default: `name`).
        config: train_det's CONFIG file for this head (default: `det.config`, then train_det's own default).
        overrides: key=value for this head's cells, after `det.overrides` (e.g. `model.neck=yolo11`).
    """

    name: str
    head: str
    config: str | None
    overrides: tuple[str, ...]


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    """A list of key=value strings, or one line saying what is wrong."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise UserError(f"{where} must be a list of key=value strings, got {value!r}")
    bad = [item for item in value if not isinstance(item, str) or "=" not in item]
    if bad:
        raise UserError(f"{where}: {bad[0]!r} is not key=value (e.g. train.epochs=5)")
    return tuple(value)


def parse_heads(heads: Mapping[str, Any], default_config: str | None) -> list[HeadEntry]:
    """The `heads` mapping as entries: `name: CONFIG.yaml`, `name: {config, overrides, head}`, or `name: {}`."""
    if not heads:
        raise UserError("the sweep config lists no heads: add e.g. `heads: {yolov8: configs/det/default.yaml}`")
    entries = []
    for name, value in heads.items():
        where = f"sweep config key 'heads.{name}'"
        if not _NAME.match(str(name)):
            raise UserError(f"{where}: a head's name is part of folder names; use letters, digits, _ . + -")
        value = {} if value is None else ({"config": value} if isinstance(value, str) else value)
        if not isinstance(value, Mapping):
            raise UserError(f"{where} = {value!r}: give a det CONFIG file or a mapping of {', '.join(_HEAD_KEYS)}")
        unknown = [key for key in value if key not in _HEAD_KEYS]
        if unknown:
            raise UserError(f"unknown {where[:-1]}.{unknown[0]}'; a head entry has {', '.join(_HEAD_KEYS)}")
        config = value.get("config") or default_config
        head = str(value.get("head") or name)
        entries.append(HeadEntry(str(name), head, config, _overrides(value.get("overrides"), f"{where}.overrides")))
    return entries


def _unique(values: Sequence[Any], key: str) -> None:
    if not values:
        raise UserError(f"sweep config key {key!r} is empty: list at least one")
    dup = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if dup is not None:
        raise UserError(f"sweep config key {key!r} lists {dup!r} twice")


def check_sweep(cfg: Any) -> tuple[list[HeadEntry], set[str]]:
    """Check what the schema cannot, and resolve every tool config the cells will run; returns the heads and the
    data roots the runs read (CUB-format roots only: those a tool may generate the synthetic mini-CUB in).

    Raises:
        UserError: an unknown initialisation, backbone or head family; an imagenet cell without its file; a bad key
            in `cls.overrides`, `det.overrides` or a head's overrides (the message names which).
    """
    _unique(list(cfg.backbones), "backbones")
    _unique(list(cfg.seeds), "seeds")
    _unique(list(cfg.init), "init")
    wrong = [init for init in cfg.init if init not in INITS]
    if wrong:
        raise UserError(f"sweep config key 'init' lists {wrong[0]!r}: choose from {', '.join(INITS)}")
    heads = parse_heads(dict(cfg.heads), cfg.det.config)
    if "imagenet" in cfg.init:
        for backbone in cfg.backbones:
            path = cfg.imagenet.get(backbone)
            if not path:
                raise UserError(f"init imagenet needs a local weights file for {backbone}: imagenet.{backbone}=PATH "
                                "in the sweep config (plugdet never downloads)")  # fmt: skip
            if not Path(path).is_file():
                raise UserError(f"sweep config key 'imagenet.{backbone}' = {path}: no such file")
    return heads, _check_tool_configs(cfg, heads)


def _check_tool_configs(cfg: Any, heads: list[HeadEntry]) -> set[str]:
    """Resolve each head's train_det config and the train_cls config as the cells will; check the part names;
    returns the CUB data roots of those configs."""
    from backbones.registry import build_backbone
    from detect.config import ClsConfig, DetConfig, load_config
    from detect.models.registry import list_heads
    from detect.plugins import import_plugins

    root = [f"data.root={cfg.data_root}"] if cfg.data_root else []
    first, roots = f"model.backbone={cfg.backbones[0]}", set()
    if "pretrained" in cfg.init:
        try:
            cls_overrides = _overrides(cfg.cls.overrides, "cls.overrides")
            cls = load_config(ClsConfig, cfg.cls.config, [*root, *cls_overrides, first])
        except UserError as exc:
            raise UserError(f"sweep cls config (for tools/train_cls.py): {exc}") from None
        roots.add(str(cls.data.root))
    det_overrides = _overrides(cfg.det.overrides, "det.overrides")
    for entry in heads:
        try:
            det = load_config(DetConfig, entry.config, [*root, *det_overrides, *entry.overrides, first])
        except UserError as exc:
            raise UserError(f"sweep det config of head {entry.name} (for tools/train_det.py): {exc}") from None
        import_plugins(det.imports)
        if det.data.format == "cub":
            roots.add(str(det.data.root))
        if entry.head not in list_heads():
            raise UserError(f"sweep head {entry.name}: unknown head family {entry.head!r}: registered heads are "
                            f"{', '.join(list_heads())} (set `head:` in its entry, or register it in a module named "
                            "by the det config's `imports`)")  # fmt: skip
    for backbone in cfg.backbones:
        build_backbone(backbone)  # an unknown name is one line listing the registered ones
    return roots
