"""Tests for backbones/freeze.py: freezing the first k stages, and frozen BatchNorm kept in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbones.classifier import Classifier
from backbones.csp import build_cspdarknet
from backbones.errors import UserError
from backbones.freeze import freeze_stages, keep_frozen_bn_eval
from backbones.resnet import build_resnet


@pytest.mark.parametrize("num_stages", [0, 1, 2, 3, 4, 5])
def test_freeze_first_k_stages_exactly(num_stages: int) -> None:
    model = build_cspdarknet("n")
    stages = model.stage_modules()
    expected = {id(p) for s in stages[:num_stages] for p in s.parameters()}
    frozen = freeze_stages(model, num_stages)
    assert frozen == len(expected)
    for param in model.parameters():
        assert param.requires_grad == (id(param) not in expected)


def test_freeze_all_and_counts() -> None:
    model = build_resnet(18)
    total = len(list(model.parameters()))
    assert freeze_stages(model, 2) == 3 + len(list(model.layer1.parameters()))  # conv1 weight, bn1 weight + bias
    assert not model.bn1.weight.requires_grad and model.layer2[0].conv1.weight.requires_grad
    assert freeze_stages(model, -1) == total - 3 - len(list(model.layer1.parameters()))  # only the new ones
    assert not any(p.requires_grad for p in model.parameters())


def test_freeze_bad_count() -> None:
    model = build_cspdarknet("n")
    with pytest.raises(UserError, match="cannot freeze 6 stages of a backbone with 5"):
        freeze_stages(model, 6)
    with pytest.raises(UserError, match="cannot freeze -2 stages"):
        freeze_stages(model, -2)


def test_frozen_bn_stays_eval_and_keeps_its_statistics() -> None:
    torch.manual_seed(0)
    model = Classifier(build_cspdarknet("n"), num_classes=5)
    freeze_stages(model.backbone, 2)
    model.train()
    keep_frozen_bn_eval(model)
    frozen_ids = {id(m) for s in model.backbone.stage_modules()[:2] for m in s.modules()}
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(id(m) in frozen_ids for m in batch_norms) and any(id(m) not in frozen_ids for m in batch_norms)
    for bn in batch_norms:
        assert bn.training == (id(bn) not in frozen_ids)
    assert model.training and model.head.training

    before = {id(bn): (bn.running_mean.clone(), bn.running_var.clone()) for bn in batch_norms}
    model(torch.rand(2, 3, 64, 96) * 3).sum().backward()
    for bn in batch_norms:
        mean, var = before[id(bn)]
        unchanged = torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert unchanged == (id(bn) in frozen_ids)
        assert (bn.weight.grad is None) == (id(bn) in frozen_ids)


def test_partly_frozen_and_affine_free_bn_stay_in_train_mode() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, affine=False))
    model[0].weight.requires_grad_(False)  # bias still trainable
    model.train()
    keep_frozen_bn_eval(model)
    assert model[0].training and model[1].training
    model[0].bias.requires_grad_(False)
    keep_frozen_bn_eval(model)
    assert not model[0].training and model[1].training
