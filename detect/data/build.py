"""Build a detection source from the `data` section of a detection config (the one place that reads it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backbones.errors import UserError

SPLITS = ("train", "val")


def build_source(data: Any, split: str) -> Any:
    """The detection source of one split.

    Args:
        data: the config's `data` section (`format`, `root`, `labels`, `train_json`, `val_json`, `image_dir`, `yaml`).
        split: "train" or "val" (CUB: the official train / test split).

    Returns:
        A detection source (`detect/data/source.py`): `CubDetection`, `CocoDetection` or `YoloDetection`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data.format == "cub":
        from detect.data.cub import CubDetection

        return CubDetection(data.root, split="train" if split == "train" else "test", labels=data.labels)
    if data.format == "coco":
        from detect.data.coco import CocoDetection

        key = "data.train_json" if split == "train" else "data.val_json"
        json_path = data.train_json if split == "train" else data.val_json
        if not json_path:
            raise UserError(f"data.format=coco needs {key} (a COCO instances json)")
        return CocoDetection(Path(json_path), image_dir=data.image_dir)
    if data.format == "yolo":
        from detect.data.yolo import YoloDetection

        if not data.yaml:
            raise UserError("data.format=yolo needs data.yaml (an Ultralytics data.yaml)")
        return YoloDetection(Path(data.yaml), split=split)
    raise UserError(f"unknown data.format {data.format!r}: choose cub, coco or yolo")
