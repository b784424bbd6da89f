"""Tests for backbones/registry.py: registration, duplicates, unknown names, families."""

from __future__ import annotations

import pytest
from torch import nn

import backbones
from backbones import build_backbone, list_backbones, register_backbone
from backbones import registry as registry_module
from backbones.errors import UserError

EXPECTED = {
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "cspdarknet_n",
    "cspdarknet_s",
    "cspdarknet_m",
    "cspdarknet_l",
    "cspdarknet_x",
    "csp26_n",
    "csp26_s",
    "csp26_m",
    "csp26_l",
    "csp26_x",
    "csp11_n",
    "csp11_s",
    "csp11_m",
    "csp11_l",
    "csp11_x",
    "tv:vgg16_bn",
    "tv:googlenet",
    "tv:densenet121",
    "tv:mobilenet_v3_large",
    "tv:efficientnet_b0",
    "tv:convnext_tiny",
    "tv:alexnet",
}


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(registry_module.BACKBONES, "_factories", dict(registry_module.BACKBONES._factories))


def test_registered_names() -> None:
    names = list_backbones()
    # plugdet registers exactly these; other names can only come from plugins a test imported (tests/plugins)
    extra = {name: registry_module.BACKBONES.get(name).__module__ for name in set(names) - EXPECTED}
    assert set(names) >= EXPECTED and all(module.startswith("tests.plugins.") for module in extra.values()), extra
    assert names == sorted(names)
    assert backbones.__all__ == ["build_backbone", "list_backbones", "register_backbone"]


def test_register_and_build_with_kwargs(clean_registry: None) -> None:
    @register_backbone("toy_for_test")
    def toy(width: int = 4) -> nn.Module:
        return nn.Conv2d(3, width, 1)

    assert "toy_for_test" in list_backbones()
    assert build_backbone("toy_for_test", width=7).out_channels == 7


def test_duplicate_registration_raises(clean_registry: None) -> None:
    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_backbone("resnet18")(lambda: nn.Identity())


def test_unknown_name_lists_registered_names() -> None:
    with pytest.raises(UserError) as info:
        build_backbone("resnet19")
    message = str(info.value)
    assert message.startswith("unknown backbone 'resnet19': registered backbones are ")
    for name in EXPECTED:
        assert name in message
    assert "tv:<name>" in message
    assert "\n" not in message


def test_family_resolves_unregistered_torchvision_name() -> None:
    model = build_backbone("tv:mobilenet_v3_small")
    assert model.strides == (8, 16, 32)
    assert model.out_channels == (24, 48, 576)
    with pytest.raises(UserError, match="unknown backbone 'tv:not_a_model'"):
        build_backbone("tv:not_a_model")
    with pytest.raises(UserError, match="unknown backbone 'tv:'"):
        build_backbone("tv:")
