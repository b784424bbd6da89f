"""Registered head families; importing the package registers them (explicit imports, STYLE §5)."""

from __future__ import annotations

from detect.models.heads import detr, torchvision, yolo, yolo26  # noqa: F401  (registration happens on import)
