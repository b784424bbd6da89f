"""Typed configuration: dataclass schemas, YAML files over their defaults, dotted `key=value` overrides.

A config is an OmegaConf `DictConfig` built from a dataclass schema (`ClsConfig`, `DetConfig`, in
`detect.config.schema`), so every key has a type and a default; a YAML file only lists what differs, and the command
line overrides either. An unknown key, a wrong type or a value outside a field's choices or range is a `UserError`
of one line that names the key, the value, where it came from (file and line, or the override) and the valid keys of
that section; a key that moved names its new place, and an unknown key close to a known one (or Ultralytics' name
for it: `epochs`, `imgsz`) says "did you mean". Every range is checked here, when the config is resolved, before a
tool does any work.

Only `build_*` functions and `tools/` read a config (STYLE 4); the resolved config is saved as `config.yaml` in the
run directory and as a plain dict (`config_to_dict`) in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from backbones.errors import UserError
from detect.config.help import describe_bounds, did_you_mean, is_section
from detect.config.schema import MOVED_KEYS, MOVED_VALUES


def migrate_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config with its moved keys (`MOVED_KEYS`) at their new places; other keys untouched.

    `train.amp` / `train.bf16` become `train.precision` with the numerics they ran in: bf16 if `bf16` was on (CPU or
    CUDA), else fp16 if `amp` was (fp16 ran only on CUDA, and `train.precision=fp16` on a CPU is fp32 with a warning,
    as `amp` was), else fp32.
    """
    data = {key: dict(value) if isinstance(value, Mapping) else value for key, value in data.items()}
    for old, new in MOVED_KEYS.items():
        old_section, old_key = old.split(".")
        new_section, new_key = new.split(".")
        if old in MOVED_VALUES or not isinstance(data.get(old_section), dict) or old_key not in data[old_section]:
            continue
        data.setdefault(new_section, {})[new_key] = data[old_section].pop(old_key)
    train = data.get("train")
    if isinstance(train, dict) and ("amp" in train or "bf16" in train):
        amp, bf16 = bool(train.pop("amp", False)), bool(train.pop("bf16", False))
        train.setdefault("precision", "bf16" if bf16 else "fp16" if amp else "fp32")
    return data


# ----------------------------------------------------------------------------------------------------------------------
def _section(schema: type, dotted: str) -> tuple[type, str]:
    """The dataclass holding `dotted`'s last part, and that section's dotted name ('' = top level)."""
    parts = dotted.split(".")
    cls, walked = schema, []
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or not _is_section(fields[part]):
            break
        cls = _field_type(fields[part])
        walked.append(part)
    return cls, ".".join(walked)


_is_section = is_section


def _field_type(f: dataclasses.Field) -> type:
    return f.default_factory  # sections are built by their own class


def _valid_keys_of(cls: type, prefix: str) -> str:
    """'valid keys of 'train': epochs, ...' for the section `cls` at dotted `prefix` ('' or 'train.')."""
    keys = ", ".join(f.name for f in dataclasses.fields(cls))
    name = prefix.rstrip(".")
    return f"valid keys of {name!r}: {keys}" if name else f"valid top-level keys: {keys}"


def _valid_keys(schema: type, dotted: str) -> str:
    """The valid keys of the section holding the dotted key `dotted`."""
    cls, name = _section(schema, dotted)
    return _valid_keys_of(cls, f"{name}." if name else "")


# Keys that only one data format reads: a hint naming one names the format too, since the key alone is refused under
# the default data.format=cub (`detect.data.formats.check_data_config`). `data=x.yaml` means a YOLO data set.
_FORMAT_OF_KEY = {"data.yaml": "yolo", "data.train_json": "coco", "data.val_json": "coco"}


def _hint(root: type, dotted: str, value: Any = "...") -> str:
    """' did you mean 'train.epochs'?' for an unknown key close to a known one (or named as Ultralytics names it);
    ' did you mean 'data.format=yolo data.yaml=coco8.yaml'?' when the key belongs to one data format."""
    guess = did_you_mean(root, dotted)
    if guess in _FORMAT_OF_KEY:
        shown = value if isinstance(value, str | int | float) and not isinstance(value, bool) else "..."
        return f" did you mean 'data.format={_FORMAT_OF_KEY[guess]} {guess}={shown}'?"
    return f" did you mean {guess!r}?" if guess else ""


def _flatten(
    schema: type, node: Any, prefix: str, where: Callable[[str], str], root: type | None = None
) -> dict[str, Any]:
    """Dotted leaf keys of a user mapping, each checked against the schema; unknown keys raise UserError."""
    root = root or schema
    fields = {f.name: f for f in dataclasses.fields(schema)}
    leaves: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in fields and dotted in MOVED_KEYS:
            as_new = MOVED_VALUES.get(dotted, {}).get(value) if isinstance(value, bool) else None
            how = f" ({MOVED_KEYS[dotted]}={as_new})" if as_new else ""
            raise UserError(f"config key {dotted!r} {where(dotted)} is now {MOVED_KEYS[dotted]!r}: rename it{how}")
        if key not in fields:
            raise UserError(
                f"unknown config key {dotted!r} (value {value!r}) {where(dotted)};{_hint(root, dotted, value)} "
                f"{_valid_keys_of(schema, prefix)}"
            )
        f = fields[key]
        if _is_section(f):
            if not isinstance(value, dict):
                raise UserError(
                    f"config key {dotted!r} is a section, got value {value!r} {where(dotted)};"
                    f"{_hint(root, dotted, value)} set its keys instead ({dotted}.KEY=VALUE): "
                    f"{_valid_keys_of(_field_type(f), dotted + '.')}"
                )
            leaves.update(_flatten(_field_type(f), value, dotted + ".", where, root))
        else:
            leaves[dotted] = value
    return leaves


def _yaml_lines(text: str) -> dict[str, int]:
    """1-based line of every dotted key in a YAML mapping (for error messages)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A config file as a plain dict and the line of each key; a missing or malformed file is a UserError."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"malformed YAML in {path}{line}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data, _yaml_lines(text)


def _parse_override(item: str) -> dict[str, Any]:
    """`a.b=value` -> nested dict; the value is parsed as YAML (numbers, booleans, null, [lists])."""
    key, sep, _ = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} is not KEY=VALUE (e.g. train.epochs=5)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise UserError(f"cannot parse override {item!r}: {str(exc).splitlines()[0]}") from None


def split_config_args(argv: Sequence[str], usage: str) -> tuple[str | None, list[str]]:
    """A training tool's arguments: an optional config file (the one argument without '=') and `key=value`
    overrides; anything else is one `UserError` line with the usage."""
    paths = [arg for arg in argv if "=" not in arg]
    if len(paths) > 1 or (paths and paths[0].startswith("-")):
        raise UserError(f"unexpected arguments {' '.join(paths)}; {usage}")
    return (paths[0] if paths else None), [arg for arg in argv if "=" in arg]


def named_imports(overrides: Sequence[str]) -> list[str]:
    """The plugin modules the user named in `imports=[...]` overrides (the last one wins), for tools that read a
    checkpoint: only these are ever imported (`detect.checkpoints.consent_to_plugins`)."""
    named: list[str] = []
    for item in overrides:
        if item.partition("=")[0] == "imports":
            value = _parse_override(item)["imports"]
            if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
                raise UserError(f"override {item!r}: imports is a list of module names or .py paths, e.g. "
                                "imports=[my_parts]")  # fmt: skip
            named = value
    return named


def _out_of_bounds(value: Any, meta: Mapping[str, Any]) -> bool:
    """True when a number lies outside the field's declared range (or is not its declared multiple)."""
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value < low or (meta.get("min_open") and value == low)):
        return True
    if high is not None and (value > high or (meta.get("max_open") and value == high)):
        return True
    return bool(meta.get("multiple")) and value % meta["multiple"] != 0


def _bounds_advice(value: Any, meta: Mapping[str, Any]) -> str:
    """For a size that is no multiple of the stride: the two nearest sizes that are."""
    step = meta.get("multiple")
    if not step or value % step == 0:
        return ""
    below, above = value // step * step, (value // step + 1) * step
    nearest = [str(size) for size in (below, above) if size >= (meta.get("min") or 0)]
    return f": use {' or '.join(nearest)} (sizes are multiples of the network's largest stride, {step})"


def _check_values(schema: type, cfg: DictConfig, where: Callable[[str], str], prefix: str = "") -> None:
    """Choices, ranges and multiples declared in the schema's field metadata."""
    for f in dataclasses.fields(schema):
        dotted = f"{prefix}{f.name}"
        value = cfg[f.name]
        if _is_section(f):
            _check_values(_field_type(f), value, where, dotted + ".")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise UserError(f"config key {dotted!r} = {value!r} {where(dotted)}: must be one of {', '.join(choices)}")
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if choices is None and f.metadata and numeric and _out_of_bounds(value, f.metadata):
            raise UserError(f"config key {dotted!r} = {value!r} {where(dotted)}: must be "
                            f"{describe_bounds(f.metadata)}{_bounds_advice(value, f.metadata)}")  # fmt: skip


def _check_relations(cfg: DictConfig, where: Callable[[str], str]) -> None:
    """Rules between keys: a classification crop cannot be larger than the image it is cut from."""
    data = cfg.get("data")
    if "resize_size" in (data or {}) and data.resize_size < data.img_size:
        raise UserError(f"config key 'data.resize_size' = {data.resize_size} {where('data.resize_size')}: must be >= "
                        f"data.img_size ({data.img_size}, the crop cut from the resized image)")  # fmt: skip


def _merge(schema: type, cfg: DictConfig, data: dict[str, Any], where: Callable[[str], str]) -> DictConfig:
    """Set every leaf of `data` on `cfg`, each checked: unknown key or wrong type -> UserError (one line)."""
    leaves = _flatten(schema, data, "", where)
    for dotted, value in leaves.items():
        try:
            OmegaConf.update(cfg, dotted, value, merge=True)
        except OmegaConfBaseException as exc:
            reason = str(exc).splitlines()[0]
            raise UserError(
                f"config key {dotted!r} got {value!r} {where(dotted)}: {reason}; {_valid_keys(schema, dotted)}"
            ) from None
    return cfg


def load_config(
    schema: type, path: str | Path | None = None, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None
) -> DictConfig:
    """Typed config: schema defaults, then `base`, then a YAML file, then dotted `key=value` overrides (later wins).

    Args:
        schema: `ClsConfig` or `DetConfig` (any dataclass of dataclass sections and typed leaves).
        path: a YAML file of sections (only the keys that differ), or None.
        overrides: e.g. `["train.epochs=5", "model.backbone=resnet18", "train.milestones=[3,6]"]`.
        base: a config saved in a checkpoint (plain dict), applied first (resume).

    Returns:
        A structured DictConfig: assigning a wrong type later also fails.

    Raises:
        UserError: unknown key, wrong type, value outside the field's choices or bounds, unreadable file; one line
            naming the key, the value, the file and line or the override, and the valid keys of that section.
    """
    cfg = OmegaConf.structured(schema)
    origins: dict[str, str] = {}
    if base is not None:
        cfg = _merge(schema, cfg, migrate_config(base), lambda key: "in the checkpoint's config")
    if path is not None:
        path = Path(path)
        data, lines = _read_yaml(path)

        def in_file(key: str) -> str:
            return f"in {path}, line {lines[key]}" if key in lines else f"in {path}"

        cfg = _merge(schema, cfg, data, in_file)
        origins.update({key: in_file(key) for key in _flatten(schema, data, "", in_file)})
    for item in overrides:
        data = _parse_override(item)

        def in_override(key: str, item: str = item) -> str:
            return f"in override {item!r}"

        cfg = _merge(schema, cfg, data, in_override)
        origins.update({key: in_override(key) for key in _flatten(schema, data, "", in_override)})

    def where(key: str) -> str:
        return origins.get(key, "(default)" if base is None else "(checkpoint config)")

    _check_values(schema, cfg, where)
    _check_relations(cfg, where)
    return cfg


def config_to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python data (what a checkpoint stores)."""
    return OmegaConf.to_container(cfg, resolve=True)


def config_to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (what a run directory's config.yaml holds)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


_WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def _looks_like_path(value: str) -> bool:
    """A file path rather than a registry-style name such as torchvision's "IMAGENET1K_V1"."""
    return "/" in value or "\\" in value or value.lower().endswith(_WEIGHT_SUFFIXES)


def check_input_files(cfg: DictConfig, keys: Sequence[str], ways_out: Mapping[str, str] | None = None) -> None:
    """Each dotted key of `keys` that names a file must name one: a folder or a missing path is one line naming the
    key (`ways_out[key]` adds what to do instead). Names that are not paths (torchvision weights names) pass.

    Raises:
        UserError: "model.backbone_weights=runs/x is a folder, not a checkpoint file", or "... no such file; ...".
    """
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not value:
            continue
        path = Path(str(value))
        if path.is_dir():
            raise UserError(f"{key}={value} is a folder, not a checkpoint file (e.g. {path / 'last.pt'})")
        if not path.exists() and _looks_like_path(str(value)):
            extra = (ways_out or {}).get(key)
            raise UserError(f"{key}={value}: no such file" + (f"; {extra}" if extra else ""))


def answer_info_flags(
    argv: Sequence[str], doc: str, usage: str, schema: type, resolve: Callable[[list[str]], Any]
) -> bool:
    """A tool's information flags: `--help` lists every key of `schema` with its default and range; `--print-config`
    prints the config `resolve` makes of the other arguments. Prints the answer and returns True when one was asked."""
    if {"-h", "--help"} & set(argv):
        from detect.config.help import tool_help

        print(tool_help(doc, usage, schema))
        return True
    if "--print-config" in argv:
        print(config_to_yaml(resolve([arg for arg in argv if arg != "--print-config"])), end="")
        return True
    return False
