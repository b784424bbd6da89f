"""Backbone registry: a dict of factories plus a decorator (STYLE §5).

A factory is any callable `(**kwargs) -> nn.Module` whose module follows the backbone contract (DESIGN §3):
`forward(x [B, 3, H, W]) -> list` of three maps at strides 8, 16, 32, attributes `out_channels` and `strides`,
and `stage_modules()`. Families such as `tv:<name>` register a resolver for every name under their prefix.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from backbones.errors import UserError

BackboneFactory = Callable[..., nn.Module]

_FACTORIES: dict[str, BackboneFactory] = {}
_FAMILIES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering `factory` under `name`.

    Args:
        name: the name users pass to `build_backbone`.

    Returns:
        A decorator that registers the factory and returns it unchanged.

    Raises:
        ValueError: `name` is already registered (a programming error, not a user error).
    """

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _FACTORIES:
            raise ValueError(f"backbone {name!r} is already registered (by {_FACTORIES[name].__module__})")
        _FACTORIES[name] = factory
        return factory

    return decorator


def register_backbone_family(prefix: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a resolver `(suffix, **kwargs) -> nn.Module` for every name starting with `prefix`.

    Names registered with `register_backbone` take precedence; a family resolves the others on demand.

    Args:
        prefix: e.g. "tv:".

    Returns:
        A decorator that registers the resolver and returns it unchanged.
    """

    def decorator(resolver: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if prefix in _FAMILIES:
            raise ValueError(f"backbone family {prefix!r} is already registered")
        _FAMILIES[prefix] = resolver
        return resolver

    return decorator


def list_backbones() -> list[str]:
    """Returns the registered backbone names, sorted (families' on-demand names are not listed)."""
    return sorted(_FACTORIES)


def build_backbone(name: str, **kwargs: object) -> nn.Module:
    """Builds a registered backbone.

    Args:
        name: a name from `list_backbones()`, or `<prefix><suffix>` for a registered family (e.g. "tv:resnet18").
        **kwargs: passed to the factory (e.g. `weights`).

    Returns:
        The backbone module.

    Raises:
        UserError: unknown name; the message lists the registered names.
    """
    if name in _FACTORIES:
        return _FACTORIES[name](**kwargs)
    for prefix, resolver in _FAMILIES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return resolver(name[len(prefix) :], **kwargs)
    families = ", ".join(f"{prefix}<name>" for prefix in sorted(_FAMILIES))
    raise UserError(
        f"unknown backbone {name!r}: registered backbones are {', '.join(list_backbones())}"
        + (f"; also {families}" if families else "")
    )
