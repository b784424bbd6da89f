"""Where and how a model runs: device, mixed precision and memory layout, shared by training, evaluation and predict."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """Device and numerics of a loop.

    Attributes:
        device: where the model and the batches live.
        amp: CUDA autocast (fp16 with a GradScaler, or bf16 with `bf16`).
        bf16: bfloat16 autocast (CPU, or CUDA with `amp`).
        channels_last: NHWC input memory (the model should be channels_last too).
    """

    device: torch.device
    amp: bool = False
    bf16: bool = False
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp, self.bf16)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_input(images, self.device, self.channels_last)


def autocast(device: torch.device, amp: bool, bf16: bool) -> contextlib.AbstractContextManager:
    """Mixed precision: CUDA fp16 (or bf16) when `amp`, CPU bf16 when `bf16`; otherwise full fp32."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)
    if device.type == "cpu" and bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, 3, H, W] from the loader (any memory layout) -> float [B, 3, H, W] in [0, 1] on the device, in
    channels_last memory or NCHW-contiguous (a conv given channels_last input answers in channels_last)."""
    images = images.to(device, non_blocking=True).float().div_(255.0)  # keeps the loader's layout
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
