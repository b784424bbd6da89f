"""What a user can learn about the config keys without reading code: `--help` text and "did you mean" hints.

Both are generated from the schema (`detect.config.schema`): a field's default, its range or choices (field metadata)
and its help text (the field's trailing comment). Light on purpose: it imports no torch, no OmegaConf, so that
`tools/train_det.py --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import sys
from collections.abc import Mapping
from typing import Any

from detect.config.schema import ULTRALYTICS_KEYS

_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$")


def is_section(f: dataclasses.Field) -> bool:
    """A field whose default is a dataclass instance built by its factory: a section such as `train`."""
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The trailing comment of every field of the dataclass `cls` (its help text), by field name."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_COMMENT.match, source.splitlines()) if m}


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_bounds(metadata: Mapping[str, Any]) -> str:
    """'one of a, b', '>= 1', 'in [0, 1)', 'a multiple of 32, >= 32', or '' for a field without bounds."""
    if "choices" in metadata:
        return "one of " + ", ".join(metadata["choices"])
    low, high = metadata.get("min"), metadata.get("max")
    text = ""
    if low is not None and high is not None:
        left = "(" if metadata.get("min_open") else "["
        right = ")" if metadata.get("max_open") else "]"
        text = f"in {left}{_number(low)}, {_number(high)}{right}"
    elif low is not None:
        text = f">= {_number(low)}"
    if metadata.get("multiple"):
        text = f"a multiple of {metadata['multiple']}" + (f", {text}" if text else "")
    return text


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | dict):
        return str(value)
    return str(value)


def leaf_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a schema, in schema order ('data.root', ..., 'seed')."""
    keys: list[str] = []
    for f in dataclasses.fields(schema):
        if is_section(f):
            keys += leaf_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def schema_help(schema: type) -> str:
    """Every section and key of `schema` with its default, range or choices, and help text (for `--help`)."""
    lines: list[str] = []

    def walk(cls: type, prefix: str, indent: str) -> None:
        comments = field_comments(cls)
        leaves = [f for f in dataclasses.fields(cls) if not is_section(f)]
        width = max((len(f"{prefix}{f.name}={_show(_default(f))}") for f in leaves), default=0)
        for f in dataclasses.fields(cls):
            if is_section(f):
                lines.append(f"{indent}{f.name}:")
                walk(f.default_factory, f"{prefix}{f.name}.", indent + "  ")
                continue
            head = f"{prefix}{f.name}={_show(_default(f))}"
            notes = "; ".join(part for part in (describe_bounds(f.metadata), comments.get(f.name, "")) if part)
            lines.append(f"{indent}{head:<{width}}  {notes}".rstrip())

    walk(schema, "", "  ")
    return "\n".join(lines)


def did_you_mean(schema: type, dotted: str) -> str | None:
    """The known key a user probably meant by the unknown `dotted`: Ultralytics' name for it (`imgsz` ->
    `data.img_size`), the same key name in another section, or the closest spelling; None when nothing is close."""
    keys = leaf_keys(schema)
    last = dotted.split(".")[-1]
    for name in (dotted, last):
        target = ULTRALYTICS_KEYS.get(name)
        if target in keys and target != dotted:
            return target
    same_name = [key for key in keys if key.split(".")[-1] == last and key != dotted]
    if len(same_name) == 1:
        return same_name[0]
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    by_leaf = difflib.get_close_matches(last, [key.split(".")[-1] for key in keys], n=1, cutoff=0.75)
    if by_leaf:
        matches = [key for key in keys if key.split(".")[-1] == by_leaf[0]]
        section = dotted.rpartition(".")[0]
        same_section = [key for key in matches if key.rpartition(".")[0] == section]
        return (same_section or matches)[0]
    return None


def exit_with_help_if_asked(doc: str | None, usage: str, schema_name: str) -> None:
    """A training tool's `-h` / `--help`, answered from the schema alone (no torch imported) before anything else:
    print `tool_help` for `detect.config.schema.<schema_name>` and exit 0; otherwise return."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        from detect.config import schema

        print(tool_help(doc, usage, getattr(schema, schema_name)))
        sys.exit(0)


def tool_help(doc: str | None, usage: str, schema: type) -> str:
    """A training tool's `--help`: its docstring, the usage line and every config key (`schema_help`)."""
    return f"{(doc or '').strip()}\n\n{usage}\n\nconfig keys (key=default  range; what it is):\n{schema_help(schema)}"
