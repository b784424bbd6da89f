"""Tests for backbones/timm_any.py: the backbone contract over timm families, stages, local weights (never
downloaded), fusing BatchNormAct2d, and a tiny train_cls -> train_det run on a timm backbone."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_tool, randomize_bn
from torch import nn

timm = pytest.importorskip("timm")  # the optional extra `.[timm]` (in `dev`)

from backbones import build_backbone  # noqa: E402
from backbones.checkpoint import load_checkpoint, save_backbone  # noqa: E402
from backbones.errors import UserError  # noqa: E402
from backbones.freeze import freeze_stages  # noqa: E402
from detect.cli import run_tool  # noqa: E402
from detect.models.build import build_detector  # noqa: E402
from detect.models.yolo_family import yolo_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name -> (the modules of timm's levels at strides 8, 16, 32 (timm's names), channels); mambaout returns NHWC.
FAMILIES = {
    "resnet18d": (("layer2", "layer3", "layer4"), (128, 256, 512)),
    "convnext_atto": (("stages.1", "stages.2", "stages.3"), (80, 160, 320)),
    "efficientnet_b0": (("blocks.2", "blocks.4", "blocks.6"), (40, 112, 320)),
    "mobilenetv3_small_100": (("blocks.1", "blocks.3", "blocks.5"), (24, 48, 576)),
    "regnetx_002": (("s2", "s3", "s4"), (56, 152, 368)),
    "mambaout_femto": (("stages.1", "stages.2", "stages.3"), (96, 192, 288)),
}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way timm fetches weights raises: a test that reaches one fails instead of downloading."""
    import timm.models._builder as builder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"timm tried to download weights: {args}")

    for fetch in ("load_state_dict_from_url", "load_state_dict_from_hf", "load_custom_from_hf", "download_cached_file"):
        monkeypatch.setattr(builder, fetch, refuse)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_backbone_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(f"timm:{name}").eval()
    modules, channels = FAMILIES[name]
    assert tuple(model.body.feature_info.module_name()) == modules
    assert model.out_channels == channels and model.strides == (8, 16, 32)
    assert model.channels_last == (name == "mambaout_femto")
    for batch, h, w in [(2, 64, 96), (1, 100, 132)]:  # non-square; then sides that are not multiples of 32
        with torch.no_grad():
            maps = model(torch.rand(batch, 3, h, w))
        assert [m.shape[1] for m in maps] == list(channels)
        assert [tuple(m.shape[2:]) for m in maps] == [(math.ceil(h / s), math.ceil(w / s)) for s in (8, 16, 32)]
        assert all(m.shape[0] == batch and torch.isfinite(m).all() for m in maps)
    stages = model.stage_modules()
    assert len(stages) == len(model.body.feature_info.info[: model.body.feature_info.out_indices[-1] + 1])
    in_stages = [id(p) for s in stages for p in s.parameters()]
    assert len(in_stages) == len(set(in_stages)), "a parameter appears in two stages"
    assert set(in_stages) == {id(p) for p in model.parameters()}


def test_maps_are_timms_own_at_multiples_of_32() -> None:
    """Nothing is resized or reordered where the sides are multiples of 32; NHWC maps are only permuted."""
    torch.manual_seed(0)
    for name in ("convnext_atto", "mambaout_femto"):
        model = build_backbone(f"timm:{name}").eval()
        x = torch.rand(1, 3, 64, 128)
        with torch.no_grad():
            raw, maps = model.body(x), model(x)
        for own, ours in zip(raw, maps, strict=True):
            assert torch.equal(ours, own.permute(0, 3, 1, 2) if model.channels_last else own)


def test_stages_follow_timms_levels_and_freeze() -> None:
    model = build_backbone("timm:resnet18d")
    body = model.body
    stages = model.stage_modules()
    assert [list(s) for s in stages[1:]] == [[body.layer1], [body.layer2], [body.layer3], [body.layer4]]
    assert list(stages[0]) == [body.conv1, body.bn1, body.act1]  # the stem, up to timm's stride-2 level (act1)
    effnet = build_backbone("timm:efficientnet_b0")
    blocks = effnet.stage_modules()
    assert [len(s) for s in blocks] == [3, 1, 1, 2, 2]  # blocks.3 leads up to the stride-16 level, blocks.4
    assert list(blocks[0]) == [effnet.body.conv_stem, effnet.body.bn1, effnet.body.blocks[0]]
    frozen = freeze_stages(model, 2)
    assert frozen == len(list(stages[0].parameters())) + len(list(stages[1].parameters()))
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())


def test_a_module_shared_by_two_stages_is_in_the_first() -> None:
    """CoaT registers its positional convolutions beside the blocks that also hold them: one stage each tensor."""
    model = build_backbone("timm:coat_lite_tiny")
    stages = model.stage_modules()
    assert len(stages) == 4
    in_stages = [id(p) for s in stages for p in s.parameters()]
    assert len(in_stages) == len(set(in_stages)) and set(in_stages) == {id(p) for p in model.parameters()}


def test_models_that_cannot_serve() -> None:
    with pytest.raises(UserError, match=r"^backbone timm:vit_tiny_patch16_224 cannot give .* 8, 16 and 32: .*16$"):
        build_backbone("timm:vit_tiny_patch16_224")
    with pytest.raises(UserError, match=r"unknown backbone 'timm:resnt18d': not a timm model \(close names: resnet18d"):
        build_backbone("timm:resnt18d")
    with pytest.raises(UserError, match=r"timm.list_models\('\*pattern\*'\)"):
        build_backbone("timm:hf-hub:timm/resnet18.a1_in1k")  # a hub name would download its config
    with pytest.raises(UserError, match="pretrained is set by plugdet; pass weights=PATH"):
        build_backbone("timm:resnet18d", pretrained=True)


@pytest.mark.subprocess
def test_importing_needs_no_timm_and_building_says_how_to_install() -> None:
    script = (
        "import sys\n"
        "import backbones\n"
        "assert 'timm' not in sys.modules, 'importing backbones imported timm'\n"
        "sys.modules['timm'] = None  # as if the extra were not installed\n"
        "from backbones.errors import UserError\n"
        "try:\n"
        "    backbones.build_backbone('timm:resnet18d')\n"
        "except UserError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "backbone timm:resnet18d needs timm, an optional extra: pip install -e '.[timm]'\n"


@pytest.mark.parametrize("name", ["resnet18d", "mobilenetv3_small_100"])
def test_weights_from_a_timm_state_dict(name: str, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A timm classifier's state dict (head included) loads through timm's pretrained-file path, and every backbone
    tensor equals the classifier's (under timm's name: FeatureListNet writes `stages.0` as `stages_0`)."""
    torch.manual_seed(0)
    full = timm.create_model(name)  # random init: another draw than the backbone's own
    path = tmp_path / f"{name}.pth"
    torch.save(full.state_dict(), path)
    model = build_backbone(f"timm:{name}", weights=str(path))
    source = full.state_dict()
    for key, value in model.state_dict().items():
        key = key.removeprefix("body.")
        assert torch.equal(value, source[key if key in source else key.replace("_", ".", 1)]), key
    assert "Unexpected keys" not in capfd.readouterr().err  # the dropped head is not worth a warning


def test_weights_that_are_missing_or_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"weights for timm:resnet18d: no such file '.*nothing.pth' .* never downloads"):
        build_backbone("timm:resnet18d", weights=str(tmp_path / "nothing.pth"))
    other = tmp_path / "mobilenet.pth"
    torch.save(timm.create_model("mobilenetv3_small_100").state_dict(), other)
    with pytest.raises(UserError, match=r"do not fit timm:efficientnet_b0: size mismatch for conv_stem.weight"):
        build_backbone("timm:efficientnet_b0", weights=str(other))
    partial = tmp_path / "partial.pth"
    state = timm.create_model("resnet18d").state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(UserError, match=r"do not fit timm:resnet18d: 25 of its 132 tensors are missing from the file, "
                                        r"e.g. 'layer4.0.conv1.weight'"):  # fmt: skip
        build_backbone("timm:resnet18d", weights=str(partial))


def test_weights_from_a_backbone_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_backbone("timm:regnetx_002")
    path = tmp_path / "backbone.pt"
    save_backbone(path, model, "timm:regnetx_002")
    again = build_backbone("timm:regnetx_002", weights=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with pytest.raises(UserError, match="is a 'timm:regnetx_002' backbone, cannot load it into 'timm:resnet18d'"):
        build_backbone("timm:resnet18d", weights=str(path))


@pytest.mark.parametrize("name", ["regnetx_002", "resnet18d", "efficientnet_b0"])
def test_detector_trains_evaluates_and_fuses(name: str) -> None:
    """regnetx_002's ConvNormAct pairs `conv` with a BatchNormAct2d, whose ReLU must survive the folding;
    efficientnet_b0's BatchNormAct2d follow `conv_dw` / `conv_pw` and stay unfolded."""
    torch.manual_seed(0)
    model = build_detector(yolo_spec("n", num_classes=3, backbone=f"timm:{name}"))
    images = torch.rand(2, 3, 64, 96)
    raw = model(images)
    assert isinstance(raw, list | tuple) and all(torch.isfinite(r).all() for r in raw)
    with torch.no_grad():
        randomize_bn(model)  # statistics far from the identity, so that a folding mistake shows
        model.eval()
        reference = model(images)
        bn_act = [m for m in model.backbone.modules() if type(m).__name__ == "BatchNormAct2d"]
        out = model.fuse()(images)
    assert reference.shape == (2, 8 * 12 + 4 * 6 + 2 * 3, 4 + 3)
    torch.testing.assert_close(out, reference, atol=1e-3, rtol=1e-4)
    left = [m for m in model.backbone.modules() if type(m).__name__ == "BatchNormAct2d"]
    if name == "regnetx_002":
        assert bn_act and not left  # every one followed a conv, and was folded
        assert isinstance(model.backbone.body.stem.bn, nn.ReLU)  # its activation stays in its place
    elif name == "efficientnet_b0":
        assert len(left) == len(bn_act) > 0


@pytest.mark.train
def test_train_cls_then_train_det_on_a_timm_backbone(
    synth_cub_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CUB pretraining writes a `timm:` backbone.pt whose every tensor loads strictly into the detector's backbone."""
    root, backbone = str(synth_cub_root), "timm:mobilenetv3_small_100"
    cls = tmp_path / "cls"
    cls_argv = [f"data.root={root}", f"model.backbone={backbone}", "data.img_size=32", "data.resize_size=36",
                "train.epochs=1", "train.batch_size=8", "train.workers=0", f"output_dir={cls}"]  # fmt: skip
    assert run_tool(load_tool("train_cls").main, cls_argv) == 0
    ckpt = load_checkpoint(cls / "backbone.pt")
    assert ckpt["arch"] == backbone
    det_argv = [f"data.root={root}", f"model.backbone={backbone}", "data.img_size=64", "train.epochs=1",
                "train.batch_size=4", "train.workers=0", f"model.backbone_weights={cls / 'backbone.pt'}",
                f"output_dir={tmp_path / 'det'}"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="plugdet"):
        assert run_tool(load_tool("train_det").main, det_argv) == 0
    count = len(ckpt["state_dict"])
    assert f"backbone {backbone}: transferred {count} tensors" in caplog.text
    last = load_checkpoint(tmp_path / "det" / "last.pt")
    assert {k.removeprefix("backbone.") for k in last["model"] if k.startswith("backbone.")} == set(ckpt["state_dict"])
    assert os.path.isfile(tmp_path / "det" / "best.pt")
