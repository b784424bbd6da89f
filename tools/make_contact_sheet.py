"""Contact sheet of a CUB-layout data set: `python tools/make_contact_sheet.py [--root data/synth_cub] [--out PNG]`.

One thumbnail per species (the first `rows * cols` species, row-major, so with the synthetic mini-CUB each row is
one genus), showing the training image with the largest box, the box in green and the species name. Written as a
256-colour PNG to stay small (docs/synth_cub_contact_sheet.png is generated this way).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from detect.cli import exit_process, run_tool
from detect.data.cub import CubDetection


def _thumbnail(image: np.ndarray, box: np.ndarray, name: str, cell: tuple[int, int]) -> np.ndarray:
    """Fit `image` into a `cell` (width, height) tile with its box and the name drawn; uint8 [h, w, 3] RGB."""
    width, height = cell
    scale = min(width / image.shape[1], (height - 16) / image.shape[0])
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    tile = np.full((height, width, 3), 24, np.uint8)
    left = (width - size[0]) // 2
    tile[: size[1], left : left + size[0]] = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    x1, y1, x2, y2 = (box * scale).round().astype(int)
    cv2.rectangle(tile, (left + x1, y1), (left + x2 - 1, y2 - 1), (40, 230, 60), 1, cv2.LINE_AA)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(tile, name.replace("_", " "), (3, height - 4), font, 0.36, (235, 235, 235), 1, cv2.LINE_AA)
    return tile


def save_contact_sheet(
    root: str | Path, out_png: str | Path, rows: int = 4, cols: int = 4, cell_width: int = 200
) -> Path:
    """Write a `rows x cols` grid of per-species thumbnails of the CUB-layout data set at `root` to `out_png`.

    Args:
        root: CUB_200_2011 folder or the folder holding it.
        out_png: output PNG path (parent folders are created).
        rows: grid rows.
        cols: grid columns.
        cell_width: thumbnail width in pixels (height = 3/4 of it plus a caption line).

    Returns:
        The PNG path.
    """
    source = CubDetection(root, "train", labels="species")
    best: dict[int, tuple[float, int]] = {}
    for index in range(len(source)):
        boxes, labels = source.annotations(index)
        if len(labels):
            height, width = source.image_size(index)
            area = float((boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1])) / (height * width)
            best[int(labels[0])] = max(best.get(int(labels[0]), (-1.0, -1)), (area, index))
    cell = (cell_width, cell_width * 3 // 4 + 16)
    tiles = []
    for label in sorted(best)[: rows * cols]:
        index = best[label][1]
        tiles.append(
            _thumbnail(source.load_image(index), source.annotations(index)[0][0], source.class_names[label], cell)
        )
    tiles += [np.zeros_like(tiles[0])] * (rows * cols - len(tiles))
    grid = np.concatenate([np.concatenate(tiles[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).quantize(colors=256, dither=Image.Dither.NONE).save(out_png, optimize=True)
    return out_png


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="make_contact_sheet.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--root", default="data/synth_cub", help="CUB_200_2011 folder or the folder holding it")
    parser.add_argument("--out", default="docs/synth_cub_contact_sheet.png", help="output PNG")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--cols", type=int, default=4)
    args = parser.parse_args(argv)
    path = save_contact_sheet(args.root, args.out, args.rows, args.cols)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    exit_process(run_tool(main))
