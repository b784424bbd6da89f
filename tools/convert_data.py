"""Convert the configured detection data set: `python tools/convert_data.py --to coco|yolo --out DIR [CFG] [k=v]`.

Reads the `data` section of a detection config (default `configs/det/default.yaml`: the synthetic mini-CUB, bird
labels; any `data.format` cub / coco / yolo with its keys, e.g. `data.root=/data/CUB data.labels=species`) and writes
its train and val splits (CUB: the official train / test split):

- `--to coco`: `DIR/train.json` and `DIR/val.json` (COCO instances ground truth: category ids of the data set,
  `iscrowd` 0, `area` w*h, bbox xywh). Images are referenced in place by absolute path, or relative to
  `--relative-to FOLDER` (then read back with `data.image_dir=FOLDER`).
- `--to yolo`: an Ultralytics data set in DIR (`images/{train,val}` as links to the images, `labels/{train,val}`,
  `data.yaml`), which `YOLO(...).train(data="DIR/data.yaml")` and `data.format=yolo data.yaml=DIR/data.yaml` read.

(Model export is `tools/export.py`.) An existing non-empty target is an error unless `--overwrite`.
Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from backbones.checkpoint import atomic_write_bytes
from backbones.errors import UserError
from detect.cli import exit_process, run_tool
from detect.config import DetConfig, load_config
from detect.data.build import SPLITS, build_source
from detect.data.coco import coco_ground_truth
from detect.data.yolo_txt import export_yolo
from detect.plugins import import_plugins

USAGE = (
    "usage: convert_data.py --to coco|yolo --out DIR [--overwrite] [--relative-to FOLDER] [CONFIG.yaml] [key=value ...]"
)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "det" / "default.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse that raises `UserError` (one line, exit 2 through `run_tool`) instead of exiting itself."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; {USAGE}")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, str | None, list[str]]:
    """Options, the optional config file (the one positional argument without '=') and key=value overrides."""
    parser = _Parser(prog="convert_data.py", description=__doc__.strip().splitlines()[0], add_help=False)
    parser.add_argument("--to", required=True, choices=("coco", "yolo"), help="output format")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files / split folders")
    parser.add_argument("--relative-to", default=None, help="coco: file_name relative to this folder")
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith("-")]
    if unknown:
        raise UserError(f"unknown option {unknown[0]}; {USAGE}")
    paths = [arg for arg in rest if "=" not in arg]
    if len(paths) > 1:
        raise UserError(f"expected at most one config file, got {', '.join(paths)}; {USAGE}")
    return args, (paths[0] if paths else None), [arg for arg in rest if "=" in arg]


def _write_json(data: dict[str, Any], path: Path) -> None:
    """Write through a temp file in the same folder and `os.replace` (never half a file)."""
    atomic_write_bytes(json.dumps(data).encode("utf-8"), path)


def export_coco(source: Any, path: Path, relative_to: Path | None) -> int:
    """COCO ground truth of one split; `file_name` absolute, or relative to `relative_to` where the image lies inside.

    Returns:
        The number of annotations written.
    """
    gt = coco_ground_truth(source, image_dir=relative_to)
    if relative_to is None:
        for index, image in enumerate(gt["images"]):  # listed in source order
            image["file_name"] = str(source.image_path(index).resolve())
    _write_json(gt, path)
    return len(gt["annotations"])


def _targets(to: str, out: Path) -> list[Path]:
    """What an export writes per split (checked before anything is written)."""
    if to == "coco":
        return [out / f"{split}.json" for split in SPLITS]
    return [out / kind / split for kind in ("images", "labels") for split in SPLITS]


def export_dataset(data: Any, to: str, out: Path, overwrite: bool = False, relative_to: Path | None = None) -> Path:
    """Export the train and val splits of a config's `data` section.

    Both sources are read and every target is checked before anything is written, so bad input leaves no half
    export behind.

    Args:
        data: the config's `data` section (read by `detect.data.build.build_source`).
        to: "coco" or "yolo".
        out: output folder (created).
        overwrite: replace existing targets; otherwise an existing json or non-empty split folder is a `UserError`.
        relative_to: coco only: make `file_name`s relative to this folder.

    Returns:
        The file a trainer reads: `out/data.yaml` (yolo) or `out/val.json` (coco).
    """
    sources = {split: build_source(data, split) for split in SPLITS}
    for split, source in sources.items():
        if len(source) == 0:
            raise UserError(f"empty split '{split}' in the configured data ({data.format}, root {data.root})")
    for target in _targets(to, out):
        busy = target.is_file() or (target.is_dir() and any(target.iterdir()))
        if busy and not overwrite:
            raise UserError(f"export target exists (pass --overwrite to replace it): {target}")
    out.mkdir(parents=True, exist_ok=True)
    result = out / ("data.yaml" if to == "yolo" else "val.json")
    for split, source in sources.items():
        if to == "yolo":
            result = export_yolo(source, out, split_name=split, overwrite=overwrite)
            count = sum(len(source.annotations(i)[1]) for i in range(len(source)))
        else:
            count = export_coco(source, out / f"{split}.json", relative_to)
        print(f"{split}: {len(source)} images, {count} boxes, {len(source.class_names)} classes -> {out}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    args, path, overrides = parse_args(argv)
    if args.relative_to is not None and args.to != "coco":
        raise UserError("--relative-to applies to --to coco only")
    if path is None and DEFAULT_CONFIG.is_file():
        path = str(DEFAULT_CONFIG)
    cfg = load_config(DetConfig, path, overrides)
    import_plugins(cfg.imports)
    relative_to = Path(args.relative_to) if args.relative_to else None
    result = export_dataset(cfg.data, args.to, Path(args.out), args.overwrite, relative_to)
    print(f"done: {result}")
    return 0


if __name__ == "__main__":
    exit_process(run_tool(main))
