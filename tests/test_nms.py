"""`detect.nms.batched_nms`: torchvision's kernel and rule without torchvision's package import, index for index."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# (boxes, classes): 0 boxes; the coordinate-offset path (<= 4,000 coordinates); the per-class path (above)
CASES = [(0, 1), (60, 3), (900, 7), (2500, 20)]


def _inputs(count: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overlapping boxes in a 200 px square, crowded with scores in (0, 1), some of them tied, and their classes."""
    gen = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=gen) * 100
    boxes = torch.cat((corner, corner + 20 + torch.rand(count, 2, generator=gen) * 80), dim=1)
    scores = (torch.rand(count, generator=gen) * 50).round() / 50  # ties between boxes
    return boxes, scores, torch.randint(0, classes, (count,), generator=gen)


def test_batched_nms_equals_torchvision_and_imports_no_torchvision(tmp_path: Path) -> None:
    """In a fresh process, importing the training, evaluation and inference modules and running their NMS leaves
    torchvision's package (and torch._dynamo, which it imports) out; the kept indices equal torchvision's own."""
    out = tmp_path / "kept.pt"
    code = textwrap.dedent(f"""
        import sys, torch
        import detect.api, detect.eval.evaluate, detect.inference, detect.train.detection
        from detect.nms import batched_nms
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_nms import CASES, _inputs
        kept = [batched_nms(*_inputs(n, c, seed), iou_threshold=iou) for seed, (n, c) in enumerate(CASES)
                for iou in (0.3, 0.7)]
        assert "torchvision" not in sys.modules and "torch._dynamo" not in sys.modules, "torchvision was imported"
        torch.save(kept, {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    from torchvision.ops import batched_nms as torchvision_batched_nms  # here: the child imports this module

    kept = torch.load(out)
    expected = [torchvision_batched_nms(*_inputs(n, c, seed), iou_threshold=iou) for seed, (n, c) in enumerate(CASES)
                for iou in (0.3, 0.7)]  # fmt: skip
    for mine, reference in zip(kept, expected, strict=True):
        assert mine.dtype == torch.int64 and torch.equal(mine, reference)
    for (count, _), strict, loose in zip(CASES, kept[::2], kept[1::2], strict=True):  # IoU 0.3, then 0.7
        assert count == 0 or 0 < len(strict) < min(len(loose), count)  # boxes suppressed, more at the lower IoU
