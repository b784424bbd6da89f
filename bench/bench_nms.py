"""Postprocess (confidence filter + NMS) time: plugdet's `postprocess` vs Ultralytics' `non_max_suppression`.

The worst single-label case at 640 x 640: 8,400 anchors, 80 classes, every anchor's best score above the
threshold, so all 8,400 candidates enter NMS. Each side gets the layout it expects (ours [B, A, 4 + C] xyxy;
Ultralytics [B, 4 + C, A] cxcywh) built from the same boxes and scores; conversion is not timed.

Usage: python bench/bench_nms.py [--runs 20] [--threads 2] [--val]
(--val adds the validation setting: conf 0.001, multi-label, where max_nms caps the candidates at 30,000.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", "/tmp/ycfg")

import torch  # noqa: E402

from detect.boxes import xyxy2cxcywh  # noqa: E402
from detect.postprocess import postprocess  # noqa: E402


def make_predictions(anchors: int, num_classes: int, size: int, seed: int) -> torch.Tensor:
    """[1, A, 4 + C] xyxy boxes of 8 to 160 pixels anywhere in the image, scores whose best is above 0.25."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(1, anchors, 2, generator=gen) * size
    wh = torch.rand(1, anchors, 2, generator=gen) * 152 + 8
    boxes = torch.cat((centre - wh / 2, centre + wh / 2), -1).clamp(0, size)
    scores = torch.rand(1, anchors, num_classes, generator=gen) * 0.3
    best = torch.randint(0, num_classes, (1, anchors, 1), generator=gen)
    scores.scatter_(2, best, 0.3 + 0.7 * torch.rand(1, anchors, 1, generator=gen))
    return torch.cat((boxes, scores), -1)


def median_ms(first: Callable[[], object], second: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median wall times of two functions in milliseconds, after two warm-up calls each.

    Calls alternate (first, second, first, ...) so that a shared machine's load shifts both figures alike.
    """
    for fn in (first, second, first, second):
        fn()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for fn, bucket in zip((first, second), times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main() -> None:
    from detect.precision import cpu_report

    print(cpu_report(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--val", action="store_true", help="also time conf 0.001 multi-label (validation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from ultralytics.utils.nms import non_max_suppression

    ours_in = make_predictions(8400, 80, 640, seed=0)
    theirs_in = torch.cat((xyxy2cxcywh(ours_in[..., :4]), ours_in[..., 4:]), -1).transpose(1, 2).contiguous()
    cases = [("single-label, conf 0.25", 0.25, False)]
    if args.val:
        cases.append(("multi-label, conf 0.001", 0.001, True))

    print(f"postprocess at 640: 8,400 anchors, 80 classes, {args.threads} threads, median of {args.runs} runs")
    print(
        f"| {'case':<26} | {'candidates':>10} | {'kept':>5} | {'plugdet ms':>10} | {'Ultralytics ms':>14} | speed-up |"
    )
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 7}|{'-' * 12}|{'-' * 16}|{'-' * 10}|")
    for name, conf, multi in cases:
        scores = ours_in[0, :, 4:]
        candidates = int((scores > conf).sum()) if multi else int((scores.amax(1) > conf).sum())
        kept = len(postprocess(ours_in, conf, 0.7, 300, multi)[0]["scores"])
        ours, theirs = median_ms(
            lambda c=conf, m=multi: postprocess(ours_in, c, 0.7, 300, m),
            lambda c=conf, m=multi: non_max_suppression(theirs_in, c, 0.7, multi_label=m, max_det=300),
            args.runs,
        )
        print(
            f"| {name:<26} | {candidates:>10,} | {kept:>5} | {ours:>10.1f} | {theirs:>14.1f} | {theirs / ours:>7.1f}x |"
        )


if __name__ == "__main__":
    main()
