"""Classification training throughput on CPU: images/s of one SGD step (forward + backward + update) per backbone.

Each model is `Classifier(build_backbone(name), 200 classes)` at 224 x 224, batch 32, `torch.set_num_threads(2)`,
fed synthetic random tensors so that only the model is measured; variants fp32 and bf16 autocast + channels_last
(and optionally channels_last alone). A second set of rows uses train_cls's real loader (`build_cls_loaders`:
Resize + RandomCrop 224, flip, colour jitter, `--workers` processes) on `data/synth_cub` when present, plus the
loader alone, so the gap between the two tells how much the loader costs. Times are the median (and minimum) of
`--steps` timed steps after `--warmup` steps.

    python bench/bench_cls.py                                # resnet18, resnet50, cspdarknet_n; fp32 and bf16
    python bench/bench_cls.py --models resnet18 --variants fp32 cl bf16 --steps 20
    python bench/bench_cls.py --quick                        # smoke run: 64 px, batch 4, 2 steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from backbones import build_backbone  # noqa: E402
from backbones.classifier import Classifier  # noqa: E402
from backbones.errors import UserError  # noqa: E402
from detect.cli import run_tool  # noqa: E402

VARIANTS = {"fp32": (False, False), "cl": (False, True), "bf16": (True, True)}  # name -> (bf16 autocast, chan. last)
SYNTHETIC = "random tensors"
LABELS = {"fp32": "fp32", "cl": "fp32 channels_last", "bf16": "bf16 autocast + channels_last"}


def make_model(name: str, num_classes: int, channels_last: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A classifier in train mode and its SGD optimizer (lr 0.01, momentum 0.9, nesterov)."""
    torch.manual_seed(0)
    model = Classifier(build_backbone(name), num_classes).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, bf16: bool
) -> None:
    """One step: forward (under bf16 autocast if asked), cross-entropy in fp32, backward, SGD update."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(images)  # [B, C]
    loss = nn.functional.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def synthetic_batches(batch: int, size: int, num_classes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same random batch forever (images [B, 3, S, S] ~ N(0, 1), labels [B])."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    while True:
        yield images, labels


def real_loader(root: str, batch: int, size: int, workers: int) -> tuple[torch.utils.data.DataLoader, int]:
    """train_cls's own training loader (its transforms, sampler and worker settings) and the number of classes."""
    from detect.config import ClsConfig, load_config
    from detect.train.classify import build_cls_datasets, build_cls_loaders
    from detect.train.distributed import DistInfo

    resize = round(size / 0.875)  # the usual 224 -> 256
    overrides = [f"data.root={root}", f"data.img_size={size}", f"data.resize_size={resize}",
                 f"train.batch_size={batch}", f"train.workers={workers}"]  # fmt: skip
    cfg = load_config(ClsConfig, None, overrides)
    train_set, val_set = build_cls_datasets(cfg)
    if len(train_set) < batch:
        raise UserError(f"{root} has {len(train_set)} train images, fewer than one batch of {batch}")
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    loader, _, _ = build_cls_loaders(train_set, val_set, cfg, info)
    return loader, train_set.num_classes


def cycle(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of a loader, epoch after epoch (persistent workers keep running)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def time_steps(
    batches: Iterator, warmup: int, steps: int, run: Callable[[torch.Tensor, torch.Tensor], None]
) -> list[float]:
    """Seconds of each of `steps` calls `run(images, labels)` after `warmup` untimed ones, loader wait included."""
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        images, labels = next(batches)
        run(images, labels)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bench_model(name: str, variant: str, batches: Iterator, num_classes: int, warmup: int, steps: int) -> list[float]:
    """Per-step seconds of one model / variant on a batch stream."""
    bf16, channels_last = VARIANTS[variant]
    model, optimizer = make_model(name, num_classes, channels_last)

    def run(images: torch.Tensor, labels: torch.Tensor) -> None:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        train_step(model, optimizer, images, labels, bf16)

    return time_steps(batches, warmup, steps, run)


def row(model: str, variant: str, data: str, batch: int, times: list[float], reference: float | None = None) -> str:
    """A markdown table row. img/s is batch / median step for random tensors, batch / mean step with a real loader
    (its prefetching makes single steps uneven); `reference` is the fp32 median of the same model (speed-up)."""
    median, mean, fastest = statistics.median(times), statistics.fmean(times), min(times)
    rate = batch / (median if data == SYNTHETIC else mean)
    speedup = f"{reference / median:.2f}x" if reference else "-"
    cells = [model, LABELS.get(variant, variant), data, f"{rate:.1f}", f"{median * 1e3:.0f}", f"{mean * 1e3:.0f}",
             f"{fastest * 1e3:.0f}", speedup]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_cls.py", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "cspdarknet_n"])
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16"], choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before (also start the workers)")
    parser.add_argument("--root", default="data/synth_cub", help="CUB folder for the real-loader rows")
    parser.add_argument("--workers", type=int, default=2, help="loader processes of the real-loader rows")
    parser.add_argument("--real-variants", nargs="*", default=["fp32"], choices=list(VARIANTS),
                        help="variants also timed with the real loader (none: skip those rows)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 px, batch 4, 1 + 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.warmup = 64, 4, 2, 1
    if min(args.batch, args.size, args.steps, args.threads) <= 0 or args.warmup < 0:
        raise UserError("--batch, --size, --steps and --threads must be positive, --warmup >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"classification training step on CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {capability}, batch {args.batch}, {args.size} px, {args.steps} timed steps after "
          f"{args.warmup} warm-up; img/s from the median step (random tensors) or mean step (loader)\n")  # fmt: skip
    print("| model | variant | data | img/s | ms/step median | ms/step mean | ms/step min | speed-up vs fp32 |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        fp32 = None
        for variant in args.variants:
            times = bench_model(name, variant, synthetic_batches(args.batch, args.size, 200), 200, args.warmup,
                                args.steps)  # fmt: skip
            fp32 = statistics.median(times) if variant == "fp32" else fp32
            print(row(name, variant, SYNTHETIC, args.batch, times, fp32 if variant != "fp32" else None),
                  flush=True)  # fmt: skip
    if not args.real_variants:
        return 0
    if not Path(args.root).exists():
        print(f"\n(no real-loader rows: {args.root} not found; `python tools/make_synth_cub.py` writes it)")
        return 0
    loader, num_classes = real_loader(args.root, args.batch, args.size, args.workers)
    data = f"{Path(args.root).name} loader, {args.workers} workers"
    times = time_steps(cycle(loader), args.warmup, args.steps, lambda images, labels: None)
    print(row("(loader alone)", "-", data, args.batch, times), flush=True)
    for name in args.models:
        for variant in args.real_variants:
            times = bench_model(name, variant, cycle(loader), num_classes, args.warmup, args.steps)
            print(row(name, variant, data, args.batch, times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
