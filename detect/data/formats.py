"""Data formats: `data.format` names a registered factory of detection sources (the shape of every plugdet registry).

A format of your own registers in your own module, and the config key `imports: [your_module_or_file.py]` imports it
before anything is built (`detect.plugins.import_plugins`); plugdet is never edited::

    from detect.data.formats import register_format

    @register_format("voc", keys=("root", "options.annotations_dir"))
    def voc(data, split):  # the config's `data` section; "train" or "val"
        return VocDetection(data.root, split, data.options.get("annotations_dir", "Annotations"))

`tests/plugins/voc_format.py` is such a module, whole. A factory `(data, split) -> DetectionSource` returns a
detection source (`detect.data.source.DetectionSource`: images, xyxy pixel boxes, contiguous labels) of one split.

Each format declares the `data.*` keys it reads, besides those plugdet reads for every format (`format`, `root`,
`img_size`, `cache`): shared schema keys by name (`labels`, `train_json`, `val_json`, `image_dir`, `yaml`; `root`
may be listed too) and its own keys, which live in `data.options`, as `options.<name>`. `check_data_config`, which
`build_source` calls first (before any run directory exists), holds the data section to that declaration, each
problem one line (`UserError`, exit code 2):

- an unknown `data.format` lists the registered formats;
- a `data.options` key the format does not declare names the key and the keys the format accepts;
- a shared key that only other formats read, set to a value other than its default, names the key and its format
  (`data.yaml is a setting of data.format=yolo, but data.format is cub: add data.format=yolo, ...`): a setting is
  never dropped in silence, and a run never trains on the default synthetic CUB while the user's data set is ignored.

`data.root` is exempt from the last rule: it is the one location key every tool prints, and its default names the
synthetic mini-CUB. The built-in formats (cub, coco, yolo) register at the bottom of this module, exactly as a user's
would; their readers are imported only when a source is built.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from backbones.errors import UserError
from backbones.registry import Registry
from detect.config.schema import DetDataConfig

if TYPE_CHECKING:
    from detect.data.source import DetectionSource

SPLITS = ("train", "val")
COMMON_KEYS = ("format", "root", "img_size", "cache", "options")  # read by plugdet for every format: never a conflict
SHARED_KEYS = tuple(f.name for f in dataclasses.fields(DetDataConfig) if f.name not in COMMON_KEYS)
_OPTION = re.compile(r"options\.([A-Za-z_][A-Za-z0-9_]*)")
FormatFactory = Callable[[Any, str], "DetectionSource"]

FORMATS = Registry("data format")
FORMAT_KEYS: dict[str, tuple[str, ...]] = {}  # format -> the data.* keys it declared (`register_format(keys=...)`)


def register_format(name: str, keys: Sequence[str] = ()) -> Callable[[FormatFactory], FormatFactory]:
    """Decorator registering a detection-source factory `(data, split) -> DetectionSource` as `data.format=name`.

    Args:
        name: the value of `data.format` that selects the factory.
        keys: the `data.*` keys the factory reads beyond `format`, `img_size` and `cache`: shared ones by name
            ("root", "labels", "train_json", "val_json", "image_dir", "yaml") and the format's own, set in
            `data.options`, as "options.<name>".

    Raises:
        ValueError: `name` is already registered, or a key is neither a shared key nor "options.<identifier>"
            (programming errors, raised when the module registering the format is imported).
    """
    for key in keys:
        if key != "root" and key not in SHARED_KEYS and not _OPTION.fullmatch(key):
            raise ValueError(f"data format {name!r} declares key {key!r}: a format's keys are root, "
                             f"{', '.join(SHARED_KEYS)} or its own options.<name>")  # fmt: skip
    register = FORMATS.register(name)

    def decorator(factory: FormatFactory) -> FormatFactory:
        factory = register(factory)  # a duplicate name raises here, before the keys are recorded
        FORMAT_KEYS[name] = tuple(keys)
        return factory

    return decorator


def list_formats() -> list[str]:
    """The registered data formats, sorted (the values `data.format` takes)."""
    return FORMATS.names()


def format_options(name: str) -> tuple[str, ...]:
    """The `data.options` keys that format `name` declares."""
    return tuple(match.group(1) for key in FORMAT_KEYS.get(name, ()) if (match := _OPTION.fullmatch(key)))


def _default(key: str) -> Any:
    """The schema default of `data.<key>`."""
    return next(f.default for f in dataclasses.fields(DetDataConfig) if f.name == key)


def check_data_config(data: Any) -> FormatFactory:
    """Check the `data` section against its format's declared keys (see the module docstring); return its factory.

    Raises:
        UserError: unknown format, undeclared `data.options` key, or another format's key set; one line each.
    """
    name = str(data.format)
    if name not in FORMATS:
        raise UserError(f"unknown data.format {name!r}: registered formats are {', '.join(list_formats())} (a format "
                        "of your own registers with detect.data.formats.register_format in a module named by the "
                        "config key `imports`)")  # fmt: skip
    accepted = format_options(name)
    for key in getattr(data, "options", None) or {}:
        if key not in accepted:
            takes = f"accepts {', '.join(accepted)}" if accepted else "has no options"
            raise UserError(f"unknown key data.options.{key} for data.format={name}: that format {takes}")
    declared = FORMAT_KEYS[name]
    for key in SHARED_KEYS:
        value = getattr(data, key, _default(key))
        if key in declared or value == _default(key):
            continue
        owners = [other for other in list_formats() if key in FORMAT_KEYS[other]]
        if owners:
            formats = " or ".join(f"data.format={other}" for other in owners)
            default = "null" if _default(key) is None else _default(key)
            raise UserError(f"data.{key} is a setting of {formats}, but data.format is {name}: add "
                            f"data.format={owners[0]}, or set data.{key}={default} (its default) if it is not meant "
                            "for this run")  # fmt: skip
    return FORMATS.get(name)


def build_source(data: Any, split: str) -> DetectionSource:
    """The detection source of one split, built by the factory registered as `data.format`.

    Args:
        data: the config's `data` section (`DetDataConfig`: format, root, the format's keys, options).
        split: "train" or "val" (CUB: the official train / test split).

    Returns:
        A detection source (`detect/data/source.py`), e.g. `CubDetection`, `CocoDetection` or `YoloDetection`.

    Raises:
        UserError: the section does not fit the format (`check_data_config`), or the reader's own one-line errors.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from detect.data.source import DetectionSource  # the readers' module (OpenCV, PIL): imported once data is read

    factory = check_data_config(data)
    source = factory(data, split)
    if not isinstance(source, DetectionSource):
        raise UserError(f"data.format={data.format} built a {type(source).__name__}, not a detection source (it "
                        "needs class_names, category_ids, image_ids, __len__, image_path, image_size, load_image "
                        "and annotations: detect/data/source.py)")  # fmt: skip
    return source


# ----------------------------------------------------------------------------------------------------------------------
# The built-in formats, registered as a plugin's would be. Readers are imported when a source is built.
# ----------------------------------------------------------------------------------------------------------------------
@register_format("cub", keys=("root", "labels"))
def cub_format(data: Any, split: str) -> DetectionSource:
    """CUB_200_2011 under `data.root` (`detect/data/cub.py`); "val" is the official test split."""
    from detect.data.cub import CubDetection

    return CubDetection(data.root, split="train" if split == "train" else "test", labels=data.labels)


@register_format("coco", keys=("train_json", "val_json", "image_dir"))
def coco_format(data: Any, split: str) -> DetectionSource:
    """A COCO instances json per split (`detect/data/coco.py`), images under `data.image_dir`."""
    from pathlib import Path

    from detect.data.coco import CocoDetection

    key = "data.train_json" if split == "train" else "data.val_json"
    json_path = data.train_json if split == "train" else data.val_json
    if not json_path:
        raise UserError(f"data.format=coco needs {key} (a COCO instances json)")
    return CocoDetection(Path(json_path), image_dir=data.image_dir)


@register_format("yolo", keys=("yaml",))
def yolo_format(data: Any, split: str) -> DetectionSource:
    """An Ultralytics data set: `data.yaml` names its image folders (`detect/data/yolo_txt.py`)."""
    from pathlib import Path

    from detect.data.yolo_txt import YoloDetection

    if not data.yaml:
        raise UserError("data.format=yolo needs data.yaml (an Ultralytics data.yaml)")
    return YoloDetection(Path(data.yaml), split=split)
