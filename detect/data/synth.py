"""Synthetic mini-CUB: procedurally drawn birds written in the exact CUB_200_2011 layout (DESIGN §4).

Species are grouped in genera of four. A genus fixes body colour, wing colour, breast colour, crown colour, beak
length, tail shape and wing bars; its four species are the base ("Common_Finch") and three variants that change one
or two traits: the crown colour ("Red_crowned_Finch"), the breast colour and the wing bars ("Yellow_breasted_Finch"),
or the beak length and the tail shape ("Long_billed_Finch"). Telling species of one genus apart therefore needs the
small parts of the bird, as in CUB.

Every image draws one bird with cv2 (tail, body, breast patch, wing with optional bars, head, crown, eye, beak,
legs) on a cluttered background (sky / foliage / ground / water gradients, blurred blobs, branches, leaves, noise,
sometimes flowers, berries or stones that are not birds), in a random pose: facing left or right, rotated by up to
20 degrees, with a box side from about 10% to 90% of the image side; some birds are cut by the image border and
about 3% of the images are grayscale, as in CUB. The box in bounding_boxes.txt is the tight box of the drawn bird
mask. Each image depends only on `(seed, species, index)`, so a seed gives byte-identical files.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from backbones.errors import UserError
from detect.data.cub import CUB_DIR_NAME

RGB = tuple[int, int, int]

GENERA = ("Finch", "Warbler", "Sparrow", "Tanager", "Wren", "Vireo", "Flycatcher", "Bunting", "Grosbeak", "Kinglet")
BODY = ((128, 96, 66), (124, 126, 130), (112, 116, 64), (84, 96, 122), (176, 152, 112), (150, 82, 48), (58, 56, 60))
CROWN = {
    "Red": (196, 40, 34),
    "Yellow": (232, 200, 40),
    "Black": (28, 28, 30),
    "Blue": (48, 92, 196),
    "White": (236, 236, 230),
    "Orange": (232, 128, 32),
    "Chestnut": (124, 58, 28),
}
WING = ((78, 54, 36), (98, 100, 106), (88, 100, 48), (68, 84, 116), (36, 36, 40), (146, 74, 40))
BREAST = {
    "White": (236, 232, 222),
    "Yellow": (236, 204, 68),
    "Orange": (226, 140, 60),
    "Buff": (214, 188, 146),
    "Grey": (168, 168, 170),
    "Rosy": (210, 110, 120),
}
BEAK_LENGTHS = {"Short": 0.45, "Medium": 0.8, "Long": 1.3}  # in head radii
TAILS = ("forked", "rounded", "pointed", "fan")
CANVAS_W, CANVAS_H = 360, 280  # local canvas of one bird facing right
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt")


@dataclass(frozen=True)
class SpeciesTraits:
    """The drawing traits of one synthetic species (colours RGB, beak length in head radii)."""

    name: str
    body: RGB
    crown: RGB
    wing: RGB
    breast: RGB
    beak_length: float
    tail: str
    wing_bars: bool


@dataclass(frozen=True)
class SynthSample:
    """One rendered image: `image`/`background` uint8 [H, W, 3] RGB (background = before the bird was pasted),
    `mask` bool [H, W] of the bird pixels, `box` (x1, y1, x2, y2) tight pixel-edge box of the mask, `gray` flag."""

    image: np.ndarray
    background: np.ndarray
    mask: np.ndarray
    box: tuple[float, float, float, float]
    gray: bool


def species_traits(index: int) -> SpeciesTraits:
    """Traits of species `index` (0-based): genus `index // 4`, variant `index % 4` (see the module docstring)."""
    genus, variant = divmod(index, 4)
    genus_name = GENERA[genus] if genus < len(GENERA) else f"Genus{genus + 1}"
    crowns, breasts, beaks = list(CROWN), list(BREAST), list(BEAK_LENGTHS)
    crown = crowns[(2 * genus) % len(crowns)]
    breast = breasts[(3 * genus + 1) % len(breasts)]
    beak = beaks[genus % len(beaks)]
    tail = TAILS[genus % len(TAILS)]
    bars = genus % 2 == 0
    name = f"Common_{genus_name}"
    if variant == 1:
        crown = crowns[(crowns.index(crown) + 3) % len(crowns)]
        name = f"{crown}_crowned_{genus_name}"
    elif variant == 2:
        breast = breasts[(breasts.index(breast) + 2) % len(breasts)]
        bars = not bars
        name = f"{breast}_breasted_{genus_name}"
    elif variant == 3:
        beak = "Short" if beak == "Long" else "Long"
        tail = TAILS[(TAILS.index(tail) + 2) % len(TAILS)]
        name = f"{beak}_billed_{genus_name}"
    return SpeciesTraits(
        name=name,
        body=BODY[genus % len(BODY)],
        crown=CROWN[crown],
        wing=WING[(5 * genus + 1) % len(WING)],
        breast=BREAST[breast],
        beak_length=BEAK_LENGTHS[beak],
        tail=tail,
        wing_bars=bars,
    )


def _tail_polygon(tail: str) -> np.ndarray:
    """Tail outline (int32 [P, 2]) in canvas pixels, attached under the rump and pointing back-down."""
    base, direction = np.array([112.0, 168.0]), np.array([-0.93, 0.37])
    normal = np.array([-direction[1], direction[0]])
    half = {"forked": 11, "rounded": 12, "pointed": 12, "fan": 10}[tail]
    if tail == "pointed":
        profile = [(0, half), (88, 0), (0, -half)]
    elif tail == "forked":
        profile = [(0, half), (78, 22), (48, 0), (78, -22), (0, -half)]
    elif tail == "rounded":
        arc = [(58 + 16 * math.cos(t), 16 * math.sin(t)) for t in np.linspace(math.pi / 2, -math.pi / 2, 9)]
        profile = [(0, half), *arc, (0, -half)]
    else:  # fan: widening wedge with an arc end
        arc = [(48 + 16 * math.cos(t), 36 * math.sin(t)) for t in np.linspace(math.pi / 2, -math.pi / 2, 11)]
        profile = [(0, half), *arc, (0, -half)]
    points = [base + along * direction + across * normal for along, across in profile]
    return np.round(np.array(points)).astype(np.int32)  # [P, 2]


def _jitter(colour: RGB, rng: np.random.Generator, gain: float) -> tuple[float, float, float]:
    noisy = np.asarray(colour, dtype=np.float64) * gain + rng.normal(0.0, 6.0, 3)
    return tuple(float(c) for c in np.clip(noisy, 0, 255))


def draw_bird(traits: SpeciesTraits, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one bird facing right on a black local canvas.

    Returns:
        `(canvas uint8 [CANVAS_H, CANVAS_W, 3] RGB, mask uint8 [CANVAS_H, CANVAS_W] 255 on the bird)`.
    """
    gain = rng.uniform(0.82, 1.15)
    body, wing = _jitter(traits.body, rng, gain), _jitter(traits.wing, rng, gain)
    canvas = np.zeros((CANVAS_H, CANVAS_W, 3), np.uint8)
    mask = np.zeros((CANVAS_H, CANVAS_W), np.uint8)
    aa = cv2.LINE_AA
    head = (236 + int(rng.integers(-5, 6)), 96 + int(rng.integers(-10, 9)))  # posture: head raised or lowered
    radius = 31 + int(rng.integers(-2, 3))
    tail = _tail_polygon(traits.tail)
    tail_colour = tuple(0.8 * c for c in wing)
    cv2.fillPoly(canvas, [tail], tail_colour, aa)
    cv2.fillPoly(mask, [tail], 255)
    legs = ((160, 188), (180, 190))
    leg_colour = _jitter((70, 58, 48), rng, gain)
    for x, y in legs:  # legs, then toes
        for target in ((x - 4, y + 40), (x - 4 - 9, y + 44), (x - 4 + 8, y + 44)):
            start = (x, y) if target[1] == y + 40 else (x - 4, y + 40)
            cv2.line(canvas, start, target, leg_colour, 3, aa)
            cv2.line(mask, start, target, 255, 3)
    body_shape = ((170, 150), (72 + int(rng.integers(-5, 6)), 44 + int(rng.integers(-4, 5))), -20 + rng.uniform(-6, 6))
    cv2.ellipse(canvas, *body_shape, 0, 360, body, -1, aa)
    cv2.ellipse(mask, *body_shape, 0, 360, 255, -1)
    body_mask = np.zeros_like(mask)
    cv2.ellipse(body_mask, *body_shape, 0, 360, 255, -1)
    breast_mask = np.zeros_like(mask)
    cv2.ellipse(breast_mask, (204, 158), (42, 32), -35, 0, 360, 255, -1)
    canvas[(breast_mask > 0) & (body_mask > 0)] = np.round(_jitter(traits.breast, rng, gain)).astype(np.uint8)
    wing_mask = np.zeros_like(mask)
    cv2.ellipse(wing_mask, (154, 138), (56, 23), -12, 0, 360, 255, -1)
    cv2.fillPoly(wing_mask, [np.array([[110, 140], [84, 168], [140, 156]], np.int32)], 255)
    canvas[wing_mask > 0] = np.round(wing).astype(np.uint8)
    mask |= wing_mask
    if traits.wing_bars:
        bars = np.zeros_like(mask)
        for x in (150, 170):
            cv2.line(bars, (x, 118), (x - 10, 160), 255, 5)
        canvas[(bars > 0) & (wing_mask > 0)] = np.round(_jitter((236, 234, 224), rng, gain)).astype(np.uint8)
    beak_tip = (head[0] + int(radius * (0.85 + traits.beak_length)), head[1] + 6)
    beak = np.array([[head[0] + 24, head[1] - 8], [head[0] + 24, head[1] + 9], beak_tip], np.int32)
    cv2.fillPoly(canvas, [beak], _jitter((60, 54, 46), rng, gain), aa)
    cv2.fillPoly(mask, [beak], 255)
    cv2.circle(canvas, head, radius, body, -1, aa)
    cv2.circle(mask, head, radius, 255, -1)
    crown = cv2.ellipse2Poly(head, (radius, radius), 0, 192, 338, 6)  # chord cap over the top of the head
    cv2.fillPoly(canvas, [crown], _jitter(traits.crown, rng, gain), aa)
    cv2.circle(canvas, (head[0] + 12, head[1] - 2), 5, (18, 18, 18), -1, aa)
    cv2.circle(canvas, (head[0] + 13, head[1] - 4), 1, (240, 240, 240), -1, aa)
    shade = np.linspace(1.12, 0.82, CANVAS_H, dtype=np.float32)[:, None, None]  # light from above, [H, 1, 1]
    noise = rng.normal(0.0, 5.0, (CANVAS_H, CANVAS_W, 1)).astype(np.float32)
    shaded = np.clip(canvas.astype(np.float32) * shade + noise, 0, 255).astype(np.uint8)
    return np.where(mask[:, :, None] > 0, shaded, 0).astype(np.uint8), mask


def _gradient(top: np.ndarray, bottom: np.ndarray, height: int, width: int) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]  # [H, 1, 1]
    return np.ascontiguousarray(np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)), np.float32)


SCENES = {  # (top colour, bottom colour, blob colours) RGB
    "sky": ((120, 170, 225), (215, 230, 240), ((250, 250, 250), (170, 190, 210))),
    "foliage": ((60, 100, 45), (120, 140, 70), ((40, 80, 30), (150, 170, 80), (90, 70, 40))),
    "ground": ((150, 160, 120), (120, 95, 65), ((90, 110, 50), (170, 150, 110), (80, 70, 55))),
    "water": ((150, 175, 190), (60, 90, 110), ((200, 215, 225), (40, 70, 90), (110, 130, 100))),
}


def draw_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A cluttered scene without birds: gradient, blurred blobs, branches, leaves, maybe flowers / berries / stones.

    Returns:
        uint8 [height, width, 3] RGB.
    """
    top, bottom, blobs = SCENES[list(SCENES)[rng.integers(len(SCENES))]]
    jitter = rng.uniform(0.8, 1.15, 3)
    image = _gradient(np.array(top) * jitter, np.array(bottom) * jitter, height, width)
    small = np.zeros((max(height // 4, 1), max(width // 4, 1), 3), np.float32)  # blobs drawn at 1/4 then blurred
    weight = np.zeros(small.shape[:2], np.float32)
    for _ in range(rng.integers(4, 14)):
        centre = (int(rng.integers(small.shape[1])), int(rng.integers(small.shape[0])))
        size = int(rng.integers(3, max(small.shape[0] // 3, 4)))
        cv2.circle(small, centre, size, tuple(float(c) for c in np.array(blobs[rng.integers(len(blobs))])), -1)
        cv2.circle(weight, centre, size, 0.7, -1)
    sigma = max(small.shape[0] / 20, 1.0)
    small, weight = cv2.GaussianBlur(small, (0, 0), sigma), cv2.GaussianBlur(weight, (0, 0), sigma)
    small, weight = cv2.resize(small, (width, height)), cv2.resize(weight, (width, height))[:, :, None]
    image = image * (1 - weight) + small * weight
    image = np.ascontiguousarray(np.clip(image, 0, 255), dtype=np.uint8)
    scale = min(height, width) / 375
    for _ in range(rng.integers(0, 4)):
        _draw_branch(image, rng, scale)
    leaf_greens = ((50, 110, 40), (90, 140, 50), (130, 150, 60), (160, 130, 50))
    for _ in range(rng.integers(0, 30)):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        axes = (max(int(rng.uniform(5, 18) * scale), 1), max(int(rng.uniform(2, 7) * scale), 1))
        colour = _jitter(leaf_greens[rng.integers(len(leaf_greens))], rng, rng.uniform(0.7, 1.1))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    if rng.random() < 0.3:
        _draw_distractors(image, rng, scale)
    return image


def _draw_branch(image: np.ndarray, rng: np.random.Generator, scale: float, start: tuple | None = None) -> None:
    height, width = image.shape[:2]
    colour = _jitter((92, 70, 50), rng, rng.uniform(0.6, 1.3))
    if start is None:
        start = (0, int(rng.integers(height))) if rng.random() < 0.5 else (width - 1, int(rng.integers(height)))
    angle = rng.uniform(-0.5, 0.5) + (0.0 if start[0] == 0 else math.pi)
    length = rng.uniform(0.4, 1.1) * width
    end = (int(start[0] + length * math.cos(angle)), int(start[1] + length * math.sin(angle)))
    thickness = max(int(rng.uniform(3, 12) * scale), 1)
    cv2.line(image, start, end, colour, thickness, cv2.LINE_AA)
    for _ in range(rng.integers(0, 3)):  # twigs
        t = rng.uniform(0.2, 0.9)
        fork = (int(start[0] + t * (end[0] - start[0])), int(start[1] + t * (end[1] - start[1])))
        twig_angle = angle + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
        reach = 0.25 * length
        twig_end = (int(fork[0] + reach * math.cos(twig_angle)), int(fork[1] + reach * math.sin(twig_angle)))
        cv2.line(image, fork, twig_end, colour, max(thickness // 2, 1), cv2.LINE_AA)


def _draw_distractors(image: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """Things that are not birds but share their colours: flowers, berry clusters, stones."""
    height, width = image.shape[:2]
    for _ in range(rng.integers(1, 4)):
        centre = np.array([rng.integers(width), rng.integers(height)])
        kind = rng.integers(3)
        colour = _jitter(list(CROWN.values())[rng.integers(len(CROWN))], rng, 1.0)
        size = max(rng.uniform(6, 16) * scale, 2.0)
        if kind == 0:  # flower: five petals around a yellow centre
            for k in range(5):
                offset = size * np.array([math.cos(k * 1.2566), math.sin(k * 1.2566)])
                cv2.circle(image, tuple(int(v) for v in centre + offset), int(size * 0.7), colour, -1, cv2.LINE_AA)
            cv2.circle(image, tuple(int(v) for v in centre), int(size * 0.5), (230, 200, 40), -1, cv2.LINE_AA)
        elif kind == 1:  # berries
            for _ in range(rng.integers(3, 8)):
                point = centre + rng.normal(0, size, 2)
                cv2.circle(image, tuple(int(v) for v in point), int(size * 0.4) + 1, colour, -1, cv2.LINE_AA)
        else:  # stone
            grey = _jitter((140, 136, 130), rng, rng.uniform(0.6, 1.2))
            axes = (int(size * 2), int(size * 1.2))
            cv2.ellipse(image, tuple(int(v) for v in centre), axes, float(rng.uniform(0, 180)), 0, 360, grey, -1)


def _place(points: np.ndarray, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Pick rotation, scale and position; return the 2x3 affine matrix from the (flipped) canvas to the image."""
    angle = rng.uniform(-20, 20)
    centre = (CANVAS_W / 2, CANVAS_H / 2)
    matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)  # [2, 3]
    moved = points @ matrix[:, :2].T + matrix[:, 2]  # [P, 2] bird points after rotation
    size = moved.max(axis=0) - moved.min(axis=0)
    side = rng.uniform(0.1, 0.9)  # longest relative box side
    scale = side / max(size[0] / width, size[1] / height)
    matrix = cv2.getRotationMatrix2D(centre, angle, scale)
    moved = points @ matrix[:, :2].T + matrix[:, 2]
    low, high = moved.min(axis=0), moved.max(axis=0)
    span = high - low
    shift_min, shift_max = -low, np.array([width, height]) - high  # keeps the bird inside the image
    if rng.random() < 0.1:  # let the image border cut the bird
        shift_min, shift_max = shift_min - 0.3 * span, shift_max + 0.3 * span
    matrix[:, 2] += rng.uniform(shift_min, np.maximum(shift_max, shift_min))
    return matrix


def _draw_perch(image: np.ndarray, rng: np.random.Generator, feet: np.ndarray, thickness: int) -> None:
    """A branch through the point under the bird's feet, spanning the image."""
    angle = rng.uniform(-0.3, 0.3)
    direction = np.array([math.cos(angle), math.sin(angle)]) * image.shape[1] * 2
    centre = feet + np.array([0.0, thickness / 2])
    colour = _jitter((92, 70, 50), rng, rng.uniform(0.6, 1.3))
    start, end = (centre - direction).astype(int), (centre + direction).astype(int)
    cv2.line(image, (int(start[0]), int(start[1])), (int(end[0]), int(end[1])), colour, thickness, cv2.LINE_AA)


def render_sample(traits: SpeciesTraits, rng: np.random.Generator, height: int, width: int) -> SynthSample:
    """Render one image of `traits` (see the module docstring) with its bird mask and tight box.

    The returned `background` is the same scene with the same noise and lighting but no bird, so
    `(image != background).any(-1)` is the set of bird pixels that changed the picture.
    """
    scene = draw_background(rng, height, width)
    canvas, local_mask = draw_bird(traits, rng)
    feet = np.array([166.0, 232.0])  # canvas point under the feet
    if rng.random() < 0.5:  # face left
        canvas, local_mask = canvas[:, ::-1].copy(), local_mask[:, ::-1].copy()
        feet[0] = CANVAS_W - 1 - feet[0]
    contours, _ = cv2.findContours(local_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    points = np.concatenate(contours).reshape(-1, 2).astype(np.float64)  # [P, 2] x, y of the outline
    matrix = _place(points, rng, height, width)
    warped = cv2.warpAffine(canvas, matrix, (width, height), flags=cv2.INTER_LINEAR)
    warped_mask = cv2.warpAffine(local_mask, matrix, (width, height), flags=cv2.INTER_LINEAR)  # [H, W]
    mask = warped_mask > (127 if (warped_mask > 127).any() else 0)  # a bird of a few pixels keeps its faint ones
    if not mask.any():  # a bird smaller than a pixel (tiny images only): draw another, still deterministic
        return render_sample(traits, rng, height, width)
    if rng.random() < 0.6:  # perch, behind the bird
        bird_scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
        _draw_perch(scene, rng, matrix[:, :2] @ feet + matrix[:, 2], max(int(9 * bird_scale), 2))
    gain = np.float32(rng.uniform(0.85, 1.15))  # lighting, then sensor noise, the same with and without the bird
    amplitude = int(rng.integers(3, 12))
    noise = rng.integers(-amplitude, amplitude + 1, scene.shape, dtype=np.int16)  # [H, W, 3] uniform, cheap
    lit = scene.astype(np.float32)
    lit *= gain
    lit += noise
    background = np.clip(lit, 0, 255, out=lit).astype(np.uint8)
    image = background.copy()
    image[mask] = np.clip(warped[mask] * gain + noise[mask], 0, 255).astype(np.uint8)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
    return SynthSample(image=image, background=background, mask=mask, box=box, gray=bool(rng.random() < 0.03))


def _split_flags(num_images: int, seed: int, species: int) -> np.ndarray:
    """Deterministic 50/50 split of one species: bool [num_images], True = train (the odd one goes to train)."""
    order = np.random.default_rng([seed, species, 1]).permutation(num_images)
    flags = np.zeros(num_images, dtype=bool)
    flags[order[: (num_images + 1) // 2]] = True
    return flags


def synth_cub_exists(out_dir: str | Path) -> bool:
    """Whether `out_dir/CUB_200_2011` holds a complete data set (all annotation files written)."""
    root = Path(out_dir) / CUB_DIR_NAME
    return all((root / name).is_file() for name in CUB_FILES)


def make_synth_cub(
    out_dir: str | Path,
    num_species: int = 20,
    images_per_species: int = 60,
    seed: int = 0,
    width_range: tuple[int, int] = (400, 500),
    height_range: tuple[int, int] = (300, 400),
    overwrite: bool = False,
) -> Path:
    """Write a synthetic mini-CUB to `out_dir/CUB_200_2011` in the exact CUB layout.

    The data set is written to a temporary sibling folder and moved into place at the end, so an interrupted run
    never leaves a half data set behind.

    Args:
        out_dir: folder that receives CUB_200_2011 (the data root of the configs).
        num_species: number of species (1..999); consecutive groups of four form a genus.
        images_per_species: images per species (>= 2, split 50/50 into train and test).
        seed: everything is a function of the seed: same seed, byte-identical files.
        width_range: inclusive range of image widths in pixels.
        height_range: inclusive range of image heights in pixels.
        overwrite: replace an existing CUB_200_2011 folder; otherwise its presence is a `UserError`.

    Returns:
        The CUB_200_2011 folder.
    """
    _check_arguments(num_species, images_per_species, width_range, height_range)
    out_dir = Path(out_dir)
    final = out_dir / CUB_DIR_NAME
    if final.exists() and not overwrite:
        raise UserError(f"data set already exists (pass overwrite / --force to replace it): {final}")
    partial = out_dir / f".{CUB_DIR_NAME}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        lines: dict[str, list[str]] = {name: [] for name in CUB_FILES}
        for species in range(num_species):
            traits = species_traits(species)
            folder = f"{species + 1:03d}.{traits.name}"
            (partial / "images" / folder).mkdir(parents=True)
            lines["classes.txt"].append(f"{species + 1} {folder}")
            for index, is_train in enumerate(_split_flags(images_per_species, seed, species)):
                image_id = len(lines["images.txt"]) + 1
                rng = np.random.default_rng([seed, species, index, 0])
                height = int(rng.integers(height_range[0], height_range[1] + 1))
                width = int(rng.integers(width_range[0], width_range[1] + 1))
                sample = render_sample(traits, rng, height, width)
                relative = f"{folder}/{traits.name}_{index:04d}.jpg"
                _write_jpeg(partial / "images" / relative, sample)
                x1, y1, x2, y2 = sample.box
                lines["images.txt"].append(f"{image_id} {relative}")
                lines["image_class_labels.txt"].append(f"{image_id} {species + 1}")
                lines["train_test_split.txt"].append(f"{image_id} {int(is_train)}")
                lines["bounding_boxes.txt"].append(f"{image_id} {x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f}")
        for file_name, file_lines in lines.items():
            (partial / file_name).write_text("\n".join(file_lines) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # only left when something failed or was interrupted
    return final


def _check_arguments(
    num_species: int, images_per_species: int, width_range: tuple[int, int], height_range: tuple[int, int]
) -> None:
    if not 1 <= num_species <= 999:
        raise UserError(f"number of species must be in 1..999, got {num_species}")
    if images_per_species < 2:
        raise UserError(f"images per species must be >= 2 (one train, one test), got {images_per_species}")
    for name, (low, high) in (("width", width_range), ("height", height_range)):
        if not 16 <= low <= high:
            raise UserError(f"image {name} range must satisfy 16 <= low <= high, got {low}..{high}")


def _write_jpeg(path: Path, sample: SynthSample) -> None:
    """JPEG quality 90; grayscale samples as single-channel JPEGs (as some CUB images are)."""
    pixels = cv2.cvtColor(sample.image, cv2.COLOR_RGB2GRAY if sample.gray else cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path}")
    path.write_bytes(encoded.tobytes())
