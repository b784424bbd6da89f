"""Tests for backbones/resnet.py: torchvision parity, parameter count, weights from files and the torch cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from backbones.checkpoint import save_backbone
from backbones.errors import UserError
from backbones.resnet import ResNetBackbone, build_resnet


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache, and a network that fails loudly if anything tries to download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr("urllib.request.urlopen", no_download)
    assert torch.hub.get_dir() == str(tmp_path / "torch_home" / "hub")
    return tmp_path / "torch_home"


def test_resnet50_parameter_count_and_channels() -> None:
    model = build_resnet(50)
    assert sum(p.numel() for p in model.parameters()) == 23_508_032
    full = torchvision.models.resnet50(weights=None)
    assert sum(p.numel() for p in full.parameters()) - full.fc.weight.numel() - full.fc.bias.numel() == 23_508_032
    assert model.out_channels == (512, 1024, 2048)
    assert build_resnet(18).out_channels == (128, 256, 512)
    # v1.5: the stride sits on the 3x3 conv of the first block of layer2.
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)


def test_outputs_equal_torchvision_layers() -> None:
    torch.manual_seed(0)
    full = torchvision.models.resnet18(weights=None).eval()
    model = build_resnet(18).eval()
    model.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})
    x = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        c2 = full.layer1(full.maxpool(full.relu(full.bn1(full.conv1(x)))))
        c3 = full.layer2(c2)
        c4 = full.layer3(c3)
        c5 = full.layer4(c4)
        outputs = model(x)
    for ours, theirs in zip(outputs, (c3, c4, c5), strict=True):
        assert torch.equal(ours, theirs)
    assert [tuple(o.shape) for o in outputs] == [(2, 128, 12, 20), (2, 256, 6, 10), (2, 512, 3, 5)]


def test_stage_modules() -> None:
    model = build_resnet(18)
    stages = model.stage_modules()
    assert len(stages) == 5
    assert list(stages[0]) == [model.conv1, model.bn1]
    assert stages[1:] == [model.layer1, model.layer2, model.layer3, model.layer4]


@pytest.mark.parametrize("with_fc", [True, False])
def test_weights_from_torchvision_state_dict_file(tmp_path: Path, with_fc: bool) -> None:
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    if not with_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = build_resnet(18, weights=str(path))
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_weights_from_backbone_checkpoint(tmp_path: Path) -> None:
    source = build_resnet(18)
    torch.nn.init.constant_(source.layer3[0].conv1.weight, 0.25)
    path = tmp_path / "backbone.pt"
    save_backbone(path, source, "resnet18", {}, {"top1": 0.5}, {})
    model = build_resnet(18, weights=str(path))
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.raises(UserError, match="is a 'resnet18' backbone, cannot load it into 'resnet34'"):
        build_resnet(34, weights=str(path))


def test_weights_name_not_cached_never_downloads(empty_torch_home: Path) -> None:
    with pytest.raises(UserError) as info:
        build_resnet(18, weights="IMAGENET1K_V1")
    message = str(info.value)
    expected = empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "resnet18-f37072fd.pth" in message and str(expected) in message
    assert "never downloads" in message
    assert not expected.exists()


def test_weights_name_loaded_from_cache(empty_torch_home: Path) -> None:
    torch.manual_seed(2)
    state = torchvision.models.resnet18(weights=None).state_dict()
    cached = empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        model = build_resnet(18, weights=name)
        assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_unknown_weights(empty_torch_home: Path) -> None:
    with pytest.raises(UserError, match=r"no such file 'nope.pth', and not a torchvision weights name \(choices: "):
        build_resnet(50, weights="nope.pth")


def test_wrong_depth_weights_name_key_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="unexpected key 'layer1.2.conv1.weight'"):
        build_resnet(18, weights=str(path))
    path50 = tmp_path / "r50.pth"
    torch.save(ResNetBackbone(50).state_dict(), path50)
    with pytest.raises(UserError, match=r"key 'layer1.0.conv1.weight' has shape \(64, 64, 1, 1\) in the file, "):
        build_resnet(18, weights=str(path50))
