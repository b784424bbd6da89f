"""Generate the synthetic mini-CUB in the CUB_200_2011 layout (DESIGN §4).

Usage: `python tools/make_synth_cub.py [--out data/synth_cub] [--species 20] [--per-species 60] [--seed 0] [--force]
[--image-width 400 500] [--image-height 300 400] [--contact-sheet docs/synth_cub_contact_sheet.png] [--debug]`.
Skips the generation, with a message, when `<out>/CUB_200_2011` is already complete, unless `--force`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from detect.cli import exit_process, run_tool
from detect.data.synth import make_synth_cub, synth_cub_exists


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="make_synth_cub.py", description="Generate the synthetic mini-CUB.")
    parser.add_argument("--out", default="data/synth_cub", help="folder that receives CUB_200_2011/")
    parser.add_argument("--species", type=int, default=20, help="number of species (groups of 4 form a genus)")
    parser.add_argument("--per-species", type=int, default=60, help="images per species (half train, half test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-width", type=int, nargs=2, default=(400, 500), metavar=("LOW", "HIGH"))
    parser.add_argument("--image-height", type=int, nargs=2, default=(300, 400), metavar=("LOW", "HIGH"))
    parser.add_argument("--force", action="store_true", help="regenerate even if the data set exists")
    parser.add_argument("--contact-sheet", default=None, metavar="PNG", help="also write a thumbnail grid")
    args = parser.parse_args(argv)
    if synth_cub_exists(args.out) and not args.force:
        print(f"{args.out}/CUB_200_2011 already exists; skipping (use --force to regenerate)")
    else:
        start = time.perf_counter()
        root = make_synth_cub(
            args.out,
            num_species=args.species,
            images_per_species=args.per_species,
            seed=args.seed,
            width_range=tuple(args.image_width),
            height_range=tuple(args.image_height),
            overwrite=args.force,
        )
        seconds = time.perf_counter() - start
        print(f"wrote {args.species * args.per_species} images of {args.species} species to {root} in {seconds:.1f} s")
    if args.contact_sheet:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script tools/make_contact_sheet.py
        from make_contact_sheet import save_contact_sheet

        print(f"wrote {save_contact_sheet(args.out, args.contact_sheet)}")
    return 0


if __name__ == "__main__":
    exit_process(run_tool(main))
