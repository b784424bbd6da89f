"""plugdet detection: config, data, YOLOv8-style neck/head/loss, training and evaluation."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# No network at run time (DESIGN §1): albumentations asks PyPI for a newer version when it is imported unless told
# not to. Every import of plugdet's detection code passes here first, tools and library use alike.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

if TYPE_CHECKING:
    from detect.model import Detector, build_detector

__all__ = ["Detector", "build_detector"]


def __getattr__(name: str) -> Any:
    """Resolve `detect.Detector` / `detect.build_detector` on first use (PEP 562).

    Lazy so that `import detect.boxes` (or any light submodule) does not build the model stack and its imports.
    """
    if name in __all__:
        from detect import model

        return getattr(model, name)
    raise AttributeError(f"module 'detect' has no attribute {name!r}")
