"""The detection training step alone vs the data pipeline alone, at the default config (YOLOv8n, 256 px, batch 16).

`python bench/bench_train_step.py [--threads 2] [--steps 8]`: one fixed batch from the default train set; median
time of forward + loss + backward + SGD step for fp32 / channels_last / bf16 autocast, and the CPU cost of one
augmented (Mosaic) sample. Together with `bench_train_vs_ultralytics.py` it shows how much of a training epoch is
the model and how much the loop and loader around it.
"""

from __future__ import annotations

import argparse
import time

import torch

from detect.config import DetConfig, load_config
from detect.data.detection import detection_collate
from detect.engine import to_input
from detect.training import build_det_criterion, build_det_datasets, build_det_model, build_det_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(DetConfig, None, ["model.backbone_weights=null"])
    train, _ = build_det_datasets(cfg)
    images, targets, _ = detection_collate([train[(i, 0)] for i in range(16)])
    start = time.perf_counter()
    for i in range(16, 48):
        train[(i, 0)]
    print(f"augmented Mosaic sample: {(time.perf_counter() - start) / 32 * 1000:.1f} ms of CPU")
    print("| variant | ms/step (median) | img/s | loss ms |\n|---|---:|---:|---:|")
    for channels_last, bf16 in ((False, False), (True, False), (True, True)):
        model = build_det_model(cfg, 1)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        criterion, optimizer = build_det_criterion(cfg, model), build_det_optimizer(cfg, model)
        x = to_input(images, torch.device("cpu"), channels_last)
        steps, losses = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outputs = model(x)
            t1 = time.perf_counter()
            total, _ = criterion([o.float() for o in outputs], targets)
            t2 = time.perf_counter()
            total.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps.append(time.perf_counter() - t0)
            losses.append(t2 - t1)
        step, loss = sorted(steps)[len(steps) // 2], sorted(losses)[len(losses) // 2]
        name = "bf16 + channels_last" if bf16 else ("fp32 channels_last" if channels_last else "fp32 NCHW")
        print(f"| {name} | {step * 1000:.0f} | {16 / step:.1f} | {loss * 1000:.1f} |")


if __name__ == "__main__":
    main()
