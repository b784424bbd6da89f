"""What a cell's detector costs: parameters, GFLOPs and CPU latency at its evaluation size.

The numbers depend on the architecture (backbone + neck + head at a size), not on the weights, so the report
measures each backbone x head once, on the best.pt of one finished cell, in one process: every latency of a table
comes from the same CPU and thread count, even when the cells were trained by shards on different nodes.

- Parameters and GFLOPs: `detect.models.info.model_info` of the unfused model (multiply and add count as two).
- Latency: the fused, channels_last, fp32 eval model (as val_det and predict run it), batch 1, the median of
  `runs` timed calls of `detect()` (forward, decode and the family's postprocess at predict's conf 0.25) after
  `warmup` untimed ones, with `threads` torch threads. Letterboxing and image decoding are not included.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch


def measure_checkpoint(path: Path, img_size: int | None, threads: int, runs: int, warmup: int) -> dict[str, Any]:
    """params, gflops, latency_ms (median), img_size and threads of the detector in a train_det checkpoint.

    Args:
        path: a train_det best.pt / last.pt.
        img_size: square input side; None: the checkpoint's training size (data.img_size).
        threads: torch threads while timing (restored afterwards).
        runs, warmup: timed and untimed batch-1 calls.
    """
    from detect.checkpoints import detector_from_checkpoint, read_detector_checkpoint
    from detect.models.info import model_info

    checkpoint = read_detector_checkpoint(path)
    size = int(img_size or (checkpoint.get("config") or {}).get("data", {}).get("img_size", 640))
    info = model_info(detector_from_checkpoint(checkpoint, "cpu", where=str(path)), size)
    model = detector_from_checkpoint(checkpoint, "cpu", fuse=True, channels_last=True, where=str(path))
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for k in range(warmup + runs):
                start = time.perf_counter()
                model.detect(image, conf=0.25, iou=0.7, max_det=300)
                if k >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {"params": int(info["params"]), "gflops": float(info["gflops"]), "img_size": size,
            "latency_ms": 1000.0 * statistics.median(times), "threads": threads}  # fmt: skip
