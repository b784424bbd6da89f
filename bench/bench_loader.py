"""Data loader throughput alone: images/s of the YOLOv8 train pipeline (Mosaic on) for a few worker counts.

    python bench/bench_loader.py [--root data/synth_cub] [--img-size 256] [--batch 16] [--batches 20] [--workers 0 1 2]
        [--sources disk ram] [--pin-memory] [--json OUT.json]

Reads CUB (real or the synthetic mini-CUB of `tools/make_synth_cub.py`) through `CubDetection`, builds
`DetectionDataset(train=True, mosaic=1.0)` and times `--batches` batches after one warm-up batch (which also starts
the workers), for each worker count, first reading every image from disk, then from the RAM cache (`data.cache`,
`DetectionDataset.cache_images`; the time to fill it is printed). No model runs: this is the ceiling the loader puts
on training speed. `--sources disk` skips the RAM pass (a run with data.cache=false reads only from disk), and
`--pin-memory` pins each batch as the training loader does on CUDA (bench/gpu_check.sh uses both, with the batch,
image size and workers of the GPU training it runs beside).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.utils.data import DataLoader

from backbones.errors import UserError
from detect.cli import run_tool
from detect.data.cub import CubDetection
from detect.data.detection import DetectionDataset, detection_collate


def time_loader(dataset: DetectionDataset, batch: int, workers: int, batches: int, pin_memory: bool = False) -> float:
    """Images per second over `batches` batches after one warm-up batch.

    Args:
        dataset: the data set to iterate.
        batch: batch size.
        workers: DataLoader workers (0 = main process).
        batches: timed batches (the data set is cycled if it is shorter).
        pin_memory: pin each batch in page-locked memory (what the training loader does on CUDA).

    Returns:
        images / second.
    """
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=detection_collate,
        generator=torch.Generator().manual_seed(0),
        drop_last=True,
        pin_memory=pin_memory,
    )
    iterator = iter(loader)
    next(iterator)  # warm-up: starts the workers, fills their first prefetch
    seen, start = 0, time.perf_counter()
    while seen < batches * batch:
        try:
            images, _, _ = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    """Parse arguments, time each worker count, print a table."""
    from detect.precision import cpu_report

    print(cpu_report(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synth_cub", help="CUB_200_2011 or the folder holding it")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", choices=("disk", "ram"), default=["disk", "ram"],
                        help="read every image from disk, from the RAM cache, or both (in that order)")  # fmt: skip
    parser.add_argument("--pin-memory", action="store_true", help="pin batches (the CUDA training loader does)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.batch <= 0 or args.batches <= 0:
        raise UserError(f"--batch and --batches must be positive, got {args.batch} and {args.batches}")
    source = CubDetection(args.root, split="train", labels="bird")
    dataset = DetectionDataset(source, args.img_size, train=True, mosaic=1.0)
    if len(dataset) < args.batch:
        raise UserError(f"{args.root} has {len(dataset)} train images, fewer than one batch of {args.batch}")
    print(f"loader: {len(dataset)} train images from {args.root}, {args.img_size} px, batch {args.batch}, Mosaic on")
    print(
        f"torch threads {torch.get_num_threads()}; {args.batches} timed batches per row; pin_memory {args.pin_memory}\n"
    )
    print(f"{'images':>6} | {'workers':>7} | {'img/s':>8} | {'ms/batch':>9}")
    print(f"{'-' * 6}-+-{'-' * 7}-+-{'-' * 8}-+-{'-' * 9}")
    rows = []
    for where in ("disk", "ram"):
        if where not in args.sources:
            continue
        if where == "ram":
            start = time.perf_counter()
            size = dataset.cache_images()
            print(f"(cache filled in {time.perf_counter() - start:.2f} s, {size / 2**20:.0f} MB)")
        for workers in args.workers:
            rate = time_loader(dataset, args.batch, workers, args.batches, args.pin_memory)
            print(f"{where:>6} | {workers:>7} | {rate:>8.1f} | {1000 * args.batch / rate:>9.1f}", flush=True)
            rows.append({"images": where, "workers": workers, "img_s": rate, "ms_per_batch": 1000 * args.batch / rate})
            if args.json:  # after each row: a run stopped by a timeout keeps the rows it measured
                setting = {"root": args.root, "img_size": args.img_size, "batch": args.batch, "pin_memory":
                           args.pin_memory, "train_images": len(dataset)}  # fmt: skip
                with open(args.json, "w") as handle:
                    json.dump({"setting": setting, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
