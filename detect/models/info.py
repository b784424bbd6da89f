"""Model info: parameters, GFLOPs at an input size (`torch.utils.flop_counter`, not thop) and layers.

GFLOPs count multiply and add as two operations (`FlopCounterMode`'s convention; Ultralytics reports thop's MACs
times two, the same quantity): YOLOv8n at 640 x 640 is 8.7 GFLOPs in both. They are measured by running the model
once on a zero image of the given size in eval mode, so they follow the run's size, rect shapes included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_layers(model: nn.Module) -> int:
    """Leaf modules that hold parameters (convolutions, norms, linear layers): what a reader calls a layer."""
    return sum(1 for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(recurse=False)))


@torch.no_grad()
def model_info(model: nn.Module, img_size: int | tuple[int, int] = 640) -> dict[str, Any]:
    """Parameters, trainable parameters, GFLOPs of one forward pass at `img_size` (H, W or a square side), layers.

    The model's mode is restored afterwards; its device and dtype are used for the probe image.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(torch.zeros(1, 3, h, w, device=device, dtype=dtype))
    finally:
        if was_training:
            model.train()
    return {"params": params, "trainable": trainable, "gflops": counter.get_total_flops() / 1e9, "layers":
            count_layers(model), "img_size": (h, w)}  # fmt: skip


def format_info(info: dict[str, Any], name: str = "model") -> str:
    """One line: `<name>: 3,157,200 parameters (3,157,184 trainable), 8.7 GFLOPs at 640x640, 127 layers`."""
    h, w = info["img_size"]
    return (f"{name}: {info['params']:,} parameters ({info['trainable']:,} trainable), {info['gflops']:.1f} GFLOPs at "
            f"{h}x{w}, {info['layers']} layers")  # fmt: skip
