"""Where and how a model runs: device, mixed precision and memory layout, shared by training, evaluation and predict."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from backbones.errors import UserError


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


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 runs at full speed here: CUDA with bf16 support, or a CPU with native bf16 in oneDNN (AVX-512
    BF16 or AMX; `torch.ops.mkldnn._is_mkldnn_bf16_supported()`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_report() -> str:
    """One line for benchmarks and logs: the CPU's SIMD capability as torch sees it and whether bf16 is native."""
    return (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
            f"{'yes' if native_bf16('cpu') else 'no'}")  # fmt: skip


_WARNED: set[str] = set()


def choose_bf16(device: torch.device | str, bf16: bool, where: str = "bf16") -> bool:
    """The bf16 setting to run with: `bf16`, except on a CPU without native bf16, where it is False with one warning.

    Why a fallback and not an error: without native bf16 (e.g. an AVX2-only CPU) oneDNN emulates bf16 convolutions,
    measured 7-10x slower than fp32, so running it would only waste time; fp32 is the reference numerics, so falling
    back never changes a result for the worse. The setting often travels inside a checkpoint's config
    (`train.bf16=true` from an AMX machine), so an exit would break val_det / predict on any other machine.
    The warning (once per process and `where`) says so. `PLUGDET_FORCE_BF16=1` keeps emulated bf16 (to measure it).

    Args:
        device: where the model runs.
        bf16: what the user or the config asked for.
        where: the option's name for the message, e.g. "train.bf16" or "--bf16".
    """
    device = torch.device(device)
    if not bf16 or device.type != "cpu" or native_bf16(device) or os.environ.get("PLUGDET_FORCE_BF16") == "1":
        return bool(bf16)
    if where not in _WARNED:
        _WARNED.add(where)
        print(f"warning: {where} ignored: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16, "
              "where bf16 runs several times slower than fp32; running fp32 (PLUGDET_FORCE_BF16=1 forces bf16)",
              file=sys.stderr)  # fmt: skip
    return False


PRECISIONS = ("fp32", "bf16", "fp16")


def make_precision(device: torch.device, precision: str, where: str = "precision") -> Precision:
    """The `Precision` of inference: "fp32", "bf16" (autocast; falls back to fp32 with one warning on a CPU without
    native bf16, `detect.precision.choose_bf16`) or "fp16" (CUDA autocast only); channels_last always."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs CUDA (fp16 on a CPU is emulated and slow): use fp32 or bf16")
    bf16 = choose_bf16(device, precision == "bf16", where)
    return Precision(device, amp=device.type == "cuda" and precision in ("fp16", "bf16"), bf16=bf16,
                     channels_last=True)  # fmt: skip
