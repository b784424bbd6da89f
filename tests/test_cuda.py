"""The CUDA paths no CPU run reaches (issue 20, item 5): fp16 autocast with a GradScaler through the engine,
channels_last convolutions, the pinned-memory loader and an NCCL process group.

Every test skips without CUDA (CI runs on CPU); `bench/gpu_check.sh` runs this file on a GPU machine. The float32
reference runs with TF32 off (cuDNN convolutions and matmuls), so that it computes what the CPU computes. Each test
prints its measured differences on a `MEASURED` line, which gpu_check.sh copies into its summary: a failure then
says by how much, not only that.

The helpers take the device, so the same code can be checked on CPU (they are what the tests call on CUDA).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from detect.config import DetConfig, load_config
from detect.losses import build_criterion
from detect.models import DetectorSpec, PartSpec, build_detector
from detect.models.detector import Detector
from detect.precision import Precision, to_input
from detect.train.builders import build_det_datasets, build_det_loaders
from detect.train.distributed import DistInfo
from detect.train.engine import EpochStart, Optimization, Schedule, StepState, train_one_epoch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")

NUM_CLASSES, SIZE, BATCH = 3, 128, 4
# fp16 keeps 11 significant bits per operation. The loss parts of a 2-batch epoch agree with float32 to 3 % (room
# for a near-tie in the TaskAligned top-k that rounding can flip). The weight update of the two steps is far more
# sensitive (random images, BatchNorm over 4 images amplify rounding): bf16 autocast, 3 bits fewer than fp16, was
# measured on CPU at 1.7e-3 on the loss but 0.51 on the update (cosine 0.85) with its norm within 0.1 %; so the
# update must be within 25 % of the reference and its norm within 5 %. A step skipped or taken with the gradients
# still scaled (unscale missing: clipped, then divided by the scale) would miss these by far.
AMP_LOSS_RTOL, AMP_UPDATE_RTOL, AMP_UPDATE_NORM_RTOL = 3e-2, 0.25, 5e-2
# float32 on CUDA (TF32 off) against the CPU: only the order of summation differs
FP32_LOSS_RTOL = 1e-3
# The first steps must not overflow for the two runs to stay comparable: torch's default 65536 may skip one
# (which GradScaler is built to do), so the test starts lower and checks that the scale never backed off.
INIT_SCALE = 2.0**10


def measured(name: str, **values: Any) -> None:
    """One `MEASURED name key=value ...` line on stdout (pytest -s shows it; gpu_check.sh collects it)."""
    print(f"MEASURED {name} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                                         values.items()), flush=True)  # fmt: skip


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """float32 matmuls and cuDNN convolutions without TF32 (Ampere and later use it for float32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tiny_detector(seed: int = 0) -> Detector:
    """YOLOv8n (cspdarknet_n + yolov8 neck and head) with NUM_CLASSES classes, weights drawn from `seed`."""
    torch.manual_seed(seed)
    spec = DetectorSpec(NUM_CLASSES, PartSpec("cspdarknet_n"), PartSpec("yolov8", {"scale": "n"}), PartSpec("yolov8"))
    return build_detector(spec)


def synthetic_batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    """`count` loader-like batches: uint8 images [BATCH, 3, SIZE, SIZE] in channels_last memory (as the loader gives
    them), targets [N, 6] (image, class, x1, y1, x2, y2) with two boxes per image, metas."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(count):
        images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
        rows = []
        for i in range(BATCH):
            for _ in range(2):
                x1, y1 = (torch.rand(2, generator=generator) * SIZE * 0.5).tolist()
                w, h = (16 + torch.rand(2, generator=generator) * SIZE * 0.4).tolist()
                cls = int(torch.randint(0, NUM_CLASSES, (1,), generator=generator))
                rows.append([i, cls, x1, y1, x1 + w, y1 + h])
        metas = [{"ratio": (1.0, 1.0), "pad": (0, 0), "orig_size": (SIZE, SIZE), "image_id": BATCH * b + i + 1,
                  "index": i} for i in range(BATCH)]  # fmt: skip
        batches.append((images.contiguous(memory_format=torch.channels_last), torch.tensor(rows), metas))
    return batches


def train_two_steps(
    device: torch.device, amp: bool = False, bf16: bool = False, channels_last: bool = False
) -> tuple[dict[str, float], torch.Tensor, float | None]:
    """One epoch of two batches through `engine.train_one_epoch` (an optimizer step after each, no warmup, no EMA).

    Returns:
        (the epoch's mean loss parts, the update of every parameter flattened into one float64 vector [P] on the
        CPU, the GradScaler's scale at the end or None without one).
    """
    model = tiny_detector().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    before = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])  # [P]
    criterion = build_criterion(model.head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    schedule = Schedule(0.01, 0.01, 1, "linear", 0.9, 0, 0.0, 0.9, BATCH, BATCH)  # a step per batch, no warmup
    scaler = torch.amp.GradScaler("cuda", init_scale=INIT_SCALE) if amp and not bf16 else None
    opt = Optimization(optimizer, schedule, None, scaler, 10.0)
    precision = Precision(device, amp=amp, bf16=bf16, channels_last=channels_last)
    stats = train_one_epoch(model, criterion, synthetic_batches(2), opt, StepState(), EpochStart(0), precision)
    after = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])  # [P]
    parts = {k: v for k, v in stats.items() if k != "img_per_s" and not k.startswith("lr/")}
    return parts, after - before, None if scaler is None else scaler.get_scale()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fp16_amp_step_through_the_engine_matches_float32(channels_last: bool) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with strict_fp32():
        reference, reference_update, _ = train_two_steps(cuda)
    cpu_parts, cpu_update, _ = train_two_steps(cpu)
    parts, update, scale = train_two_steps(cuda, amp=True, channels_last=channels_last)
    loss_error = max(abs(parts[k] - reference[k]) / abs(reference[k]) for k in reference)
    cpu_error = max(abs(cpu_parts[k] - reference[k]) / abs(reference[k]) for k in reference)
    measured(f"amp_fp16_vs_fp32[{'channels_last' if channels_last else 'nchw'}]", loss_rel=loss_error,
             update_rel=relative_error(update, reference_update),
             update_norm_ratio=float(update.norm() / reference_update.norm()), cuda_fp32_vs_cpu_loss_rel=cpu_error,
             cuda_fp32_vs_cpu_update_rel=relative_error(reference_update, cpu_update), scale=scale)  # fmt: skip
    assert set(parts) == set(reference) == {"box", "cls", "dfl"}
    assert scale == INIT_SCALE  # no overflow: every step was taken, none backed the scale off
    for name in reference:
        assert parts[name] == pytest.approx(reference[name], rel=AMP_LOSS_RTOL), name
        assert cpu_parts[name] == pytest.approx(reference[name], rel=FP32_LOSS_RTOL), name
    assert relative_error(update, reference_update) < AMP_UPDATE_RTOL
    assert float(update.norm() / reference_update.norm()) == pytest.approx(1.0, rel=AMP_UPDATE_NORM_RTOL)
    assert relative_error(reference_update, cpu_update) < FP32_LOSS_RTOL * 10


def decoded(device: torch.device, channels_last: bool) -> torch.Tensor:
    """The eval-mode decoded output [B, A, 4 + C] (xyxy pixels, sigmoid scores) of the tiny detector, float32."""
    model = tiny_detector().to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = synthetic_batches(1)[0][0]
    with torch.no_grad():
        return model(to_input(images, device, channels_last)).float().cpu()


def test_channels_last_on_cuda_gives_the_nchw_outputs() -> None:
    with strict_fp32():
        nchw, nhwc = decoded(torch.device("cuda"), False), decoded(torch.device("cuda"), True)
    cpu = decoded(torch.device("cpu"), False)
    boxes, scores = (nhwc - nchw)[..., :4].abs().max().item(), (nhwc - nchw)[..., 4:].abs().max().item()
    measured("channels_last_vs_nchw", max_box_px=boxes, max_score=scores,
             cuda_vs_cpu_max_box_px=(nchw - cpu)[..., :4].abs().max().item())  # fmt: skip
    assert nchw.shape == (BATCH, (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2, 4 + NUM_CLASSES)
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-3)  # boxes in pixels (0..128), scores in (0, 1)
    torch.testing.assert_close(nchw, cpu, rtol=1e-4, atol=1e-3)


def loader_batches(root: Path, device: torch.device) -> tuple[list, list]:
    """Every batch of one epoch of plugdet's train loader and of its val loader, built for `device`
    (`build_det_loaders` pins memory when it is CUDA), 2 workers, 64 px, batch 4."""
    cfg = load_config(DetConfig, None, [f"data.root={root}", "data.img_size=64", "train.batch_size=4",
                                        "train.workers=2", "seed=0"])  # fmt: skip
    train, val = build_det_datasets(cfg)
    train_loader, sampler, val_loader = build_det_loaders(train, val, cfg, DistInfo(0, 0, 1, device))
    sampler.set_epoch(0)
    return list(train_loader), list(val_loader)


def test_pinned_memory_loader_delivers_the_unpinned_batches(synth_cub_root: Path) -> None:
    pinned_train, pinned_val = loader_batches(synth_cub_root, torch.device("cuda"))
    plain_train, plain_val = loader_batches(synth_cub_root, torch.device("cpu"))
    assert len(pinned_train) == len(plain_train) == 3 and len(pinned_val) == len(plain_val) == 2  # 12 and 12 images
    for (images, targets, metas), (plain_images, plain_targets, plain_metas) in zip(
        pinned_train + pinned_val, plain_train + plain_val, strict=True
    ):
        assert images.is_pinned() and targets.is_pinned()
        assert not plain_images.is_pinned()
        assert torch.equal(images, plain_images) and torch.equal(targets, plain_targets)
        assert images.stride() == plain_images.stride()  # pinning keeps the loader's channels_last layout
        assert metas == plain_metas
        assert torch.equal(images.to("cuda", non_blocking=True).cpu(), plain_images)  # the pinned copy is exact
        on_gpu = to_input(images, torch.device("cuda"), True)  # uint8 -> float / 255 on the GPU
        # CUDA's division and the CPU's may differ in the last bit (H200 run, 2026-12-04): one float32 ulp of [0, 1]
        torch.testing.assert_close(on_gpu.cpu(), to_input(plain_images, torch.device("cpu"), True), rtol=0, atol=6e-8)
        assert on_gpu.is_contiguous(memory_format=torch.channels_last)
    measured("pinned_loader", batches=len(pinned_train) + len(pinned_val), equal=True)


# Run in a child process: a hung NCCL call must not hang pytest (the child has a timeout), and the process group
# must not outlive the test. `env://` reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, as under torchrun.
PROCESS_GROUP_SCRIPT = r"""
import copy, json, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from torch import nn
from detect.train.distributed import get_rank, get_world_size

backend = sys.argv[1]
device = torch.device("cuda", 0) if "nccl" in backend else torch.device("cpu")
torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=60))
try:
    on_device = torch.arange(1.0, 5.0, device=device)
    dist.all_reduce(on_device)
    on_cpu = torch.tensor([2.0, 3.0])
    dist.all_reduce(on_cpu)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1)).to(device)
    plain = copy.deepcopy(net)
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[0] if device.type == "cuda" else None)
    x = torch.randn(2, 3, 16, 16, device=device)
    ddp(x).square().mean().backward()
    plain(x).square().mean().backward()
    diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(net.parameters(), plain.parameters()))
    print(json.dumps({"world": get_world_size(), "rank": get_rank(), "backend": str(dist.get_backend()),
                      "device_sum": on_device.tolist(), "cpu_sum": on_cpu.tolist(), "ddp_grad_diff": diff}))
finally:
    dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_process_group(backend: str, timeout: float = 120.0) -> dict[str, Any]:
    """`PROCESS_GROUP_SCRIPT` in a 1-process group of `backend`; its JSON line (an AssertionError with the child's
    output when it fails)."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", PROCESS_GROUP_SCRIPT, backend], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_process_nccl_group_all_reduces_and_runs_ddp() -> None:
    # init_distributed (detect/train/distributed.py) joins a group only when WORLD_SIZE > 1, so the group is made
    # here with its backend string: NCCL for CUDA tensors, gloo for the small CPU ones the loops exchange.
    result = run_process_group("cpu:gloo,cuda:nccl")
    measured("nccl_world1", backend=result["backend"], ddp_grad_diff=result["ddp_grad_diff"])
    assert result["world"] == 1 and result["rank"] == 0
    assert result["device_sum"] == [1.0, 2.0, 3.0, 4.0] and result["cpu_sum"] == [2.0, 3.0]
    assert result["ddp_grad_diff"] <= 1e-6  # DDP's average over one process is its own gradient
