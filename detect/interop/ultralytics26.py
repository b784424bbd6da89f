"""Ultralytics YOLO26 detection weights <-> plugdet names (`csp26_<scale>` + `yolo26` neck + `yolo26` head).

YOLO26's layers sit at YOLO11's indices (0-10 backbone, 11-22 neck, 23 head) and share its block names, so the map
is YOLO11's (`detect.interop.ultralytics11`: explicit, layer by layer and child by child, a key with no counterpart
a KeyError naming it) with what YOLO26 changes:

- every neck C3k2 holds C3k blocks (layers 13, 16, 19), at every scale;
- the last neck merge (layer 22) is a C3k2 whose inner blocks are `Sequential(Bottleneck, PSABlock)`:
  `m.<i>.0.cv1` -> `blocks.<i>.bottleneck.conv1`, `m.<i>.1.attn.qkv` -> `blocks.<i>.psa.attention.qkv`;
- the head has no DFL bins (reg_max 1) and a one-to-one copy of both branches: `one2one_cv2` / `one2one_cv3` ->
  `one2one_box_branch` / `one2one_cls_branch`.

The SPPF's extra residual and unactivated reduction add no parameter and no name. As in YOLO11, the backbone's
layers 2 and 4 hold C3k blocks at scales m, l and x only (`uses_c3k_everywhere`).
"""

from __future__ import annotations

from collections.abc import Iterable

from detect.interop.ultralytics11 import CHILD_NAMES, YOLO11_LAYERS, Child, _rename, _reverse

HEAD_LAYER = 23
ATTENTION_LAYER = 22
# Layer index in Ultralytics' yolo26.yaml -> (our module path, kind of block): YOLO11's, with C3k in every neck merge,
# the attention C3k2 in layer 22 and the end-to-end head in layer 23.
YOLO26_LAYERS: dict[int, tuple[str, str]] = YOLO11_LAYERS | {
    13: ("neck.top_down_p4", "c3k2_c3k"),
    16: ("neck.top_down_p3", "c3k2_c3k"),
    19: ("neck.bottom_up_p4", "c3k2_c3k"),
    ATTENTION_LAYER: ("neck.bottom_up_p5", "c3k2_attn"),
    HEAD_LAYER: ("head", "detect26"),
}
CHILD_NAMES_26: dict[str, dict[str, Child]] = CHILD_NAMES | {
    "c3k2_attn": {"cv1": ("split_conv", "conv"), "cv2": ("fuse_conv", "conv"), "m": ("blocks", "list:bottleneck_psa")},
    "bottleneck_psa": {"0": ("bottleneck", "bottleneck"), "1": ("psa", "psa_block")},
    "detect26": {
        "cv2": ("box_branch", "list:box_branch"),
        "cv3": ("cls_branch", "list:cls_branch"),
        "one2one_cv2": ("one2one_box_branch", "list:box_branch"),
        "one2one_cv3": ("one2one_cls_branch", "list:cls_branch"),
    },
}
_REVERSED_26 = _reverse(CHILD_NAMES_26)


def yolo26_key_to_ours(key: str, c3k_everywhere: bool = False) -> str:
    """Map one Ultralytics YOLO26 state-dict key to the plugdet `Detector` key.

    Args:
        key: e.g. "model.22.m.0.1.attn.qkv.conv.weight".
        c3k_everywhere: the backbone's C3k2 blocks of layers 2 and 4 hold C3k blocks (Ultralytics' scales m, l, x).

    Returns:
        e.g. "neck.bottom_up_p5.blocks.0.psa.attention.qkv.conv.weight".

    Raises:
        KeyError: the key has no counterpart (not a YOLO26 detection layout).
    """
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "model" or not parts[1].isdigit() or int(parts[1]) not in YOLO26_LAYERS:
        raise KeyError(key)
    prefix, kind = YOLO26_LAYERS[int(parts[1])]
    if c3k_everywhere and kind == "c3k2":
        kind = "c3k2_c3k"
    try:
        return ".".join([prefix, *_rename(parts[2:], kind, CHILD_NAMES_26)])
    except KeyError:
        raise KeyError(key) from None


def our_key_to_yolo26(key: str) -> str:
    """Inverse of `yolo26_key_to_ours` (at either C3k setting); raises KeyError for a key of another layout."""
    for index, (prefix, kind) in YOLO26_LAYERS.items():
        if key.startswith(prefix + "."):
            try:
                tail = _rename(key[len(prefix) + 1 :].split("."), kind, _REVERSED_26)
            except KeyError:
                raise KeyError(key) from None
            return ".".join(["model", str(index), *tail])
    raise KeyError(key)


def is_yolo26_layout(keys: Iterable[str]) -> bool:
    """Whether Ultralytics state-dict keys look like YOLO26: a C2PSA attention in layer 10 and a one-to-one box branch
    in the head of layer 23 (YOLO11 has neither the one-to-one branch nor reg_max 1)."""
    keys = set(keys)
    return any(k.startswith(f"model.{HEAD_LAYER}.one2one_cv2.") for k in keys) and any(
        k.startswith("model.10.m.0.attn.") for k in keys
    )


def is_yolo26_detector_state(keys: Iterable[str]) -> bool:
    """Whether plugdet `Detector` keys are a YOLO26 head's (a one-to-one box branch)."""
    return any(key.startswith("head.one2one_box_branch.") for key in keys)
