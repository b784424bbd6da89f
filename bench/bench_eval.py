"""Time COCO box evaluation: pycocotools vs faster-coco-eval at CUB test size, on synthetic detections.

CUB-200-2011's test split has 5,794 images with one box each; validation NMS at conf 0.001 keeps up to 300
detections per image (DESIGN §5). This script builds such a ground truth (200 species categories, one box per image)
and ~300 synthetic detections per image (a few near the bird with mixed classes, the rest clutter, scores skewed low
like a real low-threshold output), then times `detect.eval.coco.coco_evaluate` end to end with each backend and checks
that both give the same 12 numbers.

    python bench/bench_eval.py                      # full size: 5,794 images x 300 detections
    python bench/bench_eval.py --images 1000        # a short run
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import numpy as np

from detect.eval.coco import coco_evaluate, stat_names


def make_case(num_images: int, dets_per_image: int, num_classes: int, seed: int) -> tuple[dict, list[dict]]:
    """Ground truth (one box per image) and detections in COCO results format."""
    rng = np.random.default_rng(seed)
    widths = rng.integers(300, 501, num_images).astype(np.float64)  # [N]
    heights = rng.integers(300, 501, num_images).astype(np.float64)  # [N]
    box_w, box_h = widths * rng.uniform(0.3, 0.9, num_images), heights * rng.uniform(0.3, 0.9, num_images)
    box_x, box_y = rng.uniform(0, widths - box_w), rng.uniform(0, heights - box_h)
    labels = rng.integers(0, num_classes, num_images)  # [N]
    sizes = zip(widths.tolist(), heights.tolist(), strict=True)
    images = [{"id": i + 1, "width": int(w), "height": int(h)} for i, (w, h) in enumerate(sizes)]
    anns = [
        {"id": i + 1, "image_id": i + 1, "category_id": int(c) + 1, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
        for i, (x, y, w, h, c) in enumerate(zip(box_x, box_y, box_w, box_h, labels, strict=True))
    ]
    categories = [{"id": c + 1, "name": f"species_{c + 1:03d}"} for c in range(num_classes)]

    near = min(10, dets_per_image)  # detections around the bird: jittered boxes, mixed classes
    shape = (num_images, dets_per_image)
    jitter = rng.normal(0.0, 0.08, (*shape, 4))  # [N, D, 4] relative to the box size
    rand_w = widths[:, None] * rng.uniform(0.05, 0.6, shape)  # [N, D]
    rand_h = heights[:, None] * rng.uniform(0.05, 0.6, shape)  # [N, D]
    x = rng.uniform(0, 1, shape) * (widths[:, None] - rand_w)  # [N, D]
    y = rng.uniform(0, 1, shape) * (heights[:, None] - rand_h)  # [N, D]
    bw, bh = box_w[:, None], box_h[:, None]  # [N, 1]
    x[:, :near] = box_x[:, None] + jitter[:, :near, 0] * bw
    y[:, :near] = box_y[:, None] + jitter[:, :near, 1] * bh
    rand_w[:, :near] = bw * np.exp(jitter[:, :near, 2])
    rand_h[:, :near] = bh * np.exp(jitter[:, :near, 3])
    classes = rng.integers(0, num_classes, shape)  # [N, D]
    classes[:, 0] = np.where(rng.random(num_images) < 0.7, labels, classes[:, 0])  # the top one is often right
    scores = 0.001 + 0.999 * rng.beta(0.4, 6.0, shape)  # [N, D], mostly near the threshold
    scores[:, 0] = rng.uniform(0.3, 1.0, num_images)
    bbox = np.stack([x, y, rand_w, rand_h], axis=-1).round(3)  # [N, D, 4]
    image_ids = np.repeat(np.arange(1, num_images + 1), dets_per_image)  # [N*D]
    dets = [
        {"image_id": i, "category_id": c + 1, "bbox": b, "score": s}
        for i, c, b, s in zip(
            image_ids.tolist(),
            classes.reshape(-1).tolist(),
            bbox.reshape(-1, 4).tolist(),
            scores.reshape(-1).round(5).tolist(),
            strict=True,
        )
    ]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def main() -> None:
    from detect.precision import cpu_report

    print(cpu_report(), flush=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5794)
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--backends", nargs="+", default=["faster", "pycocotools"])
    parser.add_argument("--max-dets", type=int, nargs=3, default=[1, 10, 100])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tic = time.perf_counter()
    gt, dets = make_case(args.images, args.dets, args.classes, args.seed)
    print(f"case: {args.images} images, {len(dets):,} detections, {args.classes} classes "
          f"(built in {time.perf_counter() - tic:.1f}s)")  # fmt: skip
    results = {}
    for backend in args.backends:
        gc.collect()
        tic = time.perf_counter()
        results[backend] = coco_evaluate(gt, dets, backend=backend, max_dets=args.max_dets)
        seconds = time.perf_counter() - tic
        results[backend]["seconds"] = seconds
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ap = results[backend]["AP"]
        print(f"{backend:>12}: {seconds:7.2f}s  AP {ap:.5f}  (process peak RSS so far {peak:.0f} MiB)")
    if {"faster", "pycocotools"} <= set(results):
        ref, fast = results["pycocotools"], results["faster"]
        diff = np.abs(np.subtract(ref["coco_stats"], fast["coco_stats"])).max()
        ratio = ref["seconds"] / fast["seconds"]
        print(f"speed-up faster vs pycocotools: {ratio:.1f}x; max |diff| of the 12 stats {diff:.1e}")
        names = stat_names(args.max_dets)
        print("  " + " ".join(f"{n:>7}" for n in names))
        print("  " + " ".join(f"{v:7.4f}" for v in ref["coco_stats"]))


if __name__ == "__main__":
    main()
