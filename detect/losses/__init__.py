"""Registered losses and their assigners; importing the package registers them (explicit imports, STYLE §5)."""

from __future__ import annotations

from detect.losses import yolo  # noqa: F401  (registration happens on import)
