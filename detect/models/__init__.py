"""The detector and its registered parts: `build_detector(DetectorSpec(...))`, `build_yolo(scale, num_classes)`.

Importing the package registers plugdet's own necks and heads (explicit imports, STYLE §5); `detect.losses`
registers the losses.
"""

from __future__ import annotations

from detect.models import heads, necks  # noqa: F401  (registration happens on import)
from detect.models.build import DetectorSpec, PartSpec, build_detector
from detect.models.detector import Detector
from detect.models.yolo_family import build_yolo, yolo_spec

__all__ = ["Detector", "DetectorSpec", "PartSpec", "build_detector", "build_yolo", "yolo_spec"]
