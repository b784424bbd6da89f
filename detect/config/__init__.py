"""Configuration: the typed schema of every key (`schema`), loading and checking YAML and `key=value` overrides
(`loading`), and the tools' `--help` drawn from the schema (`help`).

`from detect.config import load_config, DetConfig, ...` resolves here on first use (PEP 562), so that
`detect.config.schema` and `detect.config.help` stay importable without torch (`tools/train_det.py --help`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detect.config.loading import (
        answer_info_flags,
        check_input_files,
        config_to_dict,
        config_to_yaml,
        load_config,
        migrate_config,
        named_imports,
        split_config_args,
    )
    from detect.config.schema import ClsConfig, ClsDataConfig, DetConfig, DetDataConfig

_FROM_SCHEMA = ("ClsConfig", "ClsDataConfig", "DetConfig", "DetDataConfig")
_FROM_LOADING = ("answer_info_flags", "check_input_files", "config_to_dict", "config_to_yaml", "load_config",
                 "migrate_config", "named_imports", "split_config_args")  # fmt: skip
__all__ = ["ClsConfig", "ClsDataConfig", "DetConfig", "DetDataConfig", "answer_info_flags", "check_input_files",
           "config_to_dict", "config_to_yaml", "load_config", "migrate_config", "named_imports",
           "split_config_args"]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _FROM_SCHEMA:
        from detect.config import schema

        return getattr(schema, name)
    if name in _FROM_LOADING:
        from detect.config import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'detect.config' has no attribute {name!r}")
