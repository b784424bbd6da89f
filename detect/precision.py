"""Where and how a model runs: device, mixed precision and memory layout, shared by training, evaluation and predict."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, replace

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
        fp16_fallback: `auto` chose fp16 on a GPU that has bf16: a training loop switches to bf16 if fp16 overflows
            (`fp16_overflowing`, `leave_fp16`).
    """

    device: torch.device
    amp: bool = False
    bf16: bool = False
    channels_last: bool = False
    fp16_fallback: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp, self.bf16)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_input(images, self.device, self.channels_last)

    def input_for(self, model: object, images: torch.Tensor) -> torch.Tensor:
        """What `model.detect` takes for uint8 images [B, 3, H, W]: them as they are where the model scales them
        itself (`takes_uint8`: the OpenVINO runner, whose graph converts them), else `to_input`."""
        return images if getattr(model, "takes_uint8", False) else self.to_input(images)

    def with_bf16(self) -> Precision:
        """The same, autocasting to bf16 (fp16 left behind, `leave_fp16`)."""
        return replace(self, bf16=True, fp16_fallback=False)


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
CHOICES = ("auto", *PRECISIONS)  # what `train.precision` and `--precision` accept

# What `auto` picks on a CPU with native bf16. bf16 autocast trains 1.4-1.8x faster there (bench/RESULTS.md), and
# the demo schedule's AP in bf16 fell within the fp32 seed spread (issue 20's measurement, bench/RESULTS.md
# "Precision"), so it is the default there; without native bf16, fp32.
AUTO_CPU_BF16 = True
# The same for classification pretraining (train_cls): fp32. The default schedule (cspdarknet_n, 40 epochs) in bf16
# reached val top-1 0.383 / 0.363 (seeds 0 / 1) against fp32's 0.505 / 0.448, below the fp32 seed spread; fp32 takes
# 1.22-1.30x bf16's run time (bench/RESULTS.md "bf16 pretraining"); `train.precision=bf16` still asks for bf16.
AUTO_CPU_BF16_CLS = False
AUTO_ENV = "PLUGDET_AUTO_PRECISION"  # fp32 | bf16 | fp16: what `auto` means on this machine, whatever the hardware


def choose_precision(asked: str, device: torch.device | str, where: str = "train.precision",
                     pretraining: bool = False) -> tuple[str, str]:  # fmt: skip
    """The precision a run trains in, and why, for the log's first lines: ("bf16", "auto: this CPU has ...").

    `auto` (the default): on CUDA, fp16 autocast with a GradScaler (the CUDA habit: fastest on every NVIDIA GPU, the
    scaler absorbs fp16 gradient overflow); on a CPU with native bf16 (AVX-512 BF16 or AMX), bf16 autocast; on any
    other CPU, fp32 (emulated bf16 ran 7-10x slower than fp32 on an AVX2 CPU). An explicit choice is kept, except
    where the hardware cannot run it well, which is one warning and fp32 (a config travels between machines inside
    checkpoints): bf16 on a CPU without native bf16 (`choose_bf16`), fp16 on a CPU (CPU fp16 autocast is emulated).
    `PLUGDET_AUTO_PRECISION=fp32` (or bf16, fp16) pins what `auto` means on a machine: the test suite pins fp32, so
    its numbers do not depend on the CPU a machine happens to have. `pretraining` (train_cls): `auto` on a CPU with
    native bf16 follows `AUTO_CPU_BF16_CLS` instead of `AUTO_CPU_BF16` (fp32: bf16 trained it to a lower top-1).
    """
    device = torch.device(device)
    if asked not in CHOICES:
        raise UserError(f"{where}={asked!r}: choose one of {', '.join(CHOICES)}")
    cpu = f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    pinned = os.environ.get(AUTO_ENV, "")
    if asked == "auto" and pinned:  # a machine's (or the test suite's) fixed answer for auto
        if pinned not in PRECISIONS:
            raise UserError(f"{AUTO_ENV}={pinned!r}: choose one of {', '.join(PRECISIONS)}")
        name, why = choose_precision(pinned, device, AUTO_ENV)
        return name, f"auto, pinned by {why}"
    if asked == "auto":
        if device.type == "cuda":
            return "fp16", "auto: fp16 autocast with a GradScaler on CUDA"
        if not native_bf16(device):
            return "fp32", f"auto: {cpu} has no native bf16"
        bf16_here = AUTO_CPU_BF16_CLS if pretraining else AUTO_CPU_BF16  # read at call time: a module-level knob
        if bf16_here:
            return "bf16", f"auto: {cpu} has native bf16"
        return "fp32", f"auto: fp32 on CPU (bf16 is native on {cpu} but trains this to a lower accuracy)"
    if asked == "bf16":
        if device.type == "cuda" and not native_bf16(device):
            _warn_once(where, f"warning: {where}=bf16 ignored: this GPU has no bf16; running fp16 with a GradScaler")
            return "fp16", f"{where}=bf16 asked, this GPU has no bf16"
        if not choose_bf16(device, True, where):
            return "fp32", f"{where}=bf16 asked, {cpu} has no native bf16"
        return "bf16", f"{where}=bf16"
    if asked == "fp16" and device.type != "cuda":
        _warn_once(where, f"warning: {where}=fp16 ignored: fp16 needs CUDA (CPU fp16 is emulated); running fp32")
        return "fp32", f"{where}=fp16 asked, no CUDA"
    return asked, f"{where}={asked}"


def training_precision(device: torch.device, asked: str, channels_last: bool, where: str = "train.precision"
                       ) -> tuple[Precision, str]:  # fmt: skip
    """The `Precision` a training loop runs with for `train.precision=asked`, and the one line saying why."""
    name, why = choose_precision(asked, device, where)
    precision = Precision(device, amp=device.type == "cuda" and name != "fp32", bf16=name == "bf16",
                          channels_last=channels_last, fp16_fallback=may_fall_back(asked, name, device))  # fmt: skip
    return precision, f"precision: {name} ({why})"


# fp16 overflowing, as a training loop sees it. The GradScaler starts at 2**16, halves its scale on every step whose
# gradients overflow (that step is skipped) and doubles it after 2000 clean steps; below 1 it has halved at least 17
# times more than it grew, so the gradients overflow fp16 even unscaled and most steps are being skipped. A
# non-finite loss under fp16 autocast (an activation beyond fp16's 65504) is the other sign.
FP16_SCALE_FLOOR = 1.0


def may_fall_back(asked: str, chosen: str, device: torch.device | str) -> bool:
    """Whether a run may leave fp16 for bf16 when fp16 overflows: `auto` chose fp16 on a GPU that has bf16 (an explicit
    `fp16` is kept as asked; a GPU without bf16 has nothing better than fp16 with its scaler)."""
    device = torch.device(device)
    return asked == "auto" and chosen == "fp16" and device.type == "cuda" and native_bf16(device)


def fp16_overflowing(scaler: torch.amp.GradScaler | None) -> bool:
    """Whether the fp16 GradScaler's scale has fallen below `FP16_SCALE_FLOOR` (one host sync)."""
    return scaler is not None and scaler.get_scale() < FP16_SCALE_FLOOR


def leave_fp16(scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer, why: str) -> str:
    """What a training loop does when it leaves an overflowing fp16 for bf16 (`may_fall_back`): gradients accumulated
    under the scaler and not yet stepped are unscaled, so that the step without a scaler sees them at their true
    size (if they overflowed they are dropped, as the scaler would have skipped that step). Returns the one line
    saying so, for the main process to print. The caller drops its scaler and autocasts to bf16 from here on."""
    if scaler is not None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                optimizer.zero_grad(set_to_none=True)
    return f"precision: fp16 overflowed ({why}); bf16 from here on (auto, this GPU has bf16)"


def trained_precision(trained: str, device: torch.device | str) -> str:
    """The precision to evaluate a checkpoint in by default, so that val_det reproduces the AP its training loop
    measured: what `train.precision=trained` ran in on this device, without `choose_precision`'s warnings (fp16 on a
    CPU is fp32, as it trained); bf16 where the CPU lacks it falls back in `make_precision`, with its one warning."""
    device = torch.device(device)
    if trained == "auto":
        return choose_precision("auto", device)[0]
    if trained == "fp16" and device.type != "cuda":
        return "fp32"
    return trained if trained in PRECISIONS else "fp32"


def _warn_once(where: str, message: str) -> None:
    if where not in _WARNED:
        _WARNED.add(where)
        print(message, file=sys.stderr)


def make_precision(device: torch.device, precision: str, where: str = "precision") -> Precision:
    """The `Precision` of inference: "fp32", "bf16" (autocast; falls back to fp32 with one warning on a CPU without
    native bf16, `detect.precision.choose_bf16`), "fp16" (CUDA autocast only) or "auto" (`choose_precision`'s pick
    for this device); channels_last always."""
    if precision == "auto":  # the hardware's choice, as for training (`choose_precision`)
        precision = choose_precision("auto", device, where)[0]
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(CHOICES)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs CUDA (fp16 on a CPU is emulated and slow): use fp32 or bf16")
    bf16 = choose_bf16(device, precision == "bf16", where)
    return Precision(device, amp=device.type == "cuda" and precision in ("fp16", "bf16"), bf16=bf16,
                     channels_last=True)  # fmt: skip
