"""plugdet detection: config, data, pluggable detectors (registered necks, heads, losses), training, evaluation."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# No network at run time (DESIGN §1): albumentations asks PyPI for a newer version when it is imported unless told
# not to. Every import of plugdet's detection code passes here first, tools and library use alike.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

if TYPE_CHECKING:
    from detect.api import load
    from detect.models import Detector, DetectorSpec, PartSpec, build_detector, build_yolo

__all__ = ["Detector", "DetectorSpec", "PartSpec", "build_detector", "build_yolo", "load"]


def __getattr__(name: str) -> Any:
    """Resolve `detect.load`, `detect.Detector`, `detect.build_yolo`, ... on first use (PEP 562).

    Lazy so that `import detect.boxes` (or any light submodule) does not build the model stack and its imports.
    """
    if name == "load":
        from detect.api import load

        return load
    if name in __all__:
        from detect import models

        return getattr(models, name)
    raise AttributeError(f"module 'detect' has no attribute {name!r}")
