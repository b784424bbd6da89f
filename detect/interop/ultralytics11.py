"""Ultralytics YOLO11 detection weights <-> plugdet names (`csp11_<scale>` + `yolo11` neck + `yolo11` head).

As for YOLOv8 (`detect.interop.ultralytics`, whose block names the two share), the names are mapped explicitly, layer
by layer (`YOLO11_LAYERS`) and child by child (`CHILD_NAMES`), never by position: a key with no counterpart is a
KeyError naming it.

One name of theirs depends on the scale: a C3k2's inner block `m.<i>` is a Bottleneck (`cv1`, `cv2` -> our `conv1`,
`conv2`) or a C3k (`cv1`, `cv2`, `cv3`, `m` -> our `main_conv`, `skip_conv`, `fuse_conv`, `blocks`). yolo11.yaml
asks for C3k in layers 6, 8 and 22 only, and Ultralytics' `parse_model` uses C3k in every C3k2 at scales m, l and x,
so `yolo11_key_to_ours` takes `c3k_everywhere` (see `uses_c3k_everywhere`). Our names are distinct for the two
kinds, so the inverse needs no flag.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

# Layer index in Ultralytics' yolo11.yaml -> (our module path, kind of block), with the C3k flags the yaml writes.
# Indices 11, 12, 14, 15, 18, 21 are Upsample/Concat (no parameters).
YOLO11_LAYERS: dict[int, tuple[str, str]] = {
    0: ("backbone.stem", "conv"),
    1: ("backbone.stages.0.downsample", "conv"),
    2: ("backbone.stages.0.c3k2", "c3k2"),
    3: ("backbone.stages.1.downsample", "conv"),
    4: ("backbone.stages.1.c3k2", "c3k2"),
    5: ("backbone.stages.2.downsample", "conv"),
    6: ("backbone.stages.2.c3k2", "c3k2_c3k"),
    7: ("backbone.stages.3.downsample", "conv"),
    8: ("backbone.stages.3.c3k2", "c3k2_c3k"),
    9: ("backbone.stages.3.sppf", "sppf"),
    10: ("backbone.stages.3.c2psa", "c2psa"),
    13: ("neck.top_down_p4", "c3k2"),
    16: ("neck.top_down_p3", "c3k2"),
    17: ("neck.downsample_p3", "conv"),
    19: ("neck.bottom_up_p4", "c3k2"),
    20: ("neck.downsample_p4", "conv"),
    22: ("neck.bottom_up_p5", "c3k2_c3k"),
    23: ("head", "detect"),
}
HEAD_LAYER = 23

# Their child name -> (our child name, kind of the child), per kind of block. Kinds "conv" (a ConvBNAct: `conv`,
# `bn`, the same names on both sides) and "conv2d" (a plain nn.Conv2d: `weight`, `bias`) end the walk; "list:<kind>"
# is an indexed container (`m.<i>`, `cv2.<level>`) whose indices are kept. A name may span two parts of theirs
# ("0.1"): Ultralytics nests the class branch one level deeper than we do.
Child = tuple[str, str]


def _convs(names: Mapping[str, str]) -> dict[str, Child]:
    """{their name: (our name, "conv")} for a table of ConvBNAct children."""
    return {theirs: (ours, "conv") for theirs, ours in names.items()}


CHILD_NAMES: dict[str, dict[str, Child]] = {
    "c3k2": {"cv1": ("split_conv", "conv"), "cv2": ("fuse_conv", "conv"), "m": ("blocks", "list:bottleneck")},
    "c3k2_c3k": {"cv1": ("split_conv", "conv"), "cv2": ("fuse_conv", "conv"), "m": ("blocks", "list:c3k")},
    "c3k": {
        "cv1": ("main_conv", "conv"),
        "cv2": ("skip_conv", "conv"),
        "cv3": ("fuse_conv", "conv"),
        "m": ("blocks", "list:bottleneck"),
    },
    "bottleneck": _convs({"cv1": "conv1", "cv2": "conv2"}),  # as in YOLOv8 (detect.interop.ultralytics)
    "sppf": _convs({"cv1": "reduce_conv", "cv2": "fuse_conv"}),
    "c2psa": {"cv1": ("split_conv", "conv"), "cv2": ("fuse_conv", "conv"), "m": ("blocks", "list:psa_block")},
    "psa_block": {"attn": ("attention", "attention"), "ffn": ("ffn", "ffn")},
    "attention": _convs({"qkv": "qkv", "proj": "out_proj", "pe": "positional"}),
    "ffn": _convs({"0": "expand", "1": "project"}),
    "detect": {"cv2": ("box_branch", "list:box_branch"), "cv3": ("cls_branch", "list:cls_branch")},
    "box_branch": {"0": ("conv1", "conv"), "1": ("conv2", "conv"), "2": ("pred", "conv2d")},  # YOLOv8's branch
    "cls_branch": {  # depthwise-separable: cv3.<level>.<0|1>.<0 DWConv | 1 Conv 1x1>, then cv3.<level>.2 Conv2d
        "0.0": ("depthwise1", "conv"),
        "0.1": ("pointwise1", "conv"),
        "1.0": ("depthwise2", "conv"),
        "1.1": ("pointwise2", "conv"),
        "2": ("pred", "conv2d"),
    },
}
# (stem width, inner blocks per C3k2) -> scale. m and l share the stem width (64); l has two blocks per C3k2.
SCALE_BY_STEM_AND_DEPTH = {(16, 1): "n", (32, 1): "s", (64, 1): "m", (64, 2): "l", (96, 2): "x"}
DFL_KEYS = (f"model.{HEAD_LAYER}.dfl.conv.weight", "head.dfl_bins")  # the frozen DFL bins: [1, R, 1, 1] / [R]
_LEAF_NAMES = {"conv": {"conv", "bn"}, "conv2d": {"weight", "bias"}}


def _reverse(tables: Mapping[str, Mapping[str, Child]]) -> dict[str, dict[str, Child]]:
    """{kind: {our name: (their name, kind)}}; a C3k2's blocks accept either inner kind (our names differ)."""
    reversed_tables = {
        kind: {ours: (theirs, child) for theirs, (ours, child) in table.items()} for kind, table in tables.items()
    }
    reversed_tables["c3k2_inner"] = reversed_tables["bottleneck"] | reversed_tables["c3k"]
    for kind in ("c3k2", "c3k2_c3k"):
        reversed_tables[kind] = reversed_tables[kind] | {"blocks": ("m", "list:c3k2_inner")}
    return reversed_tables


_REVERSED = _reverse(CHILD_NAMES)


def _rename(parts: list[str], kind: str, tables: Mapping[str, Mapping[str, Child]]) -> list[str]:
    """Rename the parts of a key below a block of `kind`; raises KeyError for a name with no counterpart."""
    if kind in _LEAF_NAMES:
        if not parts or parts[0] not in _LEAF_NAMES[kind] or len(parts) > 2:
            raise KeyError(".".join(parts))
        return parts
    if kind.startswith("list:"):
        if len(parts) < 2 or not parts[0].isdigit():
            raise KeyError(".".join(parts))
        return [parts[0], *_rename(parts[1:], kind.removeprefix("list:"), tables)]
    table = tables[kind]
    for width in (2, 1):  # a two-part name first ("0.1" in the class branch)
        name = ".".join(parts[:width])
        if len(parts) > width and name in table:
            new_name, child_kind = table[name]
            return [*new_name.split("."), *_rename(parts[width:], child_kind, tables)]
    raise KeyError(".".join(parts))


def yolo11_key_to_ours(key: str, c3k_everywhere: bool = False) -> str:
    """Map one Ultralytics YOLO11 state-dict key to the plugdet `Detector` key.

    Args:
        key: e.g. "model.10.m.0.attn.qkv.conv.weight".
        c3k_everywhere: the model's C3k2 blocks all hold C3k blocks (Ultralytics' scales m, l, x); False follows
            yolo11.yaml (scales n, s).

    Returns:
        e.g. "backbone.stages.3.c2psa.blocks.0.attention.qkv.conv.weight".

    Raises:
        KeyError: the key has no counterpart (not a YOLO11 detection layout).
    """
    if key == DFL_KEYS[0]:
        return DFL_KEYS[1]
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "model" or not parts[1].isdigit() or int(parts[1]) not in YOLO11_LAYERS:
        raise KeyError(key)
    prefix, kind = YOLO11_LAYERS[int(parts[1])]
    if c3k_everywhere and kind == "c3k2":
        kind = "c3k2_c3k"
    try:
        return ".".join([prefix, *_rename(parts[2:], kind, CHILD_NAMES)])
    except KeyError:
        raise KeyError(key) from None


def our_key_to_yolo11(key: str) -> str:
    """Inverse of `yolo11_key_to_ours` (at either C3k setting); raises KeyError for a key of another layout."""
    if key == DFL_KEYS[1]:
        return DFL_KEYS[0]
    for index, (prefix, kind) in YOLO11_LAYERS.items():
        if key.startswith(prefix + "."):
            try:
                tail = _rename(key[len(prefix) + 1 :].split("."), kind, _REVERSED)
            except KeyError:
                raise KeyError(key) from None
            return ".".join(["model", str(index), *tail])
    raise KeyError(key)


def uses_c3k_everywhere(keys: Iterable[str]) -> bool:
    """Whether an Ultralytics YOLO11 state dict has C3k blocks in layer 2 (scales m, l, x), from its keys alone."""
    return any(key.startswith("model.2.m.0.cv3.") for key in keys)


def is_yolo11_layout(keys: Iterable[str]) -> bool:
    """Whether Ultralytics state-dict keys look like YOLO11 (a C2PSA attention in layer 10, the head in layer 23)."""
    keys = set(keys)
    return DFL_KEYS[0] in keys and any(key.startswith("model.10.m.0.attn.") for key in keys)


def yolo11_scale(state: Mapping[str, torch.Tensor]) -> str | None:
    """The yolo11.yaml scale of an Ultralytics YOLO11 state dict (from its stem width and the blocks of layer 2), or
    None for a stem or depth of no scale."""
    stem = state.get("model.0.conv.weight")
    if stem is None:
        return None
    blocks = 2 if any(key.startswith("model.2.m.1.") for key in state) else 1
    return SCALE_BY_STEM_AND_DEPTH.get((int(stem.shape[0]), blocks))
