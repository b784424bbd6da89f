"""Helpers the test files share (the fixtures built on them are in tests/conftest.py).

- `load_tool(name)`: tools/<name>.py as a fresh module, to call its `main(argv)` in-process.
- `randomize_bn(module, seed)`: BatchNorm statistics and affine terms far from the identity, so that a folding, a
  weight-mapping or a parity mistake shows in the outputs.
- `save_untrained_detector(path, data_root)`: a train_det-format checkpoint of an untrained 1-class YOLOv8n, for
  tests of input handling that need weights but no training.
- `assert_same_evaluation(found, stored)`: val_det's metrics.json against the `metrics` of the checkpoint it read.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a new module object on every call (what a test monkeypatches on it stays with it)."""
    spec = importlib.util.spec_from_file_location(f"plugdet_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def randomize_bn(module: nn.Module, seed: int = 0, generator: torch.Generator | None = None) -> nn.Module:
    """Every BatchNorm2d gets running mean N(0, 0.1^2), running var U(0.5, 1), weight U(0.75, 1.25), bias N(0, 0.1^2),
    drawn from `generator` (default: a new one seeded with `seed`) in module order; returns `module`."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
            bn.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            bn.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return module


def save_untrained_detector(path: Path, data_root: Path, img_size: int = 64, seed: int = 0) -> Path:
    """An untrained 1-class YOLOv8n (seeded initialisation) saved as train_det saves best.pt, with a config that reads
    `data_root` (bird labels) at `img_size`; returns `path`."""
    from backbones.checkpoint import atomic_save
    from detect.checkpoints import detector_checkpoint
    from detect.config import DetConfig, config_to_dict, load_config
    from detect.models import build_yolo

    cfg = load_config(DetConfig, None, [f"data.root={data_root}", f"data.img_size={img_size}", "train.workers=0",
                                        "train.batch_size=4", "model.backbone_weights=null"])  # fmt: skip
    torch.manual_seed(seed)
    arch = {"scale": "n", "num_classes": 1, "backbone": None, "reg_max": 16}
    atomic_save(detector_checkpoint(build_yolo("n", 1), arch, ["bird"], [1], config_to_dict(cfg), {}, 1), path)
    return path


def assert_same_evaluation(found: Mapping[str, Any], stored: Mapping[str, Any], tol: float = 1e-6) -> None:
    """`found` (val_det's metrics.json) holds the evaluation `stored` (the `metrics` train_det saved with the weights
    val_det read): the 12 COCO numbers, AP and AP50 within `tol`, and the same per-class AP."""
    assert len(found["coco_stats"]) == len(stored["coco_stats"]) == 12
    for k, (a, b) in enumerate(zip(found["coco_stats"], stored["coco_stats"], strict=True)):
        assert abs(a - b) <= tol, (k, found["coco_stats"], stored["coco_stats"])
    for key in ("AP", "AP50"):
        assert abs(found[key] - stored[key]) <= tol, (key, found[key], stored[key])
    assert found["per_class_AP"].keys() == stored["per_class_AP"].keys()
    for name, ap in stored["per_class_AP"].items():
        other = found["per_class_AP"][name]
        assert (math.isnan(ap) and math.isnan(other)) or abs(ap - other) <= tol, (name, other, ap)


ULTRALYTICS_ASSETS = Path(importlib.util.find_spec("ultralytics").origin).parent / "assets"
PHOTOS = [ULTRALYTICS_ASSETS / "bus.jpg", ULTRALYTICS_ASSETS / "zidane.jpg"]  # Ultralytics' bundled photos


def compare_detections(
    ours, boxes, scores, labels, box_tol: float = 1e-3, score_tol: float = 1e-5, tie: float = 1e-7
) -> None:
    """The same detections: equal counts, and each reference detection has its own counterpart of the same class,
    box within `box_tol` px and score within `score_tol`. Matched as sets, since a random-weight model scores some
    anchors exactly alike (near the border, translated copies of one box), and NMS then keeps whichever of two tied
    boxes it meets first: such tied detections (score equal to another's within 1e-7) are left out of the box
    check; their count and classes still must agree."""
    assert len(ours) == len(scores) > 0, (len(ours), len(scores))
    free = torch.ones(len(ours), dtype=torch.bool)
    tied = ((scores[:, None] - scores[None, :]).abs() <= tie).sum(1) > 1  # [K]
    assert int((~tied).sum()) > 0
    assert sorted(ours.labels.tolist()) == sorted(labels.long().tolist())
    for box, score, label, skip in zip(boxes, scores, labels.long(), tied, strict=True):
        if skip:
            continue
        fits = free & (ours.labels == label) & ((ours.scores - score).abs() <= score_tol)
        fits &= (ours.boxes - box).abs().max(dim=1).values <= box_tol
        assert fits.any(), (box, score, label)
        free[fits.nonzero()[0, 0]] = False


class InterruptingLoss:
    """Wraps a criterion; sends this process a real SIGINT (Ctrl-C) during its `at`-th call. Every other attribute
    is the criterion's (a `set_epoch` schedule, `reduction`), so the run goes on exactly as without the wrapper."""

    def __init__(self, criterion: Any, at: int) -> None:
        self.criterion, self.at, self.calls = criterion, at, 0

    def __call__(self, outputs: Any, targets: torch.Tensor) -> Any:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.criterion(outputs, targets)

    def __getattr__(self, name: str) -> Any:
        if name == "criterion":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.criterion, name)
