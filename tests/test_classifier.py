"""Tests for backbones/classifier.py: logits, pooling, and backbone keys shared with the detector."""

from __future__ import annotations

import torch

from backbones.classifier import Classifier
from backbones.csp import build_cspdarknet
from backbones.resnet import build_resnet


def test_logits_shape_and_children() -> None:
    model = Classifier(build_resnet(18), num_classes=7, dropout=0.2)
    assert [name for name, _ in model.named_children()] == ["backbone", "dropout", "head"]
    assert model.head.in_features == 512 and model.head.out_features == 7
    logits = model(torch.rand(3, 3, 64, 96))
    assert logits.shape == (3, 7)
    logits.sum().backward()
    assert model.backbone.conv1.weight.grad is not None


def test_head_sees_global_average_of_deepest_map() -> None:
    torch.manual_seed(0)
    model = Classifier(build_cspdarknet("n"), num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        deepest = model.backbone(x)[-1]
        expected = deepest.mean(dim=(2, 3)) @ model.head.weight.T + model.head.bias
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_backbone_keys_are_the_detector_keys() -> None:
    backbone = build_cspdarknet("n")
    model = Classifier(backbone, num_classes=3)
    assert list(model.backbone.state_dict()) == list(build_cspdarknet("n").state_dict())
    prefixed = [k for k in model.state_dict() if k.startswith("backbone.")]
    assert prefixed == [f"backbone.{k}" for k in backbone.state_dict()]
    assert [k for k in model.state_dict() if not k.startswith("backbone.")] == ["head.weight", "head.bias"]
