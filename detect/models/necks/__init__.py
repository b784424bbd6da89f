"""Registered necks; importing the package registers them (explicit imports, STYLE §5)."""

from __future__ import annotations

from detect.models.necks import fpn, identity, pan, pan11, pan26  # noqa: F401  (registration happens on import)
