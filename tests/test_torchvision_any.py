"""Tests for backbones/torchvision_any.py: stride probing, tap choice, weights, and models that cannot serve."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from backbones import build_backbone
from backbones import torchvision_any as tva
from backbones.checkpoint import save_backbone
from backbones.errors import UserError
from backbones.freeze import freeze_stages
from backbones.torchvision_any import MapInfo, build_torchvision_backbone, choose_taps, map_info

SIZE = (128, 384)


def test_map_info_reads_strides_from_side_difference() -> None:
    assert map_info((1, 64, 16, 48), SIZE) == MapInfo(8, 64, False)
    assert map_info((1, 16, 4, 12), SIZE) == MapInfo(32, 16, False)
    assert map_info((1, 16, 48, 96), SIZE) == MapInfo(8, 96, True)  # channels-last
    # Padding-free layers (Inception v3 at stride 8 gives 13x45 instead of 16x48): same difference, same stride.
    assert map_info((1, 288, 13, 45), SIZE) == MapInfo(8, 288, False)
    assert map_info((1, 512, 7, 7), SIZE) is None  # adaptive pool: fixed size
    assert map_info((1, 1000), SIZE) is None
    assert map_info((1, 16, 20, 60), SIZE) is None  # the side difference fits no power-of-two stride
    assert map_info((1, 16, 60, 180), SIZE) == MapInfo(2, 16, False)


def test_choose_taps_prefers_block_outputs_at_the_shallowest_depth() -> None:
    order = ["x", "stem", "blocks.0.conv", "blocks.0.add", "blocks.1.expand", "blocks.1.down", "blocks.1.add"]
    order += ["blocks.2.expand", "blocks.2.down", "blocks.3.conv", "pool", "fc"]
    strides = {"x": 1, "stem": 4, "blocks.0.conv": 8, "blocks.0.add": 8, "blocks.1.expand": 8, "blocks.1.down": 16}
    strides |= {"blocks.1.add": 16, "blocks.2.expand": 16, "blocks.2.down": 32, "blocks.3.conv": 32}
    infos = {n: MapInfo(s, 1, False) for n, s in strides.items()}
    taps, depth = choose_taps(order, infos)
    # Depth 1 has only "blocks" (stride 32); at depth 2 the block outputs are blocks.0.add, blocks.1.add, ...
    assert depth == 2
    assert taps == {8: "blocks.0.add", 16: "blocks.1.add", 32: "blocks.3.conv"}
    assert choose_taps(order, {n: i for n, i in infos.items() if i.stride != 16}) is None


def test_registered_models_taps() -> None:
    mobilenet = build_backbone("tv:mobilenet_v3_large")
    assert mobilenet.return_nodes == ("features.6.add", "features.12.add", "features.16")
    assert mobilenet.out_channels == (40, 112, 960)
    googlenet = build_backbone("tv:googlenet")
    assert googlenet.return_nodes == ("inception3b.cat", "inception4e.cat", "inception5b.cat")
    assert googlenet.out_channels == (480, 832, 1024)
    assert not hasattr(googlenet.body, "fc") and not hasattr(googlenet.body, "aux1")


def test_alexnet_maps_are_resized_to_the_contract() -> None:
    torch.manual_seed(0)
    model = build_backbone("tv:alexnet").eval()
    assert model.return_nodes == ("features.4", "features.11", "features.12")
    assert model.out_channels == (192, 256, 256)
    x = torch.rand(1, 3, 160, 224)
    with torch.no_grad():
        raw = model.body(x)
        maps = model(x)
    assert [tuple(raw[k].shape[2:]) for k in ("c3", "c4", "c5")] == [(19, 27), (9, 13), (4, 6)]
    for key, out in zip(("c3", "c4", "c5"), maps, strict=True):
        resized = nn.functional.interpolate(raw[key], size=out.shape[2:], mode="bilinear", align_corners=False)
        assert torch.equal(out, resized)
    assert [tuple(m.shape[2:]) for m in maps] == [(20, 28), (10, 14), (5, 7)]


class ToChannelsLast(nn.Module):
    """[B, C, H, W] -> Linear over channels -> [B, H, W, C']."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.permute(0, 2, 3, 1))


class DownFromChannelsLast(nn.Module):
    """[B, H, W, C] -> stride-2 conv -> [B, C', H/2, W/2]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2))


class ChannelsLastToy(nn.Module):
    """Stride-8 stem, then stages that end channels-last, like Swin's; the deepest map is NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 8, stride=8)
        self.stage1 = ToChannelsLast(8, 8)
        self.down2 = DownFromChannelsLast(8, 12)
        self.stage2 = ToChannelsLast(12, 12)
        self.down3 = DownFromChannelsLast(12, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down3(self.stage2(self.down2(self.stage1(self.stem(x)))))  # [B, 16, H/32, W/32]
        return self.head(x.mean(dim=(2, 3)))


def test_channels_last_maps_are_permuted() -> None:
    torch.manual_seed(0)
    model = tva.TorchvisionBackbone("toy", ChannelsLastToy()).eval()
    assert model.return_nodes == ("stage1.linear", "stage2.linear", "down3.conv")
    assert model.channels_last == (True, True, False)
    assert model.out_channels == (8, 12, 16)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        raw = model.body(x)
        maps = model(x)
    assert torch.equal(maps[0], raw["c3"].permute(0, 3, 1, 2))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 8, 12), (2, 12, 4, 6), (2, 16, 2, 3)]


@pytest.mark.slow
def test_swin_is_channels_last() -> None:
    model = build_backbone("tv:swin_t").eval()
    assert model.channels_last == (True, True, False)
    assert model.out_channels == (192, 384, 768)
    with torch.no_grad():
        maps = model(torch.rand(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 8, 12), (1, 384, 4, 6), (1, 768, 2, 3)]


def test_models_that_cannot_serve() -> None:
    with pytest.raises(UserError, match=r"tv:squeezenet1_1 cannot give .* strides 8, 16 and 32: .* 1, 2, 4, 8, 16$"):
        build_backbone("tv:squeezenet1_1")
    with pytest.raises(UserError, match="unknown backbone 'tv:fasterrcnn_resnet50_fpn': torchvision classification"):
        build_backbone("tv:fasterrcnn_resnet50_fpn")


def test_untraceable_model(monkeypatch: pytest.MonkeyPatch) -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x  # control flow on values: torch.fx cannot trace it

    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kwargs: DataDependent())
    with pytest.raises(UserError, match="backbone tv:alexnet cannot be traced and probed by torch.fx: TraceError"):
        build_torchvision_backbone("alexnet")


def test_weights_from_torchvision_state_dict_and_backbone_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3)
    full = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "mnv3s.pth"
    torch.save(full.state_dict(), path)  # with the classifier head, which the backbone drops
    model = build_backbone("tv:mobilenet_v3_small", weights=str(path))
    weight = model.body.get_submodule("features.4.block.0.0").weight
    assert torch.equal(weight, full.features[4].block[0][0].weight)

    ckpt = tmp_path / "backbone.pt"
    save_backbone(ckpt, model, "tv:mobilenet_v3_small")
    again = build_backbone("tv:mobilenet_v3_small", weights=str(ckpt))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with pytest.raises(UserError, match="is a 'tv:mobilenet_v3_small' backbone, cannot load it into 'tv:alexnet'"):
        build_backbone("tv:alexnet", weights=str(ckpt))


def test_weights_name_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"place mobilenet_v3_small-047dcff4.pth \(from https://"):
        build_backbone("tv:mobilenet_v3_small", weights="IMAGENET1K_V1")


def test_stage_modules_group_by_stride_and_freeze() -> None:
    model = build_backbone("tv:mobilenet_v3_small")
    stages = model.stage_modules()
    assert len(stages) == 4
    blocks = [model.body.get_submodule(f"features.{i}") for i in range(13)]
    assert list(stages[0]) == blocks[0:2]  # strides 2 and 4
    assert list(stages[1]) == blocks[2:4]  # up to C3 (features.3)
    assert list(stages[2]) == blocks[4:9]  # up to C4 (features.8)
    assert list(stages[3]) == blocks[9:13]
    frozen = freeze_stages(model, 2)
    assert frozen == len(list(stages[0].parameters())) + len(list(stages[1].parameters()))
    assert not any(p.requires_grad for p in blocks[3].parameters())
    assert all(p.requires_grad for p in blocks[4].parameters())


def test_trains_like_a_module() -> None:
    model = build_backbone("tv:mobilenet_v3_small")
    assert model.training and model.body.training
    maps = model(torch.rand(2, 3, 64, 64))
    sum(m.mean() for m in maps).backward()
    assert model.body.get_submodule("features.0.0").weight.grad is not None
    model.eval()
    assert not model.body.training


def test_deepcopy_gives_the_same_maps() -> None:
    """EMA keeps a deep copy of the model: the copied traced body must compute the same maps."""
    torch.manual_seed(0)
    model = build_backbone("tv:mobilenet_v3_small").eval()
    twin = copy.deepcopy(model).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        for ours, theirs in zip(model(x), twin(x), strict=True):
            assert torch.equal(ours, theirs)
    assert list(twin.state_dict()) == list(model.state_dict())
