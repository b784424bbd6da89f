"""plugdet detection: config, data, YOLOv8-style neck/head/loss, training and evaluation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
