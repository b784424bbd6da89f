"""Tests for the YOLO11 backbone (backbones/csp11.py), its blocks, its neck (detect/models/necks/pan11.py) and the
YOLO11 key map (detect/interop/ultralytics11.py): exact parameter counts and numerical parity with Ultralytics."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from helpers import randomize_bn
from torch import nn

from backbones import build_backbone
from backbones.csp11 import CSP11_SCALES, build_csp11
from backbones.errors import UserError
from backbones.freeze import freeze_stages
from backbones.layers import C2PSA, Bottleneck, C3k, C3k2, PSABlock
from detect.interop.ultralytics11 import (
    our_key_to_yolo11,
    uses_c3k_everywhere,
    yolo11_key_to_ours,
)
from detect.models.necks.pan11 import PAN11, build_yolo11_neck

SCALES = list(CSP11_SCALES)
# Ultralytics yolo11{n,s,m,l,x}.yaml with 80 classes, counted from their models: layers 0-10 (the backbone) and
# layers 11-22 (the neck; its Upsample and Concat layers have no parameters).
ULTRALYTICS_BACKBONE_PARAMS = {"n": 1_365_472, "s": 5_441_984, "m": 10_352_192, "l": 12_833_600, "x": 28_847_328}
ULTRALYTICS_NECK_PARAMS = {"n": 793_696, "s": 3_166_400, "m": 8_289_792, "l": 11_065_856, "x": 24_880_896}
# Our neck's outputs are Ultralytics' layers 16, 19, 22; the backbone's are layers 4, 6, 10.
BACKBONE_OUTPUTS = (4, 6, 10)
NECK_OUTPUTS = (16, 19, 22)
EXACT = {"rtol": 0.0, "atol": 0.0}  # same operations in the same order: bit-identical on the CPU


def _tasks() -> Any:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    return pytest.importorskip("ultralytics.nn.tasks")


def _ultralytics_layers(scale: str, meta: bool = False) -> nn.Sequential:
    """Ultralytics' yolo11{scale} layers (80 classes), built as DetectionModel builds them minus its init passes.

    Off the meta device the BatchNorm settings are Ultralytics' (eps 1e-3, momentum 0.03) and every BatchNorm gets
    random statistics and affine parameters, so that every tensor matters in a comparison.
    """
    tasks = _tasks()
    spec = copy.deepcopy(tasks.yaml_model_load(f"yolo11{scale}.yaml"))
    spec["nc"] = 80
    if meta:
        with torch.device("meta"):
            return tasks.parse_model(spec, ch=3, verbose=False)[0]
    torch.manual_seed(0)
    layers = tasks.parse_model(spec, ch=3, verbose=False)[0]
    _randomise_batchnorm(layers)
    return layers.eval()


def _randomise_batchnorm(module: nn.Module, seed: int = 1) -> None:
    """Ultralytics' BatchNorm settings (its initialize_weights) with random statistics and affine parameters."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps, bn.momentum = 1e-3, 0.03
    randomize_bn(module, seed)


def _layer_outputs(layers: nn.Sequential, x: torch.Tensor, keep: Sequence[int]) -> list[torch.Tensor]:
    """Run Ultralytics' layers up to max(keep), wiring inputs by each layer's `f`; returns the outputs in `keep`."""
    outputs: list[torch.Tensor] = []
    for layer in layers[: max(keep) + 1]:
        if layer.f != -1:
            x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
        x = layer(x)
        outputs.append(x)
    return [outputs[i] for i in keep]


def _load_from_layers(module: nn.Module, prefix: str, theirs: dict[str, torch.Tensor], c3k: bool) -> None:
    """Load `theirs` (Ultralytics keys) into `module`, the part of our detector under `prefix` ("backbone.")."""
    mapped = {yolo11_key_to_ours(k, c3k): v for k, v in theirs.items()}
    ours = {k[len(prefix) :]: v for k, v in mapped.items() if k.startswith(prefix)}
    module.load_state_dict(ours, strict=True)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- structure and counts ----


@pytest.mark.parametrize("scale", SCALES)
def test_parameter_counts_equal_ultralytics(scale: str) -> None:
    with torch.device("meta"):
        backbone = build_csp11(scale)
        neck = build_yolo11_neck(backbone.out_channels, backbone.strides, scale)
    assert _param_count(backbone) == ULTRALYTICS_BACKBONE_PARAMS[scale]
    assert _param_count(neck) == ULTRALYTICS_NECK_PARAMS[scale]
    theirs = _ultralytics_layers(scale, meta=True)
    assert _param_count(theirs[:11]) == ULTRALYTICS_BACKBONE_PARAMS[scale]
    assert _param_count(theirs[11:23]) == ULTRALYTICS_NECK_PARAMS[scale]


def test_structure_names_and_outputs() -> None:
    model = build_csp11("n")
    assert [name for name, _ in model.named_children()] == ["stem", "stages"]
    assert [list(dict(stage.named_children())) for stage in model.stages] == [
        ["downsample", "c3k2"],
        ["downsample", "c3k2"],
        ["downsample", "c3k2"],
        ["downsample", "c3k2", "sppf", "c2psa"],
    ]
    assert model.out_channels == (128, 128, 256)
    assert model.strides == (8, 16, 32)
    stages = model.stage_modules()
    assert len(stages) == 5 and stages[0] is model.stem
    assert sum(_param_count(s) for s in stages) == _param_count(model)
    assert freeze_stages(model, 2) == len(list(stages[0].parameters())) + len(list(stages[1].parameters()))
    outputs = model(torch.zeros(1, 3, 100, 132))  # ceil(100/8)=13, ceil(132/8)=17
    assert [tuple(o.shape) for o in outputs] == [(1, 128, 13, 17), (1, 128, 7, 9), (1, 256, 4, 5)]
    assert isinstance(build_backbone("csp11_s"), type(model))


@pytest.mark.parametrize(("scale", "c3k_everywhere"), [("n", False), ("s", False), ("m", True), ("x", True)])
def test_c3k_where_ultralytics_puts_it(scale: str, c3k_everywhere: bool) -> None:
    """yolo11.yaml: C3k in layers 6, 8 and 22; Ultralytics' parse_model: in every C3k2 at m, l, x."""
    with torch.device("meta"):
        backbone = build_csp11(scale)
        neck = build_yolo11_neck(backbone.out_channels, backbone.strides, scale)
    stage_kinds = [type(stage.c3k2.blocks[0]) for stage in backbone.stages]
    neck_kinds = [type(c.blocks[0]) for c in (neck.top_down_p4, neck.top_down_p3, neck.bottom_up_p4, neck.bottom_up_p5)]
    inner = C3k if c3k_everywhere else Bottleneck
    assert stage_kinds == [inner, inner, C3k, C3k]
    assert neck_kinds == [inner, inner, inner, C3k]
    theirs = _ultralytics_layers(scale, meta=True)
    assert [type(theirs[i].m[0]).__name__ for i in (2, 4, 6, 8, 13, 16, 19, 22)] == [
        "C3k" if kind is C3k else "Bottleneck" for kind in stage_kinds + neck_kinds
    ]
    assert uses_c3k_everywhere(f"model.{k}" for k in theirs.state_dict()) is c3k_everywhere


def test_neck_on_another_backbone() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("cspdarknet_n").eval()
    neck = build_yolo11_neck(backbone.out_channels, backbone.strides, "s").eval()
    assert isinstance(neck, PAN11)
    assert neck.in_channels == backbone.out_channels and neck.strides == (8, 16, 32)
    assert neck.out_channels == (128, 256, 512)
    with torch.no_grad():
        outputs = neck(backbone(torch.rand(1, 3, 64, 96)))
    assert [tuple(o.shape) for o in outputs] == [(1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]


def test_bad_arguments() -> None:
    with pytest.raises(UserError, match="unknown YOLO11 backbone scale 'q'"):
        build_csp11("q")
    with pytest.raises(UserError, match="unknown YOLO11 neck scale 'q'"):
        build_yolo11_neck((64, 128, 256), (8, 16, 32), "q")
    with pytest.raises(UserError, match="twice the stride"):
        build_yolo11_neck((64, 128, 256), (8, 16, 64), "n")
    with pytest.raises(ValueError, match="keeps the width"):
        C2PSA(64, 128)


# ---- numerical parity with Ultralytics ----


def _ultralytics_block(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    block_module = pytest.importorskip("ultralytics.nn.modules.block")
    torch.manual_seed(0)
    block = getattr(block_module, name)(*args, **kwargs)
    _randomise_batchnorm(block)
    return block.eval()


@pytest.mark.parametrize(
    ("ours", "theirs", "layer", "prefix"),
    [
        (lambda: C3k2(48, 64, 2, False, 0.25), ("C3k2", 48, 64, 2, False, 0.25), 2, "backbone.stages.0.c3k2."),
        (lambda: C3k2(48, 64, 2, True), ("C3k2", 48, 64, 2, True), 6, "backbone.stages.2.c3k2."),
        (lambda: C2PSA(256, 256, 2), ("C2PSA", 256, 256, 2), 10, "backbone.stages.3.c2psa."),
    ],
    ids=["c3k2", "c3k2-c3k", "c2psa"],
)
@torch.no_grad()
def test_blocks_equal_ultralytics(ours: Any, theirs: tuple, layer: int, prefix: str) -> None:
    """C3k2 (both inner kinds) and C2PSA (two PSA blocks, two heads) after copying weights by the key map."""
    reference = _ultralytics_block(*theirs)
    block = ours().eval()
    state = {f"model.{layer}.{k}": v for k, v in reference.state_dict().items()}
    _load_from_layers(block, prefix, state, c3k=False)
    x = torch.randn(2, block.split_conv.conv.in_channels, 6, 10, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(block(x), reference(x), **EXACT)


@pytest.mark.parametrize(
    ("ours", "theirs", "prefixes", "channels"),
    [
        (lambda: C3k(32, 32, 2), ("C3k", 32, 32, 2), ("model.6.m.0.", "backbone.stages.2.c3k2.blocks.0."), 32),
        (
            lambda: PSABlock(128, 0.5, 2),
            ("PSABlock", 128, 0.5, 2),
            ("model.10.m.0.", "backbone.stages.3.c2psa.blocks.0."),
            128,
        ),
    ],
    ids=["c3k", "psa-block"],
)
@torch.no_grad()
def test_inner_blocks_equal_ultralytics(ours: Any, theirs: tuple, prefixes: tuple[str, str], channels: int) -> None:
    """C3k and the PSA block on their own (they are `m.0` of layers 6 and 10)."""
    reference = _ultralytics_block(*theirs)
    block = ours().eval()
    state = {prefixes[0] + k: v for k, v in reference.state_dict().items()}
    _load_from_layers(block, prefixes[1], state, c3k=False)
    x = torch.randn(1, channels, 5, 7, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(block(x), reference(x), **EXACT)


@pytest.mark.parametrize(
    "scale", ["n", "s", "m", pytest.param("l", marks=pytest.mark.slow), pytest.param("x", marks=pytest.mark.slow)]
)
@torch.no_grad()
def test_backbone_and_neck_outputs_equal_ultralytics(scale: str) -> None:
    """Weights copied by the key map: our C3/C4/C5 equal layers 4, 6, 10 and our P3/P4/P5 layers 16, 19, 22."""
    layers = _ultralytics_layers(scale)
    theirs = {f"model.{k}": v for k, v in layers.state_dict().items() if int(k.split(".")[0]) < 23}
    c3k = uses_c3k_everywhere(theirs)
    backbone = build_csp11(scale).eval()
    neck = build_yolo11_neck(backbone.out_channels, backbone.strides, scale).eval()
    _load_from_layers(backbone, "backbone.", theirs, c3k)
    _load_from_layers(neck, "neck.", theirs, c3k)
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))  # non-square
    expected = _layer_outputs(layers, x, BACKBONE_OUTPUTS + NECK_OUTPUTS)
    features = backbone(x)
    for out, ref in zip(features + neck(features), expected, strict=True):
        torch.testing.assert_close(out, ref, **EXACT)


# ---- key map ----


KEY_EXAMPLES = [  # (Ultralytics key, c3k_everywhere, ours)
    ("model.0.conv.weight", False, "backbone.stem.conv.weight"),
    ("model.2.m.0.cv1.conv.weight", False, "backbone.stages.0.c3k2.blocks.0.conv1.conv.weight"),
    ("model.2.m.0.cv1.conv.weight", True, "backbone.stages.0.c3k2.blocks.0.main_conv.conv.weight"),
    ("model.8.m.0.m.1.cv2.bn.running_var", False, "backbone.stages.3.c3k2.blocks.0.blocks.1.conv2.bn.running_var"),
    ("model.9.cv1.bn.bias", False, "backbone.stages.3.sppf.reduce_conv.bn.bias"),
    ("model.10.m.1.attn.pe.conv.weight", False, "backbone.stages.3.c2psa.blocks.1.attention.positional.conv.weight"),
    ("model.10.m.0.ffn.1.bn.weight", False, "backbone.stages.3.c2psa.blocks.0.ffn.project.bn.weight"),
    ("model.22.m.0.cv3.conv.weight", False, "neck.bottom_up_p5.blocks.0.fuse_conv.conv.weight"),
    ("model.20.bn.num_batches_tracked", False, "neck.downsample_p4.bn.num_batches_tracked"),
    ("model.23.cv2.1.2.bias", False, "head.box_branch.1.pred.bias"),
    ("model.23.cv3.0.0.0.conv.weight", False, "head.cls_branch.0.depthwise1.conv.weight"),
    ("model.23.cv3.2.1.1.bn.bias", False, "head.cls_branch.2.pointwise2.bn.bias"),
    ("model.23.cv3.1.2.weight", False, "head.cls_branch.1.pred.weight"),
    ("model.23.dfl.conv.weight", False, "head.dfl_bins"),
]


def test_key_map_examples() -> None:
    for theirs, c3k, ours in KEY_EXAMPLES:
        assert yolo11_key_to_ours(theirs, c3k) == ours
        assert our_key_to_yolo11(ours) == theirs
    for bad in ("model.11.weight", "model.2.m.0.cv3.conv.weight", "model.23.cv3.0.0.2.conv.weight", "model.24.a.b"):
        with pytest.raises(KeyError):
            yolo11_key_to_ours(bad)
    for bad in ("head.cls_branch.0.conv1.conv.weight", "neck.top_down_p4.blocks.0.cv1.conv.weight", "other.x"):
        with pytest.raises(KeyError):
            our_key_to_yolo11(bad)


@pytest.mark.parametrize("scale", ["n", "m"])
def test_key_map_is_a_bijection(scale: str) -> None:
    """Every key of Ultralytics' yolo11{scale} maps to one of ours (backbone and neck: exactly our modules' keys)."""
    theirs = {f"model.{k}" for k in _ultralytics_layers(scale, meta=True).state_dict()}
    c3k = uses_c3k_everywhere(theirs)
    mapped = {yolo11_key_to_ours(k, c3k) for k in theirs}
    assert len(mapped) == len(theirs)
    assert all(our_key_to_yolo11(yolo11_key_to_ours(k, c3k)) == k for k in theirs)
    with torch.device("meta"):
        backbone = build_csp11(scale)
        neck = build_yolo11_neck(backbone.out_channels, backbone.strides, scale)
    ours = {f"backbone.{k}" for k in backbone.state_dict()} | {f"neck.{k}" for k in neck.state_dict()}
    assert {k for k in mapped if not k.startswith("head.")} == ours


def test_a_pretrained_csp11_backbone_transfers_into_the_yolo11_detector(tmp_path) -> None:
    """What train_cls writes for csp11_n (`save_backbone`) loads strictly into a YOLO11 detector's backbone."""
    from backbones.checkpoint import save_backbone
    from backbones.registry import build_backbone
    from detect.models import build_yolo

    backbone = build_backbone("csp11_n")
    path = tmp_path / "backbone.pt"
    save_backbone(path, backbone, "csp11_n")
    detector = build_yolo("n", 3, family="yolo11", backbone_weights=path)
    for key, value in backbone.state_dict().items():
        assert torch.equal(detector.backbone.state_dict()[key], value)
