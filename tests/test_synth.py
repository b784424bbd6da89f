"""Synthetic mini-CUB: CUB layout, determinism per seed, tight boxes, fine-grained species, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool
from PIL import Image

from backbones.errors import UserError
from detect.cli import run_tool
from detect.data.cub import CubDetection, read_cub
from detect.data.synth import SpeciesTraits, make_synth_cub, render_sample, species_traits, synth_cub_exists

REPO = Path(__file__).resolve().parents[1]
TINY = {"width_range": (64, 80), "height_range": (48, 60)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    first = make_synth_cub(tmp_path / "a", num_species=2, images_per_species=3, seed=7, **TINY)
    second = make_synth_cub(tmp_path / "b", num_species=2, images_per_species=3, seed=7, **TINY)
    other = make_synth_cub(tmp_path / "c", num_species=2, images_per_species=3, seed=8, **TINY)
    assert _files(first) == _files(second)
    assert len(_files(first)) == 5 + 6
    assert _files(first)["bounding_boxes.txt"] != _files(other)["bounding_boxes.txt"]
    assert _files(first)["classes.txt"] == _files(other)["classes.txt"]


def test_cub_layout_split_and_boxes(synth_cub_root: Path) -> None:
    root = synth_cub_root / "CUB_200_2011"
    assert synth_cub_exists(synth_cub_root)
    assert (root / "classes.txt").read_text().splitlines() == [
        "1 001.Common_Finch",
        "2 002.Blue_crowned_Finch",
        "3 003.Buff_breasted_Finch",
        "4 004.Long_billed_Finch",
    ]
    lines = (root / "images.txt").read_text().splitlines()
    assert lines[0] == "1 001.Common_Finch/Common_Finch_0000.jpg" and len(lines) == 24
    assert lines[23] == "24 004.Long_billed_Finch/Long_billed_Finch_0005.jpg"
    data = read_cub(synth_cub_root)
    assert data.class_ids.tolist() == [c for c in (1, 2, 3, 4) for _ in range(6)]
    assert [int(data.is_train[data.class_ids == c].sum()) for c in (1, 2, 3, 4)] == [3, 3, 3, 3]
    for line in (root / "bounding_boxes.txt").read_text().splitlines():
        assert all(len(v.split(".")[1]) == 1 for v in line.split()[1:])  # "12.0": CUB's float pixels
    for index, relative in enumerate(data.image_paths):
        with Image.open(root / "images" / relative) as image:
            width, height = image.size
        x, y, w, h = data.boxes_xywh[index]
        assert min(x, y) >= 0 and w > 0 and h > 0 and x + w <= width and y + h <= height


@pytest.mark.parametrize("seed", range(12))
def test_box_is_the_tight_box_of_the_drawn_bird(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sample = render_sample(species_traits(seed), rng, 90 + 7 * seed, 120 + 5 * seed)
    x1, y1, x2, y2 = (int(v) for v in sample.box)
    assert sample.box == (float(x1), float(y1), float(x2), float(y2))
    rows, cols = np.flatnonzero(sample.mask.any(axis=1)), np.flatnonzero(sample.mask.any(axis=0))
    assert (x1, y1, x2, y2) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    changed = (sample.image != sample.background).any(axis=-1)  # [H, W] pixels the bird altered
    assert not (changed & ~sample.mask).any()  # nothing outside the bird differs from the bird-less scene
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    assert (x1, y1, x2, y2) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)  # every box edge touches the bird


def test_boxes_vary_in_size_and_some_touch_the_border() -> None:
    sides, touching = [], 0
    for seed in range(60):
        sample = render_sample(species_traits(seed % 20), np.random.default_rng([5, seed]), 150, 200)
        x1, y1, x2, y2 = sample.box
        sides.append(max((x2 - x1) / 200, (y2 - y1) / 150))
        touching += x1 == 0 or y1 == 0 or x2 == 200 or y2 == 150
    assert min(sides) < 0.25 and max(sides) > 0.75
    assert 1 <= touching <= 20


def _differences(a: SpeciesTraits, b: SpeciesTraits) -> set[str]:
    fields = ("body", "crown", "wing", "breast", "beak_length", "tail", "wing_bars")
    return {field for field in fields if getattr(a, field) != getattr(b, field)}


def test_species_are_fine_grained_variants_of_their_genus() -> None:
    traits = [species_traits(index) for index in range(40)]
    assert len({t.name for t in traits}) == 40
    assert [t.name for t in traits[:4]] == [
        "Common_Finch",
        "Blue_crowned_Finch",
        "Buff_breasted_Finch",
        "Long_billed_Finch",
    ]
    for genus in range(10):
        base, crown, breast, beak = traits[4 * genus : 4 * genus + 4]
        assert _differences(base, crown) == {"crown"}
        assert _differences(base, breast) == {"breast", "wing_bars"}
        assert _differences(base, beak) == {"beak_length", "tail"}
    assert {t.tail for t in traits} == {"forked", "rounded", "pointed", "fan"}


def test_grayscale_images_are_written_as_single_channel(tmp_path: Path) -> None:
    root = make_synth_cub(tmp_path, num_species=1, images_per_species=40, seed=0, **TINY)
    modes = [Image.open(p).mode for p in sorted((root / "images").rglob("*.jpg"))]
    assert "L" in modes and modes.count("L") <= 6  # about 3% gray, as CUB
    source = CubDetection(root, "all")
    gray = modes.index("L")
    assert source.load_image(gray).shape[2] == 3


def test_bad_arguments_and_existing_data(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="images per species"):
        make_synth_cub(tmp_path, images_per_species=1)
    with pytest.raises(UserError, match="species"):
        make_synth_cub(tmp_path, num_species=0)
    with pytest.raises(UserError, match="width range"):
        make_synth_cub(tmp_path, width_range=(300, 200))
    root = make_synth_cub(tmp_path, num_species=1, images_per_species=2, **TINY)
    with pytest.raises(UserError, match="already exists"):
        make_synth_cub(tmp_path, num_species=1, images_per_species=2, **TINY)
    make_synth_cub(tmp_path, num_species=2, images_per_species=2, overwrite=True, **TINY)
    assert len(read_cub(root).image_ids) == 4
    assert not list(tmp_path.glob(".CUB_200_2011.partial*"))


def test_cli_generates_skips_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tool = load_tool("make_synth_cub")
    args = ["--out", str(tmp_path), "--species", "2", "--per-species", "2", "--image-width", "64", "80"]
    args += ["--image-height", "48", "60"]
    sheet = tmp_path / "sheet.png"
    assert run_tool(tool.main, [*args, "--contact-sheet", str(sheet)]) == 0
    assert "wrote 4 images of 2 species" in capsys.readouterr().out
    assert sheet.is_file() and Image.open(sheet).size == (800, 4 * 166)
    before = (tmp_path / "CUB_200_2011" / "bounding_boxes.txt").read_bytes()
    assert run_tool(tool.main, args) == 0
    assert "already exists; skipping" in capsys.readouterr().out
    assert run_tool(tool.main, [*args, "--force", "--seed", "3"]) == 0
    assert (tmp_path / "CUB_200_2011" / "bounding_boxes.txt").read_bytes() != before
    assert run_tool(tool.main, ["--out", str(tmp_path / "x"), "--per-species", "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: images per species must be >= 2") and error.count("\n") == 1
