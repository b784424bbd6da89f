"""torchvision's class-aware NMS without importing torchvision's Python package.

Any `import torchvision...` runs torchvision/__init__, which imports torchvision.models, whose ops import
torch._dynamo: 1.4-2 s on a 2-core CPU, paid by every val_det and predict run only for NMS (issue 20's short run).
(train_det imports torch._dynamo anyway: torch.optim's `Optimizer.add_param_group` is wrapped by
`torch._disable_dynamo`, which imports it when the first optimizer is built; Ultralytics pays the same.)

The NMS kernel itself is torchvision's compiled extension (`_C_stable`, `_C` before 0.27; registered as
`torch.ops.torchvision.nms`): `batched_nms` loads that library from torchvision's package folder without executing
the package and applies torchvision's own `batched_nms` rule (per class on CPU above 4,000 box coordinates, 100,000
on other devices; else one call with the boxes offset by class), so its result is torchvision's, index for index
(tests/test_nms.py). Hand-written only for that dispatch (a few lines); once torchvision is imported anyway, or
under tracing / scripting (ONNX, TorchScript), `torchvision.ops.batched_nms` itself runs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["batched_nms"]


@cache
def _load_kernels() -> None:
    """Register torchvision's compiled operators (`torch.ops.torchvision.*`) from its `_C` extension file."""
    spec = importlib.util.find_spec("torchvision")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed: pip install torchvision")
    folder = Path(next(iter(spec.submodule_search_locations)))
    finder = importlib.machinery.FileFinder(
        str(folder), (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    )
    for name in ("_C_stable", "_C"):  # torchvision >= 0.27 builds against torch's stable ABI; older ones: _C
        extension = finder.find_spec(name)
        if extension is not None and extension.origin is not None:
            torch.ops.load_library(extension.origin)
            return
    raise ImportError(f"torchvision's compiled operators (_C_stable or _C) are missing from {folder}")


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """`torchvision.ops.batched_nms`: indices of the boxes kept by NMS within each `idxs` group, by decreasing score.

    Args:
        boxes: [N, 4] xyxy.
        scores: [N].
        idxs: [N] group (class) of each box; boxes of different groups never suppress each other.
        iou_threshold: a box overlapping a better one of its group by IoU > this is dropped.
    """
    if "torchvision" in sys.modules or torch.jit.is_scripting() or torch.jit.is_tracing():
        from torchvision.ops import batched_nms as torchvision_batched_nms

        return torchvision_batched_nms(boxes, scores, idxs, iou_threshold)
    _load_kernels()
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000):  # torchvision's threshold
        keep = torch.zeros_like(scores, dtype=torch.bool)
        for group in torch.unique(idxs):
            members = torch.where(idxs == group)[0]
            keep[members[torch.ops.torchvision.nms(boxes[members], scores[members], iou_threshold)]] = True
        kept = torch.where(keep)[0]
        return kept[scores[kept].sort(descending=True)[1]]
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return torch.ops.torchvision.nms(boxes + offsets[:, None], scores, iou_threshold)
