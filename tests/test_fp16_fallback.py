"""`auto` leaves an overflowing fp16 for bf16 (issue 20, item 1): the two signs (a non-finite loss under fp16, the
GradScaler's scale below 1), in the detection engine, in the classification step and in the run that adopts it.

fp16 with a GradScaler is CUDA's; here the engine runs on the CPU with a CPU GradScaler (the scaler's arithmetic is
the same), and the classification step with fp16 autocast, where a real fp16 overflow happens: on the CPU, and on
CUDA where there is one (bench/gpu_check.sh runs this file beside tests/test_cuda.py). What a switch must
give is checked exactly: the weights of a run that switched equal those of a run that took the same steps in bf16.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_cuda import BATCH, synthetic_batches, tiny_detector
from torch import nn

from backbones.errors import UserError
from detect import precision
from detect.losses import build_criterion
from detect.precision import Precision
from detect.train.classification import ClsRun
from detect.train.classify import ClsStepper
from detect.train.detection import DetRun
from detect.train.engine import EpochStart, Optimization, Schedule, StepState, train_one_epoch

CPU = torch.device("cpu")
LINE = "precision: fp16 overflowed ({}); bf16 from here on (auto, this GPU has bf16)"


@pytest.mark.parametrize(("asked", "device", "native", "falls_back"), [
    ("auto", "cuda", True, True),  # auto chose fp16 on a GPU with bf16
    ("auto", "cuda", False, False),  # no bf16: fp16 with its scaler is the best there is
    ("fp16", "cuda", True, False),  # asked for: kept
    ("auto", "cpu", True, False),  # bf16 already
])  # fmt: skip
def test_only_an_auto_fp16_on_a_gpu_with_bf16_may_fall_back(monkeypatch, asked, device, native, falls_back) -> None:
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": native)
    loop, _ = precision.training_precision(torch.device(device), asked, channels_last=False)
    assert loop.fp16_fallback is falls_back


def test_leaving_fp16_unscales_the_pending_gradients_or_drops_overflowed_ones() -> None:
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    true = [torch.randn_like(p) for p in layer.parameters()]
    for p, g in zip(layer.parameters(), true, strict=True):
        p.grad = g * 8.0
    assert precision.leave_fp16(scaler, optimizer, "why") == LINE.format("why")
    assert all(torch.equal(p.grad, g) for p, g in zip(layer.parameters(), true, strict=True))
    layer.weight.grad[0, 0] = float("inf")
    precision.leave_fp16(scaler, optimizer, "why")
    assert all(p.grad is None for p in layer.parameters())


def _epoch(batches, precision_: Precision, scaler, start: int = 0, model=None, criterion=None, opt=None):
    """`train_one_epoch` over `batches` from batch `start` (a step per batch, no warmup, no EMA) on `model`, with a
    new optimizer or `opt` (its scaler replaced by `scaler`)."""
    model = model or tiny_detector()
    if opt is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opt = Optimization(optimizer, Schedule(0.01, 0.01, 1, "linear", 0.9, 0, 0.0, 0.9, BATCH, BATCH))
    opt.scaler = scaler
    state = StepState()
    stats = train_one_epoch(model, criterion or build_criterion(model.head), batches, opt, state, EpochStart(0, start),
                            precision_)  # fmt: skip
    return model, opt, state, stats


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_the_engine_leaves_fp16_when_the_scale_falls_below_one(capsys) -> None:
    batches = synthetic_batches(2)
    switching = Precision(CPU, fp16_fallback=True)  # the CPU's stand-in for CUDA fp16 autocast
    model, opt, state, _ = _epoch(batches, switching, torch.amp.GradScaler("cpu", init_scale=0.5))
    assert state.fell_back_to_bf16 and opt.scaler is None
    assert LINE.format("GradScaler scale below 1 at iteration 0") in capsys.readouterr().err.splitlines()
    # The same two steps taken by hand: the first under the scaler, the second in bf16 without one.
    reference, half, *_ = _epoch(batches[:1], Precision(CPU), torch.amp.GradScaler("cpu", init_scale=0.5))
    reference, *_ = _epoch(batches[1:], Precision(CPU, bf16=True), None, start=1, model=reference, opt=half)
    assert torch.equal(_weights(model), _weights(reference))
    staying, *_ = _epoch(batches, Precision(CPU), torch.amp.GradScaler("cpu", init_scale=0.5))  # no fallback: fp32
    assert not torch.equal(_weights(model), _weights(staying))


class FirstLossOverflows:
    """The criterion, except that its first total is +inf (an fp16 forward that overflowed)."""

    def __init__(self, criterion) -> None:
        self.criterion, self.calls = criterion, 0

    def __call__(self, outputs, targets):
        total, parts = self.criterion(outputs, targets)
        self.calls += 1
        return (total * float("inf") if self.calls == 1 else total), parts


def test_the_engine_runs_an_overflowed_batch_again_in_bf16(capsys) -> None:
    batches = synthetic_batches(2)
    model = tiny_detector()
    criterion = FirstLossOverflows(build_criterion(model.head))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, opt, state, stats = _epoch(batches, Precision(CPU, fp16_fallback=True), scaler, model=model,
                                      criterion=criterion)  # fmt: skip
    assert criterion.calls == 3 and state.fell_back_to_bf16 and opt.scaler is None
    assert LINE.format("a non-finite loss at iteration 0") in capsys.readouterr().err.splitlines()
    reference, _, _, expected = _epoch(batches, Precision(CPU, bf16=True), None)  # bf16 from the first batch
    assert torch.equal(_weights(model), _weights(reference))
    assert {k: v for k, v in stats.items() if k != "img_per_s"} == {k: v for k, v in expected.items()
                                                                   if k != "img_per_s"}  # fmt: skip
    model = tiny_detector()
    with pytest.raises(UserError, match="non-finite loss"):  # not allowed to fall back: stops, as before
        _epoch(batches, Precision(CPU), scaler, model=model, criterion=FirstLossOverflows(build_criterion(model.head)))


def test_the_run_keeps_bf16_after_the_epoch_and_says_so_in_its_config() -> None:
    run = SimpleNamespace(state=SimpleNamespace(fell_back_to_bf16=True, scaler=object()),
                          precision=Precision(CPU, fp16_fallback=True), opt=SimpleNamespace(scaler=object()),
                          cfg=SimpleNamespace(train=SimpleNamespace(precision="auto")))  # fmt: skip
    DetRun.keep_bf16_fallback(run)
    assert run.precision == Precision(CPU, bf16=True) and run.opt.scaler is None and run.state.scaler is None
    assert run.cfg.train.precision == "bf16"  # last.pt resumes in bf16; val_det evaluates in it


def test_the_pretraining_run_keeps_bf16_in_its_config_after_the_step_fell_back() -> None:
    stepper = SimpleNamespace(fell_back_to_bf16=False)
    run = SimpleNamespace(stepper=stepper, state=SimpleNamespace(scaler=object()),
                          cfg=SimpleNamespace(train=SimpleNamespace(precision="auto")))  # fmt: skip
    ClsRun.keep_bf16_fallback(run)
    assert run.cfg.train.precision == "auto" and run.state.scaler is not None  # no fallback: nothing changes
    stepper.fell_back_to_bf16 = True
    ClsRun.keep_bf16_fallback(run)
    assert run.cfg.train.precision == "bf16" and run.state.scaler is None


def _stepper(amp_dtype, scaler, fallback: bool, device: str = "cpu") -> tuple[nn.Module, ClsStepper]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    nn.init.constant_(model[0].weight, 0.1)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, ClsStepper(optimizer, nn.CrossEntropyLoss(), lambda e: 0.01, None, scaler, amp_dtype, fallback)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)"))])  # fmt: skip
def test_the_classification_step_leaves_a_real_fp16_overflow_for_bf16(capsys, device: str) -> None:
    images = torch.full((2, 64), 2e4, device=device)  # 64 x 2e4 x 0.1 = 1.28e5: past fp16's 65504
    labels = torch.tensor([0, 3], device=device)
    model, stepper = _stepper(torch.float16, torch.amp.GradScaler(device, init_scale=2.0**10), True, device)
    loss, _ = stepper.step(model, images, labels, "at epoch 1, step 1")
    assert torch.isfinite(loss) and stepper.fell_back_to_bf16
    assert (stepper.amp_dtype, stepper.scaler, stepper.fp16_fallback) == (torch.bfloat16, None, False)
    assert LINE.format("a non-finite loss at epoch 1, step 1") in capsys.readouterr().err.splitlines()
    reference, bf16 = _stepper(torch.bfloat16, None, False, device)
    assert torch.equal(bf16.step(reference, images, labels, "")[0], loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    model, stepper = _stepper(torch.float16, torch.amp.GradScaler(device, init_scale=2.0**10), False, device)
    with pytest.raises(UserError, match="non-finite training loss"):
        stepper.step(model, images, labels, "at epoch 1, step 1")


def test_the_classification_step_leaves_fp16_when_the_scale_falls_below_one(capsys) -> None:
    images, labels = torch.randn(2, 64), torch.tensor([0, 3])
    model, stepper = _stepper(torch.float16, torch.amp.GradScaler("cpu", init_scale=0.5), True)
    stepper.step(model, images, labels, "at epoch 1, step 1")
    assert stepper.fell_back_to_bf16 and stepper.scaler is None and stepper.amp_dtype == torch.bfloat16
    assert LINE.format("GradScaler scale below 1 at epoch 1, step 1") in capsys.readouterr().err.splitlines()
