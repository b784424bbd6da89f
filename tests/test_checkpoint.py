"""Tests for backbones/checkpoint.py: atomic writes, data-only loads, backbone checkpoints, strict transfer."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones.checkpoint import (
    atomic_save,
    is_backbone_checkpoint,
    load_backbone_weights,
    load_checkpoint,
    save_backbone,
    to_plain,
)
from backbones.csp import build_cspdarknet
from backbones.errors import UserError
from backbones.resnet import build_resnet


class Pwn:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.target}",))


def tiny() -> nn.Module:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4)))


def test_atomic_save_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_save({"a": torch.ones(2)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.zeros(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]


def test_atomic_save_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"epoch": 1}, path)
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2, "big": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_atomic_save_failure_while_writing(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_save({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"epoch": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_load_refuses_code_and_runs_nothing(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {}, "x": Pwn(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match=f"refused to load checkpoint {path}"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="refused to load"):
        load_backbone_weights(tiny(), path)
    assert not marker.exists()


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    with pytest.raises(UserError, match=f"checkpoint not found: {missing}"):
        load_checkpoint(missing)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(UserError, match=f"checkpoint {listed} holds a list, expected a dict"):
        load_checkpoint(listed)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UserError, match=f"cannot read checkpoint {truncated}"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello")
    with pytest.raises(UserError, match=str(garbage)):
        load_checkpoint(garbage)


def test_save_backbone_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = build_cspdarknet("n")
    path = tmp_path / "backbone.pt"
    config = {"train": {"epochs": 3, "lr": 0.01, "path": tmp_path}, "tags": ("a", "b")}
    save_backbone(path, backbone, "cspdarknet_n", {}, {"top1": 0.25}, config)
    ckpt = load_checkpoint(path)
    assert set(ckpt) == {"arch", "kwargs", "state_dict", "metrics", "config"}
    assert is_backbone_checkpoint(ckpt)
    assert ckpt["arch"] == "cspdarknet_n" and ckpt["metrics"] == {"top1": 0.25}
    assert ckpt["config"]["train"]["path"] == str(tmp_path)

    fresh = build_cspdarknet("n")
    count = load_backbone_weights(fresh, path, arch="cspdarknet_n")
    assert count == len(backbone.state_dict()) == len(fresh.state_dict())
    for key, value in backbone.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # The dict itself, and a plain state dict, work as sources too.
    assert load_backbone_weights(build_cspdarknet("n"), ckpt) == count
    assert load_backbone_weights(build_cspdarknet("n"), backbone.state_dict()) == count


def test_ddp_prefix_is_stripped() -> None:
    source = tiny()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = tiny()
    assert load_backbone_weights(target, state) == 7  # conv w, b; bn w, b, mean, var, num_batches_tracked
    assert torch.equal(target.conv.weight, source.conv.weight)


def test_arch_mismatch_is_clear(tmp_path: Path) -> None:
    path = tmp_path / "r18.pt"
    save_backbone(path, build_resnet(18), "resnet18")
    with pytest.raises(UserError, match=f"checkpoint {path} is a 'resnet18' backbone, cannot load it into"):
        load_backbone_weights(build_cspdarknet("n"), path, arch="cspdarknet_n")
    # Without an arch to compare, the key check still refuses it.
    with pytest.raises(UserError, match="missing key 'stem.conv.weight'"):
        load_backbone_weights(build_cspdarknet("n"), path)


def test_mismatch_names_key_and_both_shapes() -> None:
    state = tiny().state_dict()
    state["conv.weight"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(UserError) as info:
        load_backbone_weights(tiny(), state, arch="toy", source_name="toy.pt")
    assert str(info.value) == (
        "weights toy.pt do not fit the backbone (expected toy): key 'conv.weight' has shape (4, 3, 5, 5) "
        "in the file, (4, 3, 3, 3) in the model"
    )
    state = tiny().state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="unexpected key 'extra.weight'"):
        load_backbone_weights(tiny(), state)
    with pytest.raises(UserError, match="neither a backbone checkpoint nor a state dict of tensors"):
        load_backbone_weights(tiny(), {"epoch": 3})


def test_failed_load_leaves_model_untouched() -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.full_like(v, 7) for k, v in model.state_dict().items()}
    state["bn.weight"] = torch.zeros(5)
    with pytest.raises(UserError):
        load_backbone_weights(model, state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_to_plain() -> None:
    assert to_plain({"a": [1, (2.0, "x")], 3: None}) == {"a": [1, (2.0, "x")], 3: None}
    with pytest.raises(TypeError, match="cannot store a object"):
        to_plain({"a": object()})
