"""The detection training step alone vs the data pipeline alone, at the default config (YOLOv8n, 256 px, batch 16).

`python bench/bench_train_step.py [--threads 2] [--steps 8]`:

1. the CPU cost of one augmented (Mosaic) sample, decoding from disk and from the RAM cache (`data.cache`);
2. our full step on one fixed batch of the default train set (forward + build_yolo_loss + backward + SGD step), median
   ms for fp32 NCHW / fp32 channels_last / bf16 autocast + channels_last;
3. the raw step, forward + backward with a plain loss (mean of squared outputs), of our detector and of
   Ultralytics' `DetectionModel("yolov8n.yaml")`, NCHW vs channels_last, runs interleaved: what channels_last is
   worth for the very same network on this CPU.

Together with `bench_train_vs_ultralytics.py` it shows how much of a training epoch is the model and how much the
loop and the loader around it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from detect.config import DetConfig, load_config
from detect.data.detection import DetectionDataset, detection_collate
from detect.models import build_yolo
from detect.precision import to_input
from detect.train.builders import build_det_criterion, build_det_datasets, build_det_model, build_det_optimizer


def sample_cost(train: DetectionDataset, samples: int = 32) -> float:
    """ms of CPU per augmented training sample (Mosaic on), read as the data set reads now (disk or RAM cache)."""
    train[(0, 0)]
    start = time.perf_counter()
    for i in range(16, 16 + samples):
        train[(i, 0)]
    return (time.perf_counter() - start) / samples * 1000


def full_steps(images: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
    """Our full training step, per variant: median ms, img/s and the loss's share."""
    cfg = load_config(DetConfig, None, ["model.backbone_weights=null"])
    print("\nfull step (forward + build_yolo_loss + backward + SGD step), one fixed batch of 16:\n")
    print("| variant | ms/step (median) | img/s | loss ms |\n|---|---:|---:|---:|")
    for channels_last, bf16 in ((False, False), (True, False), (True, True)):
        model = build_det_model(load_config(DetConfig, None, ["model.backbone_weights=null",
                                                               f"train.channels_last={channels_last}"]), 1)  # fmt: skip
        criterion, optimizer = build_det_criterion(cfg, model), build_det_optimizer(cfg, model)
        x = to_input(images, torch.device("cpu"), channels_last)
        times, losses = [], []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outputs = model(x)
            t1 = time.perf_counter()
            total, _ = criterion([o.float() for o in outputs], targets)
            t2 = time.perf_counter()
            total.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - t0)
            losses.append(t2 - t1)
        step, loss = statistics.median(times[1:]), statistics.median(losses[1:])
        name = "bf16 + channels_last" if bf16 else ("fp32 channels_last" if channels_last else "fp32 NCHW")
        print(f"| {name} | {step * 1000:.0f} | {16 / step:.1f} | {loss * 1000:.1f} |", flush=True)


def raw_steps(steps: int) -> None:
    """Forward + backward of our detector and Ultralytics' yolov8n, NCHW and channels_last, interleaved."""
    from ultralytics.nn.tasks import DetectionModel

    def outputs_of(result: object) -> list[torch.Tensor]:
        if isinstance(result, dict):
            result = list(result.values())
        result = result if isinstance(result, list | tuple) else [result]
        return [o for o in result if torch.is_tensor(o)]

    x = torch.rand(16, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    builders: dict[str, Callable[[], nn.Module]] = {
        "plugdet": lambda: build_yolo("n", 1),
        "Ultralytics": lambda: DetectionModel("yolov8n.yaml", nc=1, verbose=False),
    }
    runs = {}
    for name, build in builders.items():
        for channels_last in (False, True):
            model = build().train()
            model = model.to(memory_format=torch.channels_last) if channels_last else model
            runs[(name, channels_last)] = (
                model,
                x.contiguous(memory_format=torch.channels_last) if channels_last else x,
            )
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in runs}
    for _ in range(steps + 1):
        for key, (model, inputs) in runs.items():
            start = time.perf_counter()
            sum(o.float().square().mean() for o in outputs_of(model(inputs))).backward()
            times[key].append(time.perf_counter() - start)
    print("\nraw step (forward + backward, loss = mean of squared outputs), batch 16, interleaved:\n")
    print("| model | NCHW ms | channels_last ms | channels_last speed-up |\n|---|---:|---:|---:|")
    for name in builders:
        nchw, cl = (statistics.median(times[(name, c)][1:]) * 1000 for c in (False, True))
        print(f"| {name} | {nchw:.0f} | {cl:.0f} | {nchw / cl:.2f}x |")


def main() -> None:
    from detect.precision import cpu_report

    print(cpu_report(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = build_det_datasets(load_config(DetConfig, None, ["model.backbone_weights=null"]))
    from_disk = sample_cost(train)
    train.cache_images()
    from_ram = sample_cost(train)
    print(f"augmented Mosaic sample: {from_disk:.1f} ms of CPU from disk, {from_ram:.1f} ms from the RAM cache")
    images, targets, _ = detection_collate([train[(i, 0)] for i in range(16)])
    full_steps(images, targets, args.steps)
    raw_steps(args.steps)


if __name__ == "__main__":
    main()
