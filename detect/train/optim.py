"""Optimizers, learning-rate schedules, warmup and the weight EMA, as functions of plain numbers (STYLE 4).

Shared by classification (`tools/train_cls.py`) and detection training. The schedules are pure functions of the
(fractional) epoch, so a resumed run needs no scheduler object: the position is the epoch and batch it stopped at.

Detection follows YOLOv8 (DESIGN §5): three parameter groups (decayed weights; norm weights and biases without decay),
SGD with Nesterov momentum, AdamW or YOLO26's MuSGD (`MuSGD`, `build_musgd_param_groups`), a warmup over
max(warmup_epochs * iterations, 100) iterations in which the bias lr falls from `warmup_bias_lr` and the other lrs
rise from 0 to the scheduled lr while momentum rises from `warmup_momentum`, then a per-epoch linear or cosine decay
to lr * lrf, and an EMA of the weights whose decay ramps up as d * (1 - exp(-updates / tau)).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_step

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


def scale_backbone_lr(groups: list[dict[str, Any]], backbone: nn.Module | None, scale: float) -> list[dict[str, Any]]:
    """The DETR recipes' lower backbone lr (RT-DETRv2: 0.1x, D-FINE: 0.5x): each group split in two, the backbone's
    parameters first, with its `lr_scale` (default 1) times `scale`.

    Args:
        groups: from `build_param_groups` or `build_musgd_param_groups`.
        backbone: the detector's backbone (None: nothing to split).
        scale: the backbone's lr factor; 1 returns `groups` unchanged (the same groups, same order).

    Returns:
        Twice as many groups (a group may be empty), each keeping its name and weight decay.
    """
    if scale == 1.0 or backbone is None:
        return groups
    ids = {id(p) for p in backbone.parameters()}
    split = []
    for group in groups:
        for in_backbone in (True, False):
            params = [p for p in group["params"] if (id(p) in ids) == in_backbone]
            factor = group.get("lr_scale", 1.0) * (scale if in_backbone else 1.0)
            split.append({**group, "params": params, "lr_scale": factor})
    return split


def build_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, momentum: float, nesterov: bool = True
) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum), AdamW or MuSGD over parameter groups, each group remembering `initial_lr`.

    Args:
        name: "sgd", "adamw" or "musgd".
        groups: from `build_param_groups` (their weight decay is kept; AdamW's decay is decoupled), or for "musgd"
            from `build_musgd_param_groups` (a group's `lr_scale` multiplies its `lr` and `initial_lr`).
        lr: base learning rate (every group's `lr` and `initial_lr`, times its `lr_scale`).
        momentum: SGD / MuSGD momentum, or AdamW's beta1 (beta2 = 0.999), as YOLOv8 does.
        nesterov: SGD and MuSGD; off when momentum is 0.

    Returns:
        The optimizer; its groups keep their "name" key, which the warmup uses to find the bias group.
    """
    groups = [{**group, "lr": lr * group.get("lr_scale", 1.0), "initial_lr": lr * group.get("lr_scale", 1.0)}
              for group in groups]  # fmt: skip
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    if name == "musgd":
        return MuSGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    raise UserError(f"unknown optimizer {name!r}: choose sgd, adamw or musgd")


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
    lr_scales: Sequence[float] | None = None,
) -> list[tuple[float, float]]:
    """YOLOv8 warmup: (lr, momentum) for each parameter group at a global iteration.

    Over iterations 0..warmup_iters the "bias" group's lr falls linearly from `warmup_bias_lr` to `target_lr`, the
    other groups' rise from 0 to `target_lr`, and momentum rises from `warmup_momentum` to `momentum`; from
    warmup_iters on, every group has (target_lr, momentum). A group's `lr_scales` entry (MuSGD's class branches: 3)
    multiplies its `target_lr`, not the bias warmup's start, as Ultralytics does.

    Args:
        iteration: global iteration (epoch * iters_per_epoch + batch index).
        warmup_iters: from `warmup_iterations` (0 = no warmup).
        group_names: the optimizer's group names, e.g. ("decay", "norm", "bias").
        lr_scales: per group, a factor of `target_lr` (default 1 for every group).
        target_lr: the scheduled lr of this epoch (initial_lr * yolo_lr_factor(epoch, ...)).
        momentum: the final momentum (AdamW: beta1).
        warmup_bias_lr, warmup_momentum: the starting values.

    Returns:
        One (lr, momentum) per group, in order.
    """
    scales = [1.0] * len(group_names) if lr_scales is None else list(lr_scales)
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return [(target_lr * scale, momentum) for scale in scales]
    m = _interp(iteration, warmup_iters, warmup_momentum, momentum)
    return [
        (_interp(iteration, warmup_iters, warmup_bias_lr if name == "bias" else 0.0, target_lr * scale), m)
        for name, scale in zip(group_names, scales, strict=True)
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
        """One step: ema = d * ema + (1 - d) * model, with d = decay(updates + 1). A tensor the state dict holds
        under several keys (tied weights: transformers' DETR heads share their class and box heads) is updated once."""
        self.updates += 1
        d = self.decay()
        source = getattr(model, "module", model).state_dict()
        done: set[tuple[int, tuple[int, ...]]] = set()
        for key, value in self.ema.state_dict().items():
            storage = (value.data_ptr(), tuple(value.shape))
            if value.numel() and storage in done:
                continue
            done.add(storage)
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


# ---- MuSGD (YOLO26's optimizer, Ultralytics 8.4.190): an SGD step plus a Muon step on matrices and conv filters ----

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Newton-Schulz quintic (Keller Jordan's Muon; torch.optim.Muon's too)
NS_STEPS = 5
NS_EPS = 1e-7
MUSGD_MUON, MUSGD_SGD = 0.2, 1.0  # Ultralytics' lr factors of the Muon and the SGD parts of a muon group
CLASS_BRANCH_LR_SCALE = 3.0  # Ultralytics' lr multiplier of the class branches under MuSGD
NS_MAX_ROW_RATIO = 16  # matrices batched together differ in rows by at most this factor (the zero padding's bound)


def newton_schulz(batch: torch.Tensor, eps: float = NS_EPS) -> torch.Tensor:
    """Approximate orthogonalisation (U V^T of the SVD, singular values pushed towards [0.5, 1.5]) of a batch of
    matrices by 5 quintic Newton-Schulz steps in bfloat16 (Jordan et al., "Muon: An optimizer for hidden layers in
    neural networks", 2024).

    Args:
        batch: [N, R, K] matrices (rows of zeros, the padding of `orthogonalize`, stay zero).

    Returns:
        [N, R, K] bfloat16.
    """
    a, b, c = NS_COEFFICIENTS
    x = batch.bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    wide = batch.size(-2) > batch.size(-1)
    if wide:
        x = x.transpose(-2, -1)  # iterate on the smaller Gram matrix
    for _ in range(NS_STEPS):
        gram = x @ x.transpose(-2, -1)  # [N, r, r]
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * G + c * G @ G
        x = torch.baddbmm(x, poly, x, beta=a)  # a * X + (b G + c G^2) X
    return x.transpose(-2, -1) if wide else x


def _as_matrix(update: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """A 2-D view of an update in its own memory order ([O, I*kh*kw] for NCHW, [O, kh*kw*I] for channels_last), and
    the strides to write the orthogonalised matrix back in that layout (None: row-major)."""
    if update.ndim == 4 and not update.is_contiguous() and update.is_contiguous(memory_format=torch.channels_last):
        return update.permute(0, 2, 3, 1).flatten(1), update.stride()  # NHWC columns: a permutation of NCHW's
    if update.is_contiguous():
        return update.flatten(1), update.stride()
    return update.reshape(update.shape[0], -1).contiguous(), None


def orthogonalize(updates: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Muon's orthogonalised updates of 2-D / 4-D tensors, each scaled by sqrt(max(1, rows / cols)) of its own
    (last two dims') shape, as Ultralytics' MuSGD computes them.

    Matrices of the same width (and scale, device, dtype) are zero-padded to the most rows and orthogonalised in one
    batched call, in runs whose row counts differ by at most 16x (sorted by decreasing rows). The batching is part of
    the numbers: a padded batch is transposed when its padded rows outnumber its columns, so this reproduces
    Ultralytics' buckets to give the same bfloat16 results.

    Args:
        updates: momentum updates, [O, I] or [O, I, kh, kw].

    Returns:
        The orthogonalised updates, same shapes, dtypes and memory layouts.
    """
    buckets: dict[tuple, list[tuple[int, torch.Tensor, tuple[int, ...] | None]]] = {}
    for index, update in enumerate(updates):
        matrix, strides = _as_matrix(update)  # [rows, cols]
        scale = max(1, update.size(-2) / update.size(-1)) ** 0.5
        buckets.setdefault((matrix.size(1), scale, matrix.device, matrix.dtype), []).append((index, matrix, strides))
    out: list[torch.Tensor] = list(updates)
    for (cols, scale, device, dtype), items in buckets.items():
        items.sort(key=lambda item: -item[1].size(0))  # stable: ties keep the parameters' order
        start = 0
        for stop in range(1, len(items) + 1):
            if stop < len(items) and items[start][1].size(0) <= NS_MAX_ROW_RATIO * items[stop][1].size(0):
                continue
            run = items[start:stop]
            padded = torch.zeros(len(run), run[0][1].size(0), cols, device=device, dtype=dtype)  # [N, R, cols]
            for slot, (_, matrix, _) in enumerate(run):
                padded[slot, : matrix.size(0)] += matrix
            result = newton_schulz(padded).contiguous().to(updates[run[0][0]].dtype).mul_(scale)  # [N, R, cols]
            for slot, (index, matrix, strides) in enumerate(run):
                rows = result[slot, : matrix.size(0)]  # [rows, cols]
                shape = updates[index].shape
                out[index] = rows.as_strided(shape, strides) if strides else rows.reshape(shape)
            start = stop
    return out


class MuSGD(torch.optim.Optimizer):
    """YOLO26's MuSGD: per group an SGD step (Nesterov momentum, L2 weight decay), plus, in groups with `use_muon`,
    a Muon step (Jordan et al. 2024: momentum, then Newton-Schulz orthogonalisation) at `muon * lr` before an SGD
    step at `sgd * lr` with its own momentum buffer; Ultralytics 8.4.190's optimizer, to its floats.

    The SGD part is torch's own (`torch.optim.sgd.sgd`, the same operations as Ultralytics'). The Muon part is
    written here rather than taken from `torch.optim.Muon`, which differs where the numbers are decided: it takes
    2-D parameters only (YOLO's weights are 4-D conv filters), normalises by `clamp(norm, eps)` rather than
    `norm + eps`, updates its momentum with `lerp` (other roundings), applies a decoupled weight decay to the Muon
    step (MuSGD decays only in the SGD step), and orthogonalises one matrix at a time where MuSGD batches
    zero-padded matrices of one width (`orthogonalize`), which changes which side the iteration transposes. The
    Newton-Schulz coefficients and step count are the same.

    Args:
        params: parameter groups; a group's `use_muon` (default False) turns the Muon step on.
        lr, momentum, weight_decay, nesterov: per-group defaults (the Muon momentum is the group's `momentum`).
        muon, sgd: lr factors of the Muon and SGD steps in muon groups (Ultralytics: 0.2 and 1.0).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        muon: float = MUSGD_MUON,
        sgd: float = MUSGD_SGD,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov,
                    "use_muon": False}  # fmt: skip
        super().__init__(params, defaults)
        self.muon, self.sgd = muon, sgd
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim not in (2, 4) for p in group["params"]):
                raise ValueError("MuSGD: a use_muon group holds only 2-D and 4-D parameters")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step over every group; parameters without a gradient are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, beta, nesterov = group["lr"], group["momentum"], group["nesterov"]
            grads = [p.grad for p in params]
            if group["use_muon"]:
                buffers = [self.state[p].setdefault("muon_buffer", torch.zeros_like(p)) for p in params]
                for buffer, grad in zip(buffers, grads, strict=True):
                    buffer.mul_(beta).add_(grad, alpha=1 - beta)  # m = beta m + (1 - beta) g
                pairs = zip(buffers, grads, strict=True)
                updates = [b.mul(beta).add_(g, alpha=1 - beta) if nesterov else b for b, g in pairs]
                for param, update in zip(params, orthogonalize(updates), strict=True):
                    param.add_(update, alpha=-(lr * self.muon))
                lr = lr * self.sgd
            sgd_buffers = [self.state[p].get("momentum_buffer") for p in params]
            sgd_step(params, grads, sgd_buffers, weight_decay=group["weight_decay"], momentum=beta, lr=lr,
                                dampening=0.0, nesterov=nesterov, maximize=False, foreach=False)  # fmt: skip
            for param, buffer in zip(params, sgd_buffers, strict=True):
                self.state[param]["momentum_buffer"] = buffer
        return loss


def build_musgd_param_groups(
    model: nn.Module, weight_decay: float, boosted: Sequence[nn.Parameter] = ()
) -> list[dict[str, Any]]:
    """Ultralytics' MuSGD groups: every 2-D / 4-D weight (matrices, conv filters) in a Muon group with weight decay;
    the others as `build_param_groups` splits them (norm weights, biases: no decay); each group split in two, the
    `boosted` parameters (Ultralytics: the head's class branches, both of YOLO26's) at 3x the lr.

    Args:
        model: any module (a DDP wrapper is looked through by its `module`).
        weight_decay: L2 weight decay of the decayed and the Muon groups.
        boosted: parameters whose groups get `lr_scale` 3.

    Returns:
        Eight groups in Ultralytics' order, (boosted, rest) for each of decay, norm, bias, muon: dicts with "name"
        ("bias" for both bias groups, which the warmup finds by name), "params", "weight_decay", "use_muon" and
        "lr_scale". Frozen parameters are left out; a group may be empty.
    """
    model = getattr(model, "module", model)
    boosted_ids = {id(p) for p in boosted}
    plain = {group["name"]: group for group in build_param_groups(model, weight_decay)}
    muon = [p for p in model.parameters() if p.requires_grad and p.ndim in (2, 4)]
    muon_ids = {id(p) for p in muon}
    sources = [(name, [p for p in plain[name]["params"] if id(p) not in muon_ids], plain[name]["weight_decay"], False)
               for name in GROUP_NAMES] + [("muon", muon, weight_decay, True)]  # fmt: skip
    groups = []
    for name, params, decay, use_muon in sources:
        for scale in (CLASS_BRANCH_LR_SCALE, 1.0):
            chosen = [p for p in params if (id(p) in boosted_ids) == (scale != 1.0)]
            groups.append({"name": name, "params": chosen, "weight_decay": decay, "use_muon": use_muon,
                           "lr_scale": scale})  # fmt: skip
    return groups
