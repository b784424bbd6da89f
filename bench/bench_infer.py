"""CPU inference latency at batch 1: plugdet's detector (several inference options) vs Ultralytics' YOLOv8.

Both models hold the same weights (ours imported from theirs with `from_ultralytics`), so the bf16 accuracy check is
on equal footing. Variants are timed interleaved (one forward of each per round), so that load from other processes
on a shared machine hits them alike; the table gives the median and the minimum over the rounds and their ratios to
Ultralytics' fused fp32 model (on a shared machine the minimum is the steadier figure).

    python bench/bench_infer.py                   # yolov8n, sizes 256 and 640, 20 rounds, 2 threads
    python bench/bench_infer.py --scale s --sizes 640 --runs 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", "/tmp/ycfg")

from detect.interop.ultralytics import from_ultralytics  # noqa: E402
from detect.models.detector import Detector  # noqa: E402


def _reference_model(scale: str) -> torch.nn.Module:
    """Ultralytics' YOLOv8 with random weights, random BatchNorm statistics and spread-out class logits."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(f"yolov8{scale}.yaml", nc=80, verbose=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
        for seq in model.model[-1].cv3:
            seq[-1].bias.normal_(0.0, 1.0, generator=gen)
    return model.eval()


def _variants(scale: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> function(images [1, 3, S, S]) -> predictions; the first is the reference."""
    theirs = _reference_model(scale)
    ours = from_ultralytics(theirs).eval()
    ours_cl = from_ultralytics(theirs).eval().to(memory_format=torch.channels_last)
    fused = from_ultralytics(theirs).fuse()
    fused_cl = from_ultralytics(theirs).fuse().to(memory_format=torch.channels_last)
    theirs_fused = _reference_model(scale).fuse(verbose=False).eval()

    def channels_last(model: Detector) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: model(x.contiguous(memory_format=torch.channels_last))

    def bf16(model: Detector) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x.contiguous(memory_format=torch.channels_last))

        return run

    return {
        "ultralytics fused fp32": lambda x: theirs_fused(x)[0],
        "ours fp32": ours,
        "ours fp32 channels_last": channels_last(ours_cl),
        "ours fused fp32": fused,
        "ours fused fp32 channels_last": channels_last(fused_cl),
        "ours fused bf16 channels_last": bf16(fused_cl),
    }


@torch.inference_mode()
def bench(scale: str, sizes: list[int], runs: int, warmup: int) -> None:
    """Print the latency table and the bf16-vs-fp32 differences for each input size."""
    variants = _variants(scale)
    names = list(variants)
    print(f"yolov8{scale}, batch 1, {torch.get_num_threads()} threads, median of {runs} interleaved runs (ms)")
    print("ratios: median / median and min / min of Ultralytics'; on a busy machine the min ratio is the steadier")
    print(f"{'size':>5}  {'variant':<32}{'median':>9}{'min':>9}{'median ratio':>14}{'min ratio':>11}")
    for size in sizes:
        images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(warmup + runs):
            for name in names:
                start = time.perf_counter()
                variants[name](images)
                if round_index >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
        ref_median, ref_min = statistics.median(times[names[0]]), min(times[names[0]])
        for name in names:
            median, fastest = statistics.median(times[name]), min(times[name])
            ratios = f"{median / ref_median:>13.2f}x{fastest / ref_min:>10.2f}x"
            print(f"{size:>5}  {name:<32}{median:>9.1f}{fastest:>9.1f}{ratios}")
        fp32 = variants["ours fused fp32"](images)
        low = variants["ours fused bf16 channels_last"](images)
        exact = variants["ours fp32"](images)
        print(
            f"{size:>5}  bf16 vs fp32: max |score diff| {(low[..., 4:] - exact[..., 4:]).abs().max():.4f}, "
            f"max |box diff| {(low[..., :4] - exact[..., :4]).abs().max():.2f} px; "
            f"fused vs unfused max |score diff| {(fp32[..., 4:] - exact[..., 4:]).abs().max():.2e}"
        )


def main() -> None:
    """Parse the arguments, fix the thread count, run the benchmark."""
    from detect.precision import cpu_report

    print(cpu_report(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="n", choices=list("nsmlx"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 640])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench(args.scale, args.sizes, args.runs, args.warmup)


if __name__ == "__main__":
    main()
