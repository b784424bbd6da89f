"""detect/train/optim.py: param groups, optimizers, schedules, YOLOv8 warmup, EMA, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from detect.train.optim import (
    ModelEMA,
    build_optimizer,
    build_param_groups,
    lr_at,
    scaled_weight_decay,
    set_group_values,
    warmup_accumulate,
    warmup_iterations,
    warmup_values,
    yolo_lr_factor,
)


def _toy() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2)
    )


def test_param_groups_membership_and_decay() -> None:
    model = _toy()
    conv, bn, gn, _, fc = model
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    groups = build_param_groups(model, weight_decay=5e-4)
    assert [g["name"] for g in groups] == ["decay", "norm", "bias"]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(conv.weight), id(fc.weight)}
    assert ids[1] == {id(bn.weight), id(gn.weight)}
    assert ids[2] == {id(bn.bias), id(gn.bias), id(fc.bias)}
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 0.0]
    assert sum(len(g["params"]) for g in groups) == 7  # the frozen Linear is left out


def test_build_optimizer_sgd_and_adamw() -> None:
    groups = build_param_groups(_toy(), 1e-4)
    sgd = build_optimizer("sgd", groups, lr=0.01, momentum=0.937)
    assert isinstance(sgd, torch.optim.SGD)
    for group in sgd.param_groups:
        assert group["nesterov"] is True and group["momentum"] == 0.937
        assert group["lr"] == group["initial_lr"] == 0.01
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0, 0.0]
    adamw = build_optimizer("adamw", build_param_groups(_toy(), 1e-4), lr=0.001, momentum=0.9)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.999)
    assert build_optimizer("sgd", groups, lr=0.1, momentum=0.0).param_groups[0]["nesterov"] is False
    set_group_values(adamw, [(0.5, 0.8)] * 3)
    assert adamw.param_groups[2]["lr"] == 0.5 and adamw.param_groups[2]["betas"] == (0.8, 0.999)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0.0, 0.01), (0.5, 0.0325), (1.0, 0.055), (2.0, 0.1), (6.0, 0.0505), (10.0, 0.001)],
)
def test_lr_cosine_with_warmup(epoch: float, expected: float) -> None:
    # base 0.1, 10 epochs, 2 warmup epochs starting at 0.1 * base, final 0.01 * base
    lr = lr_at(epoch, 0.1, "cosine", 10, warmup_epochs=2, warmup_start=0.1, lrf=0.01)
    assert lr == pytest.approx(expected, rel=1e-12)


def test_lr_at_iterations() -> None:
    # 4 iterations per epoch: iteration i of epoch e is at e + i / 4
    lrs = [lr_at(i / 4, 0.1, "cosine", 10, warmup_epochs=2, warmup_start=0.1, lrf=0.01) for i in range(9)]
    assert lrs[:9] == pytest.approx([0.01 + 0.09 * i / 8 for i in range(9)], rel=1e-12)


def test_lr_linear_step_multistep() -> None:
    assert lr_at(4.0, 0.1, "linear", 10, warmup_epochs=2, lrf=0.01) == pytest.approx(0.07525, rel=1e-12)
    assert lr_at(6.0, 0.1, "linear", 10, warmup_epochs=2, lrf=0.01) == pytest.approx(0.0505, rel=1e-12)
    assert [lr_at(e, 0.1, "step", 10, step_size=3) for e in (2.9, 3.0, 6.5)] == pytest.approx([0.1, 0.01, 0.001])
    steps = [lr_at(e, 0.1, "multistep", 10, milestones=[2, 5]) for e in (1.99, 2.0, 4.5, 5.0)]
    assert steps == pytest.approx([0.1, 0.01, 0.01, 0.001])
    cos = lr_at(5.0, 1.0, "cosine", 10)  # no warmup, lrf 0: (1 + cos(pi / 2)) / 2
    assert cos == pytest.approx(0.5, rel=1e-12)


def test_yolo_lr_factor() -> None:
    assert yolo_lr_factor(0, 100, 0.01, "linear") == 1.0
    assert yolo_lr_factor(50, 100, 0.01, "linear") == pytest.approx(0.505, rel=1e-12)
    assert yolo_lr_factor(100, 100, 0.01, "linear") == pytest.approx(0.01, rel=1e-12)
    assert yolo_lr_factor(50, 100, 0.01, "cosine") == pytest.approx(0.505, rel=1e-12)
    assert yolo_lr_factor(25, 100, 0.01, "cosine") == pytest.approx(1 - 0.99 * (1 - math.cos(math.pi / 4)) / 2)


def test_yolo_warmup_values() -> None:
    assert warmup_iterations(3, 10) == 100  # at least 100 iterations
    assert warmup_iterations(3, 50) == 150
    assert warmup_iterations(0, 50) == 0
    names = ("decay", "norm", "bias")
    assert warmup_values(0, 100, names, 0.01, 0.937) == [(0.0, 0.8), (0.0, 0.8), (0.1, 0.8)]
    half = warmup_values(50, 100, names, 0.01, 0.937)
    assert [lr for lr, _ in half] == pytest.approx([0.005, 0.005, 0.055], rel=1e-12)
    assert half[0][1] == pytest.approx(0.8685, rel=1e-12)
    assert warmup_values(100, 100, names, 0.01, 0.937) == [(0.01, 0.937)] * 3
    assert warmup_values(7, 0, names, 0.01, 0.937) == [(0.01, 0.937)] * 3
    for it in (0, 13, 77, 99):  # same as np.interp, which YOLOv8 uses
        ours = warmup_values(it, 100, names, 0.004, 0.9, 0.1, 0.8)
        assert ours[2][0] == pytest.approx(np.interp(it, [0, 100], [0.1, 0.004]), rel=1e-12)
        assert ours[0][0] == pytest.approx(np.interp(it, [0, 100], [0.0, 0.004]), abs=1e-15)


def test_accumulate_and_weight_decay_scaling() -> None:
    assert [warmup_accumulate(i, 100, 64, 16) for i in (0, 50, 100, 500)] == [1, 2, 4, 4]
    assert warmup_accumulate(0, 100, 64, 128) == 1
    assert scaled_weight_decay(5e-4, 16, 64) == pytest.approx(5e-4)
    assert scaled_weight_decay(5e-4, 24, 64) == pytest.approx(5e-4 * 24 * 3 / 64)


def test_model_ema_updates() -> None:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = ModelEMA(model)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    model[1].num_batches_tracked += 5
    ema.update(model)
    d1 = 0.9999 * (1 - math.exp(-1 / 2000))
    e1 = d1 * 1.0 + (1 - d1) * 3.0
    assert ema.decay() == pytest.approx(d1, rel=1e-15)
    assert ema.ema[0].weight.item() == pytest.approx(e1, rel=1e-14)
    assert ema.ema[1].num_batches_tracked.item() == 5  # integer buffers are copied
    with torch.no_grad():
        model[0].weight.fill_(5.0)
    ema.update(model)
    d2 = 0.9999 * (1 - math.exp(-2 / 2000))
    assert ema.ema[0].weight.item() == pytest.approx(d2 * e1 + (1 - d2) * 5.0, rel=1e-14)
    assert not any(p.requires_grad for p in ema.ema.parameters())
    restored = ModelEMA(model)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 2
    assert torch.equal(restored.ema[0].weight, ema.ema[0].weight)
