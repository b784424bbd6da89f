"""Freezing a backbone, wholly or its first k stages, and keeping its frozen BatchNorm layers in eval mode."""

from __future__ import annotations

from torch import nn

from backbones.errors import UserError


def freeze_stages(backbone: nn.Module, num_stages: int) -> int:
    """Sets `requires_grad = False` on the parameters of the first `num_stages` of `backbone.stage_modules()`.

    Args:
        backbone: a backbone (has `stage_modules()`, shallow to deep, stem first).
        num_stages: how many stages to freeze; -1 freezes the whole backbone, 0 nothing.

    Returns:
        The number of parameter tensors frozen by this call (already frozen ones are not counted).

    Raises:
        UserError: `num_stages` below -1 or above the backbone's number of stages.
    """
    stages = backbone.stage_modules()
    if num_stages == -1:
        modules = [backbone]
    elif 0 <= num_stages <= len(stages):
        modules = stages[:num_stages]
    else:
        raise UserError(
            f"freeze: cannot freeze {num_stages} stages of a backbone with {len(stages)} (use -1 for all, 0 for none)"
        )
    frozen = 0
    seen: set[int] = set()
    for module in modules:
        for param in module.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += 1
    return frozen


def keep_frozen_bn_eval(model: nn.Module) -> None:
    """Puts every BatchNorm whose parameters are all frozen into eval mode; call it after `model.train()`.

    In eval mode a BatchNorm normalises with its running statistics and leaves them unchanged, so a frozen layer
    stays exactly as it was loaded. BatchNorm layers without parameters (affine=False) are left alone.

    Args:
        model: any module (a detector, a classifier, a backbone).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
