"""Optimizers, learning-rate schedules, warmup and the weight EMA, as functions of plain numbers (STYLE 4).

Shared by classification (`tools/train_cls.py`) and detection training. The schedules are pure functions of the
(fractional) epoch, so a resumed run needs no scheduler object: the position is the epoch and batch it stopped at.

Detection follows YOLOv8 (DESIGN §5): three parameter groups (decayed weights; norm weights and biases without decay),
SGD with Nesterov momentum or AdamW, a warmup over max(warmup_epochs * iterations, 100) iterations in which the bias
lr falls from `warmup_bias_lr` and the other lrs rise from 0 to the scheduled lr while momentum rises from
`warmup_momentum`, then a per-epoch linear or cosine decay to lr * lrf, and an EMA of the weights whose decay ramps
up as d * (1 - exp(-updates / tau)).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from backbones.errors import UserError

GROUP_NAMES = ("decay", "norm", "bias")  # the order of build_param_groups' groups

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into the three YOLOv8 groups.

    Args:
        model: any module (a DDP wrapper is looked through by its `module`).
        weight_decay: L2 weight decay of the first group.

    Returns:
        `[{"name": "decay", "params", "weight_decay": weight_decay}, {"name": "norm", ..., 0.0},
        {"name": "bias", ..., 0.0}]`: weights of non-norm layers; weights of norm layers (BatchNorm, LayerNorm,
        GroupNorm, ...); every parameter whose name contains "bias". Frozen parameters (requires_grad False) are left
        out; a group may be empty.
    """
    model = getattr(model, "module", model)
    groups = {name: [] for name in GROUP_NAMES}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if "bias" in full_name:
                groups["bias"].append(param)
            elif isinstance(module, _NORM_TYPES):
                groups["norm"].append(param)
            else:
                groups["decay"].append(param)
    decay = {"decay": weight_decay, "norm": 0.0, "bias": 0.0}
    return [{"name": name, "params": groups[name], "weight_decay": decay[name]} for name in GROUP_NAMES]


def build_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, momentum: float, nesterov: bool = True
) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW over parameter groups, each group remembering `initial_lr`.

    Args:
        name: "sgd" or "adamw".
        groups: from `build_param_groups` (their weight decay is kept; AdamW's decay is decoupled).
        lr: base learning rate (every group's `lr` and `initial_lr`).
        momentum: SGD momentum, or AdamW's beta1 (beta2 = 0.999), as YOLOv8 does.
        nesterov: SGD only; off when momentum is 0.

    Returns:
        The optimizer; its groups keep their "name" key, which the warmup uses to find the bias group.
    """
    groups = [{**group, "lr": lr, "initial_lr": lr} for group in groups]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise UserError(f"unknown optimizer {name!r}: choose sgd or adamw")


def lr_at(
    epoch: float,
    base_lr: float,
    schedule: str,
    epochs: int,
    warmup_epochs: float = 0.0,
    warmup_start: float = 0.1,
    lrf: float = 0.0,
    milestones: Sequence[int] = (),
    step_size: int = 30,
    gamma: float = 0.1,
) -> float:
    """Learning rate at a fractional epoch (epoch index + batch / batches per epoch): warmup, then a schedule.

    Warmup (epoch < warmup_epochs): base_lr * (warmup_start + (1 - warmup_start) * epoch / warmup_epochs).
    After it, with t = (epoch - warmup_epochs) / (epochs - warmup_epochs) in [0, 1]:
      cosine:    base_lr * (lrf + (1 - lrf) * (1 + cos(pi * t)) / 2)
      linear:    base_lr * (1 - (1 - lrf) * t)
      step:      base_lr * gamma ** floor(epoch / step_size)
      multistep: base_lr * gamma ** (number of milestones <= epoch)

    Args:
        epoch: fractional epoch, 0-based.
        base_lr: the peak learning rate.
        schedule: "cosine", "linear", "step" or "multistep".
        epochs: total epochs.
        warmup_epochs, warmup_start: warmup length (epochs, fractional) and its starting fraction of base_lr.
        lrf: final fraction of base_lr (cosine, linear).
        milestones, step_size, gamma: the step schedules.

    Returns:
        The learning rate.
    """
    if epoch < warmup_epochs:
        return base_lr * (warmup_start + (1.0 - warmup_start) * epoch / warmup_epochs)
    if schedule == "step":
        return base_lr * gamma ** math.floor(epoch / step_size)
    if schedule == "multistep":
        return base_lr * gamma ** sum(1 for m in milestones if m <= epoch)
    t = min(max((epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12), 0.0), 1.0)
    if schedule == "cosine":
        return base_lr * (lrf + (1.0 - lrf) * 0.5 * (1.0 + math.cos(math.pi * t)))
    if schedule == "linear":
        return base_lr * (1.0 - (1.0 - lrf) * t)
    raise UserError(f"unknown lr schedule {schedule!r}: choose cosine, linear, step or multistep")


def yolo_lr_factor(epoch: int, epochs: int, lrf: float, schedule: str) -> float:
    """YOLOv8's per-epoch lr multiplier: linear max(1 - e/E, 0) * (1 - lrf) + lrf, or cosine 1 -> lrf.

    Args:
        epoch: epoch index (0-based; the factor is constant within an epoch).
        epochs: total epochs E.
        lrf: final factor.
        schedule: "linear" or "cosine" ((1 - cos(pi e / E)) / 2 * (lrf - 1) + 1).
    """
    if schedule == "linear":
        return max(1.0 - epoch / epochs, 0.0) * (1.0 - lrf) + lrf
    if schedule == "cosine":
        return max((1.0 - math.cos(epoch * math.pi / epochs)) / 2.0, 0.0) * (lrf - 1.0) + 1.0
    raise UserError(f"unknown lr schedule {schedule!r}: choose linear or cosine")


def warmup_iterations(warmup_epochs: float, iters_per_epoch: int, min_iters: int = 100) -> int:
    """Number of warmup iterations: max(round(warmup_epochs * iters_per_epoch), min_iters), or 0 without warmup."""
    if warmup_epochs <= 0:
        return 0
    return max(round(warmup_epochs * iters_per_epoch), min_iters)


def _interp(x: float, x1: float, y0: float, y1: float) -> float:
    """Linear interpolation between (0, y0) and (x1, y1), clamped at both ends (np.interp on two points)."""
    if x <= 0:
        return y0
    if x >= x1:
        return y1
    return y0 + (y1 - y0) * x / x1


def warmup_values(
    iteration: int,
    warmup_iters: int,
    group_names: Sequence[str],
    target_lr: float,
    momentum: float,
    warmup_bias_lr: float = 0.1,
    warmup_momentum: float = 0.8,
) -> list[tuple[float, float]]:
    """YOLOv8 warmup: (lr, momentum) for each parameter group at a global iteration.

    Over iterations 0..warmup_iters the "bias" group's lr falls linearly from `warmup_bias_lr` to `target_lr`, the
    other groups' rise from 0 to `target_lr`, and momentum rises from `warmup_momentum` to `momentum`; from
    warmup_iters on, every group has (target_lr, momentum).

    Args:
        iteration: global iteration (epoch * iters_per_epoch + batch index).
        warmup_iters: from `warmup_iterations` (0 = no warmup).
        group_names: the optimizer's group names, e.g. ("decay", "norm", "bias").
        target_lr: the scheduled lr of this epoch (initial_lr * yolo_lr_factor(epoch, ...)).
        momentum: the final momentum (AdamW: beta1).
        warmup_bias_lr, warmup_momentum: the starting values.

    Returns:
        One (lr, momentum) per group, in order.
    """
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return [(target_lr, momentum) for _ in group_names]
    m = _interp(iteration, warmup_iters, warmup_momentum, momentum)
    return [
        (_interp(iteration, warmup_iters, warmup_bias_lr if name == "bias" else 0.0, target_lr), m)
        for name in group_names
    ]


def warmup_accumulate(iteration: int, warmup_iters: int, nominal_batch_size: int, batch_size: int) -> int:
    """Batches to accumulate before a step: ramps from 1 to round(nominal / batch) during warmup (YOLOv8)."""
    full = max(round(nominal_batch_size / batch_size), 1)
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return full
    return max(1, round(_interp(iteration, warmup_iters, 1.0, float(full))))


def scaled_weight_decay(weight_decay: float, batch_size: int, nominal_batch_size: int) -> float:
    """Weight decay scaled for gradient accumulation: wd * batch * accumulate / nominal (YOLOv8)."""
    accumulate = max(round(nominal_batch_size / batch_size), 1)
    return weight_decay * batch_size * accumulate / nominal_batch_size


def set_group_values(optimizer: torch.optim.Optimizer, values: Sequence[tuple[float, float]]) -> None:
    """Write (lr, momentum) into each group; AdamW's momentum is beta1."""
    for group, (lr, momentum) in zip(optimizer.param_groups, values, strict=True):
        group["lr"] = lr
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum


class ModelEMA:
    """Exponential moving average of a model's state (parameters and float buffers).

    After `updates` steps the decay is d * (1 - exp(-updates / tau)), so early averages follow the model closely
    (Polyak averaging with a ramp, as in YOLOv8 and timm). Integer buffers (BatchNorm's num_batches_tracked) are
    copied.

    Args:
        model: the model to follow (a DDP wrapper is looked through); a deep copy is kept in eval mode.
        decay: the asymptotic decay d.
        tau: ramp time constant, in updates.
        updates: updates already done (when restoring).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.ema = copy.deepcopy(getattr(model, "module", model)).eval()
        for param in self.ema.parameters():
            param.requires_grad_(False)
        self.decay_max = decay
        self.tau = tau
        self.updates = updates

    def decay(self, updates: int | None = None) -> float:
        """The decay used at update number `updates` (default: the last one)."""
        updates = self.updates if updates is None else updates
        return self.decay_max * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step: ema = d * ema + (1 - d) * model, with d = decay(updates + 1)."""
        self.updates += 1
        d = self.decay()
        source = getattr(model, "module", model).state_dict()
        for key, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[key].detach().to(value.dtype), alpha=1.0 - d)
            else:
                value.copy_(source[key])

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and the update count."""
        return {"state_dict": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        self.ema.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])
