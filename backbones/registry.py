"""Registries: a dict of factories plus a decorator (STYLE §5), one per kind of part.

`Registry` is the shape every plugdet registry has (backbones here; necks, heads and losses in
`detect.models.registry`): a duplicate name is an error, an unknown name lists the choices. A backbone factory is any
callable `(**kwargs) -> nn.Module` whose module follows the backbone contract (DESIGN §3): `forward(x [B, 3, H, W])
-> list` of three maps at strides 8, 16, 32, attributes `out_channels` and `strides`, and `stage_modules()`.
Families such as `tv:<name>` register a resolver for every name under their prefix.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

from backbones.errors import UserError

Factory = Callable[..., Any]
BackboneFactory = Callable[..., nn.Module]


class Registry:
    """Named factories of one kind of part.

    Args:
        kind: what the factories build ("backbone", "neck", ...), used in messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Factory] = {}

    def register(self, name: str) -> Callable[[Factory], Factory]:
        """Decorator registering a factory under `name`; a name registered twice is a ValueError (a programming
        error, not a user error) naming the module that registered it first."""

        def decorator(factory: Factory) -> Factory:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._factories[name].__module__})")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str, also: str = "") -> Factory:
        """The factory registered as `name`; an unknown name is a UserError listing the registered ones (and `also`,
        other accepted forms)."""
        if name not in self._factories:
            raise UserError(
                f"unknown {self.kind} {name!r}: registered {self.kind}s are {', '.join(self.names()) or '(none)'}"
                + (f"; also {also}" if also else "")
                + " (a part of your own registers in a module named by the config key `imports`)"
            )
        return self._factories[name]


def check_keywords(factory: Factory, kwargs: Mapping[str, Any], what: str, skip: int = 0) -> None:
    """No setting is dropped in silence, and none fails deep inside a factory: a keyword `factory` does not take
    (and it has no `**kwargs`) is one UserError line naming it and the keywords it does take.

    Args:
        factory: the registered callable.
        kwargs: the keywords a config gives it (e.g. `model.head_kwargs`).
        what: how the message names them, e.g. "model.head_kwargs of head 'yolov8'".
        skip: leading positional parameters the caller fills itself (e.g. a head's num_classes, in_channels, strides).
    """
    try:
        params = list(inspect.signature(factory).parameters.values())[skip:]
    except (TypeError, ValueError):  # a builtin or C callable: it checks its own arguments
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(f"{what} has no setting {', '.join(map(repr, unknown))}: it takes "
                        f"{', '.join(accepted) or 'none'}")  # fmt: skip


@contextlib.contextmanager
def keyword_errors(what: str) -> Iterator[None]:
    """A factory that passes its `**kwargs` on (torchvision's, timm's models, torchvision's detector families) learns
    of a keyword it does not take only inside: its TypeError becomes the same one line as `check_keywords`'."""
    try:
        yield
    except TypeError as exc:
        match = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        if match is None:
            raise
        raise UserError(f"{what} has no setting {match.group(1)!r} ({exc})") from None


BACKBONES = Registry("backbone")
_FAMILIES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering a backbone factory under `name` (the name users pass to `build_backbone`).

    Raises:
        ValueError: `name` is already registered.
    """
    return BACKBONES.register(name)


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
    return BACKBONES.names()


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
    what = f"model.backbone_kwargs of backbone {name!r}"
    if name not in BACKBONES:
        for prefix, resolver in _FAMILIES.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                check_keywords(resolver, kwargs, what, skip=1)
                with keyword_errors(what):
                    return resolver(name[len(prefix) :], **kwargs)
    families = ", ".join(f"{prefix}<name>" for prefix in sorted(_FAMILIES))
    factory = BACKBONES.get(name, also=families)
    check_keywords(factory, kwargs, what)
    with keyword_errors(what):
        return factory(**kwargs)
