"""`timm:<name>`: any timm model as a three-level feature extractor (the optional extra `pip install -e '.[timm]'`).

timm is imported only when a `timm:` name is built: it is optional and slow to import. The model is built with
`timm.create_model(name, features_only=True, out_indices=...)`, where the indices are the deepest of timm's feature
levels (its `feature_info`) at reductions 8, 16 and 32. The levels are read from a first build on the meta device
(fast: no tensor is allocated), so that the real build keeps only the modules up to the stride-32 level. Maps that a
model returns channels-last (`output_fmt` NHWC: Swin, MambaOut) are permuted to NCHW.

Weights come from a local file only (`weights=PATH`), never from the network: a plugdet backbone checkpoint (or a
state dict of this module's `body.*` keys) loads strictly into the backbone; any other file is handed to timm as
`pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`, so that timm's own conversions apply (EMA or "state_dict"
wrappers, a model's checkpoint filter, safetensors). timm loads a feature extractor non-strictly (the classifier is
dropped), so the keys it reports missing are checked here: one the backbone uses is an error.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from backbones.checkpoint import is_backbone_checkpoint, load_backbone_weights, load_checkpoint
from backbones.errors import UserError
from backbones.registry import register_backbone_family
from backbones.torchvision_any import contract_map

TARGET_STRIDES = (8, 16, 32)
INSTALL = "pip install -e '.[timm]'"
# Arguments this module sets itself: weights come only through `weights=PATH`, and never from the network.
RESERVED_KWARGS = ("features_only", "out_indices", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay")


def import_timm(arch: str) -> ModuleType:
    """timm, or a one-line UserError saying how to install the extra."""
    try:
        import timm
    except ImportError as e:
        raise UserError(f"backbone {arch} needs timm, an optional extra: {INSTALL}") from e
    return timm


def check_name(timm: ModuleType, name: str, arch: str) -> None:
    """An unknown timm model name is a UserError with the closest names (hub names `hf-hub:...` are unknown here:
    building one would download its config)."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"close names: {', '.join(close)}; " if close else ""
    raise UserError(f"unknown backbone {arch!r}: not a timm model ({hint}search with timm.list_models('*pattern*'))")


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def feature_levels(timm: ModuleType, name: str, arch: str, model_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """All of the model's feature levels, shallow to deep: dicts with `module`, `reduction`, `num_chs`.

    Built on the meta device first (fast, nothing allocated); a model whose construction needs real tensors is
    built again on the CPU.
    """
    try:
        try:
            with torch.device("meta"):
                probe = timm.create_model(name, features_only=True, pretrained=False, **model_kwargs)
        except Exception:  # e.g. a constructor that reads a tensor's value
            probe = timm.create_model(name, features_only=True, pretrained=False, **model_kwargs)
    except Exception as e:  # timm raises many types for a model without a feature extractor or bad kwargs
        raise UserError(f"backbone {arch} cannot be built by timm as a feature extractor: {first_line(e)}") from e
    return list(probe.feature_info.info)


def choose_levels(levels: list[dict[str, Any]], arch: str) -> tuple[int, int, int]:
    """The index of the deepest feature level at each reduction 8, 16, 32.

    Raises:
        UserError: a reduction is missing (a plain ViT has only 16); the message lists the model's reductions.
    """
    deepest = {int(level["reduction"]): i for i, level in enumerate(levels)}
    if not all(s in deepest for s in TARGET_STRIDES):
        have = ", ".join(str(r) for r in sorted(deepest))
        raise UserError(f"backbone {arch} cannot give feature maps at strides 8, 16 and 32: its timm feature levels "
                        f"have reductions {have or 'none'}")  # fmt: skip
    return tuple(deepest[s] for s in TARGET_STRIDES)


def body_name(timm_name: str, names: set[str]) -> str | None:
    """The name, among the feature extractor's own `names`, of the model's module or tensor `timm_name`.

    timm's extractors rename the model's modules: FeatureListNet flattens a top-level Sequential ("stages.0" ->
    "stages_0"), FeatureGetterNet keeps the model as `model`, FeatureHookNet may keep it as `body`; the
    EfficientNet/MobileNet extractors keep the names.
    """
    for candidate in (timm_name, timm_name.replace(".", "_", 1), f"model.{timm_name}", f"body.{timm_name}"):
        if candidate in names:
            return candidate
    return None


class TimmBackbone(nn.Module):
    """A timm feature extractor at strides 8, 16, 32, NCHW, sized as every plugdet backbone.

    Args:
        name: the timm model name, e.g. "convnext_atto".
        body: `timm.create_model(name, features_only=True, out_indices=<the three levels>)`.

    Attributes:
        body: the timm feature extractor; its keys are the backbone's `body.*`.
        out_channels: channels of the three maps (timm's `feature_info.channels()`).
        strides: (8, 16, 32).
        channels_last: whether timm returns the maps as [B, H, W, C] (then permuted).
    """

    def __init__(self, name: str, body: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.out_channels: tuple[int, int, int] = tuple(int(c) for c in body.feature_info.channels())
        self.strides: tuple[int, int, int] = TARGET_STRIDES
        fmt = getattr(body, "output_fmt", "NCHW")  # timm's Format enum (a str), or absent: NCHW
        self.channels_last = getattr(fmt, "value", fmt) == "NHWC"
        # The module behind each of timm's levels up to the stride-32 one, for `stage_modules`; a level that names no
        # module of the extractor (HRNet's "stem", "stage1") is no boundary.
        modules = {n for n, _ in body.named_modules()}
        levels = body.feature_info.info[: body.feature_info.out_indices[-1] + 1]
        self._level_modules = [n for n in (body_name(level["module"], modules) for level in levels) if n is not None]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x [B, 3, H, W]. Returns: three maps [B, c_i, ceil(H/s_i), ceil(W/s_i)] for s = 8, 16, 32.

        Where the model's own padding gives another size (ConvNeXt's unpadded stem: 12x16 instead of 13x17 at
        stride 8 for a 100x132 input), the map is resized bilinearly, as `tv:` backbones do, so that every backbone
        meets the same size contract; at sides that are multiples of 32 (every detector input) nothing is resized.
        """
        return [contract_map(y, x, stride, self.channels_last) for y, stride in zip(self.body(x), self.strides,
                                                                                      strict=True)]  # fmt: skip

    def stage_modules(self) -> list[nn.Module]:
        """Returns one stage per timm feature level up to the stride-32 one (resnet18d: stem, layer1 ... layer4).

        Stage k holds level k's module and every module between level k-1's and it (the stem goes to the first
        level; EfficientNet's blocks.3 to the stride-16 level, blocks.4); modules after the last level go to the
        last stage. The containers are made on each call and hold the body's own modules; tensors outside them (a
        container's own, e.g. a position embedding, or the rest of a module whose part an earlier stage shares:
        CoaT's positional convolutions) as a ParameterList, so that no tensor is in two stages. Where no level
        names a module of the extractor, returns `[body]`: one stage.
        """
        if not self._level_modules:
            return [self.body]
        index = {name: i for i, name in enumerate(self._level_modules)}
        groups: list[list[nn.Module]] = [[] for _ in self._level_modules]
        following, seen = 0, set()  # the level the next unit leads up to; tensors already in a stage
        for name, unit in _units(self.body, "", set(index)):
            if name in index:
                following = index[name]
            params = list(unit.parameters())
            new = [p for p in params if id(p) not in seen]
            if len(new) == len(params):
                groups[min(following, len(groups) - 1)].append(unit)
            elif new:
                groups[min(following, len(groups) - 1)].append(nn.ParameterList(new))
            seen.update(id(p) for p in new)
            if name in index:
                following += 1
        return [nn.ModuleList(g) for g in groups]


def _units(module: nn.Module, prefix: str, levels: set[str]) -> Iterator[tuple[str, nn.Module]]:
    """The smallest pieces of `module` that stage boundaries do not cut, in registration order: a level's module,
    or a module that holds no level; a container of levels is opened, its own tensors kept as a ParameterList."""
    if prefix in levels:
        yield prefix, module  # even without tensors (an activation): it marks a boundary
        return
    if prefix and not any(level.startswith(f"{prefix}.") for level in levels):
        if any(True for _ in module.parameters()):
            yield prefix, module
        return
    own = list(module.parameters(recurse=False))
    if own:
        yield f"{prefix}:own", nn.ParameterList(own)
    for child_name, child in module.named_children():
        yield from _units(child, f"{prefix}.{child_name}" if prefix else child_name, levels)


@contextlib.contextmanager
def missing_keys_reported_by_timm() -> Iterator[list[str]]:
    """Collects the keys timm logs as missing while it loads a pretrained file; the log stays as quiet as it was.

    timm loads a feature extractor non-strictly (it drops the classifier) and reports the keys the file lacked only
    in an INFO record; a filter on its logger reads that record and passes on only what would have been shown. The
    warning about unexpected keys is dropped: they are the head the extractor has no use for (EfficientNet's
    conv_head, bn2, classifier), and a file of another model shows in missing keys or shapes instead.
    """
    logger = logging.getLogger("timm.models._builder")
    shown, level, missing = logger.getEffectiveLevel(), logger.level, []

    def collect(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        found = re.match(r"Missing keys \((.*)\) discovered", message)
        if found:
            missing.extend(found.group(1).split(", "))
        return record.levelno >= shown and not message.startswith("Unexpected keys (")

    logger.addFilter(collect)
    logger.setLevel(min(shown, logging.INFO))
    try:
        yield missing
    finally:
        logger.removeFilter(collect)
        logger.setLevel(level)


def resolve_weights(weights: str, arch: str) -> tuple[dict | None, Path | None]:
    """Sorts a `weights` file: (a dict to load strictly into the backbone, None) or (None, a file for timm).

    A backbone checkpoint or a state dict of `body.*` keys is plugdet's; any other file (a timm model's state dict,
    a checkpoint around one, a .safetensors) is timm's. Every .pt file is read data-only here first, so that timm
    never unpickles code.
    """
    path = Path(weights)
    if not path.exists():
        hint = "timm weights load only from a local file, e.g. a timm model's state_dict or its model.safetensors"
        raise UserError(f"weights for {arch}: no such file {weights!r} ({hint}; plugdet never downloads)")
    if path.suffix == ".safetensors" and path.is_file():
        return None, path
    loaded = load_checkpoint(path)  # a folder, an empty or foreign file: one line
    if is_backbone_checkpoint(loaded) or any(str(k).startswith("body.") for k in loaded):
        return loaded, None
    return None, path


def build_timm_backbone(name: str, weights: str | None = None, **model_kwargs: Any) -> TimmBackbone:
    """Builds `timm:<name>`, optionally with weights from a local file. Never downloads.

    Args:
        name: a timm model name (`timm.list_models()`), with or without a pretrained tag ("convnext_atto.d2_in1k").
        weights: None, or a local file: a backbone checkpoint (`backbone.pt` from train_cls), or a timm model's
            state dict or checkpoint (.pth, .bin, .safetensors), the classifier included or not.
        **model_kwargs: passed to `timm.create_model` (e.g. `drop_path_rate=0.1`, `img_size=256` for a Swin).

    Returns:
        The backbone, in train mode.

    Raises:
        UserError: timm missing, unknown name, no strides 8/16/32, a reserved argument, or weights that are missing
            or do not fit.
    """
    arch = f"timm:{name}"
    timm = import_timm(arch)
    check_name(timm, name, arch)
    reserved = [k for k in RESERVED_KWARGS if k in model_kwargs]
    if reserved:
        raise UserError(f"backbone {arch}: {reserved[0]} is set by plugdet; pass weights=PATH (a local file) for "
                        "pretrained weights")  # fmt: skip
    indices = choose_levels(feature_levels(timm, name, arch, model_kwargs), arch)
    ours, timm_file = resolve_weights(weights, arch) if weights is not None else (None, None)
    pretrained = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(timm_file)}} if timm_file else {}
    try:
        with missing_keys_reported_by_timm() as missing:
            body = timm.create_model(name, features_only=True, out_indices=indices, **pretrained, **model_kwargs)
    except Exception as e:  # a file timm cannot read, or of other shapes (load_state_dict's RuntimeError)
        if not timm_file:
            raise UserError(f"backbone {arch} cannot be built by timm: {first_line(e)}") from e
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first_line(e))
        raise UserError(f"weights {timm_file} do not fit {arch}: {detail}") from e
    backbone = TimmBackbone(name, body)
    if timm_file:
        keys = set(body.state_dict())
        used = [key for key in missing if body_name(key, keys) is not None]
        if used:
            raise UserError(f"weights {timm_file} do not fit {arch}: {len(used)} of its {len(keys)} tensors are "
                            f"missing from the file, e.g. {used[0]!r}")  # fmt: skip
    if ours is not None:
        load_backbone_weights(backbone, ours, arch=arch, source_name=str(weights))
    return backbone


@register_backbone_family("timm:")
def _resolve_timm(name: str, **kwargs: Any) -> TimmBackbone:
    """Resolves any `timm:<name>`."""
    return build_timm_backbone(name, **kwargs)
