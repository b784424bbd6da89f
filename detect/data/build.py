"""Build a detection source from the `data` section of a detection config: `data.format` picks a registered format.

The registry, the checks of the `data` section and the built-in formats live in `detect.data.formats`; this module
keeps the names that tools, the API and the benches import.
"""

from __future__ import annotations

from detect.data.formats import SPLITS, build_source, check_data_config, list_formats, register_format

__all__ = ["SPLITS", "build_source", "check_data_config", "list_formats", "register_format"]
