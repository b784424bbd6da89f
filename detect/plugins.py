"""Plugin imports: the config key `imports: [my_pkg.my_parts, path/to/parts.py, ...]`, imported before anything is
built, by every tool (and by `load_detector`, from a checkpoint's config).

A plugin is an ordinary Python module that registers its parts with plugdet's decorators (`register_backbone`,
`register_neck`, `register_head`, `register_loss`); plugdet is never edited. A dotted name is imported as Python
imports it, with the current directory on the path (as `python -m` has it); a name ending in `.py` is a file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from backbones.errors import UserError


def _import_file(path: Path) -> ModuleType:
    """Import a `.py` file as a module named after its stem (once: a second import returns the first)."""
    name = f"plugdet_plugin_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_plugins(modules: Iterable[str]) -> list[ModuleType]:
    """Import plugdet's own parts, then each plugin module, in order.

    Args:
        modules: dotted module names, or paths of `.py` files.

    Returns:
        The imported modules.

    Raises:
        UserError: a plugin failed to import; one line naming the module (config key `imports`) and the error.
    """
    import backbones  # noqa: F401  (plugdet's own parts register first: a plugin's duplicate name is an error)
    import detect.losses  # noqa: F401
    import detect.models  # noqa: F401

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    imported = []
    for name in modules:
        try:
            if name.endswith(".py"):
                imported.append(_import_file(Path(name)))
            else:
                imported.append(importlib.import_module(name))
        except Exception as exc:  # any error inside the plugin's own code, reported as one line
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(
                f"cannot import plugin {name!r} (config key `imports`): {type(exc).__name__}: {detail}"
            ) from exc
    return imported
