"""Synthetic fundus photographs in the real on-disk layouts, for the demo and the tests.

Each image: a retina disc on a black, non-square canvas of varying size and position (sometimes clipped
at top and bottom, as EyePACS photos are), vignetting, a macula, an optic disc, a vessel tree, and
lesions whose number and kind grow with the grade: microaneurysms (1+), haemorrhages and hard exudates
(2+), cotton-wool spots (3+), new vessels (4). Grades follow EyePACS's balance; names are
``<patient>_left|right`` as in EyePACS. Image i of a split depends only on (seed, split, i).

    python -m dr_resnet.synthetic --out DIR --train N --test M --seed S [--format lab|kaggle|aptos] [--size PX] [--lesion-masks]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dr_resnet import NUM_GRADES
from dr_resnet.data.formats import FORMATS, SplitLayout
from dr_resnet.errors import run_command
from dr_resnet.files import atomic_path

# EyePACS training set: 25810 / 2443 / 5292 / 873 / 708 of 35126 images.
EYEPACS_BALANCE = (0.7348, 0.0696, 0.1507, 0.0249, 0.0202)
SPLIT_CODES = {"train": 0, "test": 1, "val": 2}
LESION_MASKS_DIR = "lesion_masks"  # with --lesion-masks: <name>.png per image, 255 where a lesion was drawn


def grade_counts(n: int, balance=EYEPACS_BALANCE, min_per_class: int = 1) -> np.ndarray:
    """Images per grade for n images: largest-remainder rounding of the balance, at least
    min_per_class of each grade when n allows (so tiny splits still hold every grade)."""
    balance = np.asarray(balance, dtype=float) / sum(balance)
    floor = min_per_class if n >= min_per_class * len(balance) else 0
    rest = n - floor * len(balance)
    raw = balance * rest
    counts = np.floor(raw).astype(int)
    counts[np.argsort(-(raw - counts), kind="stable")[: rest - counts.sum()]] += 1
    return counts + floor


def split_grades(n: int, seed: int, split: str) -> np.ndarray:
    """Grades of a split in a seeded random order, with exactly `grade_counts(n)` of each."""
    grades = np.repeat(np.arange(NUM_GRADES), grade_counts(n))
    return np.random.default_rng([seed, SPLIT_CODES.get(split, 9), 7]).permutation(grades)


def image_names(n: int, split: str, fmt: str, seed: int) -> list[str]:
    """EyePACS-style <patient>_left|right (two eyes a patient); APTOS-style 12-hex ids for aptos."""
    if fmt == "aptos":
        return [hashlib.sha1(f"{seed}/{split}/{i}".encode()).hexdigest()[:12] for i in range(n)]
    first_patient = 10 + 100_000 * SPLIT_CODES.get(split, 9)
    return [f"{first_patient + i // 2}_{'left' if i % 2 == 0 else 'right'}" for i in range(n)]


@dataclass(frozen=True)
class Lesions:
    microaneurysms: int = 0
    haemorrhages: int = 0
    exudates: int = 0
    cotton_wool: int = 0
    new_vessels: int = 0


def lesions_for_grade(grade: int, rng: np.random.Generator) -> Lesions:
    """Lesion counts that grow with the grade, overlapping between neighbours so grading is not trivial."""
    r = rng.integers
    if grade == 0:
        return Lesions()
    if grade == 1:
        return Lesions(microaneurysms=int(r(1, 6)))
    if grade == 2:
        return Lesions(int(r(3, 11)), int(r(1, 5)), int(r(0, 9)), int(r(0, 2)))
    if grade == 3:
        return Lesions(int(r(5, 16)), int(r(6, 16)), int(r(3, 16)), int(r(1, 5)))
    return Lesions(int(r(3, 13)), int(r(2, 11)), int(r(0, 11)), int(r(0, 4)), int(r(1, 4)))


def _random_point_in_disc(rng, cx, cy, radius, max_fraction=0.9):
    angle, dist = rng.uniform(0, 2 * math.pi), radius * max_fraction * math.sqrt(rng.uniform(0, 1))
    return cx + dist * math.cos(angle), cy + dist * math.sin(angle)


def _polyline(rng, x, y, angle, length, steps, wiggle):
    points = [(x, y)]
    for _ in range(steps):
        angle += rng.normal(0, wiggle)
        x, y = x + length / steps * math.cos(angle), y + length / steps * math.sin(angle)
        points.append((x, y))
    return points


def render_fundus(grade: int, seed: int, split: str, index: int, size: int = 512,
                  lesion_mask: bool = False) -> Image.Image | tuple[Image.Image, Image.Image]:
    """One synthetic fundus photo of the given grade, deterministic in (seed, split, index); with
    lesion_mask also the mask of its lesions (mode L, 255 where one was drawn, same size)."""
    rng = np.random.default_rng([seed, SPLIT_CODES.get(split, 9), index])
    height = max(32, int(round(size * rng.uniform(0.85, 1.15))))
    width = int(round(height * rng.uniform(1.0, 1.5)))
    radius = height * rng.uniform(0.42, 0.55)  # above 0.5 the disc is clipped top and bottom
    cx = width / 2 + rng.uniform(-0.05, 0.05) * width
    cy = height / 2 + rng.uniform(-0.03, 0.03) * height
    right_eye = index % 2 == 1
    side = 1 if right_eye else -1

    # Background: orange-red retina, vignetting, uneven illumination, a darker macula.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rr = np.hypot(xx - cx, yy - cy) / radius
    base = np.array([rng.uniform(170, 230), rng.uniform(60, 110), rng.uniform(25, 60)], dtype=np.float32)
    tilt = rng.uniform(-0.15, 0.15, size=2).astype(np.float32)
    shade = (1 - 0.45 * rr**2) * (1 + tilt[0] * (xx - cx) / radius + tilt[1] * (yy - cy) / radius)
    mx, my = cx - side * 0.05 * radius, cy + rng.uniform(-0.05, 0.05) * radius
    shade *= 1 - 0.25 * np.exp(-(((xx - mx) ** 2 + (yy - my) ** 2) / (0.18 * radius) ** 2))
    outside = rr > 1
    pixels = np.clip(shade[..., None] * base, 0, 255)
    pixels[outside] = 0
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)

    # Optic disc and a vessel tree leaving it (arcades towards the macula, thinner branches elsewhere).
    ox, oy = cx + side * 0.38 * radius, cy + rng.uniform(-0.08, 0.08) * radius
    od = 0.09 * radius * rng.uniform(0.85, 1.15)
    draw.ellipse([ox - od, oy - od, ox + od, oy + od], fill=(250, 215, 140))
    vessel_colour = (int(base[0] * 0.55), int(base[1] * 0.25), int(base[2] * 0.35))
    for k in range(int(rng.integers(6, 10))):
        angle = math.pi * (1 if side > 0 else 0) + rng.uniform(-1.3, 1.3) + (math.pi if k % 3 == 2 else 0)
        width_px = max(1, int(round(radius * rng.uniform(0.012, 0.025))))
        draw.line(_polyline(rng, ox, oy, angle, radius * rng.uniform(0.8, 1.5), 12, 0.18),
                  fill=vessel_colour, width=width_px, joint="curve")

    lesions = lesions_for_grade(grade, rng)
    mask = Image.new("L", image.size)
    mask_draw = ImageDraw.Draw(mask)

    def lesion(shape: str, *args, fill, **kwargs) -> None:
        """Draw a lesion on the photo and on the mask."""
        getattr(draw, shape)(*args, fill=fill, **kwargs)
        getattr(mask_draw, shape)(*args, fill=255, **kwargs)

    dark_red = (int(base[0] * 0.45), int(base[1] * 0.15), int(base[2] * 0.2))
    for _ in range(lesions.microaneurysms):
        x, y = _random_point_in_disc(rng, cx, cy, radius, 0.75)
        r = radius * rng.uniform(0.015, 0.025)
        lesion("ellipse", [x - r, y - r, x + r, y + r], fill=dark_red)
    for _ in range(lesions.haemorrhages):
        x, y = _random_point_in_disc(rng, cx, cy, radius, 0.8)
        rx, ry = radius * rng.uniform(0.03, 0.065), radius * rng.uniform(0.025, 0.055)
        lesion("ellipse", [x - rx, y - ry, x + rx, y + ry], fill=dark_red)
    for _ in range(lesions.exudates):
        x0, y0 = _random_point_in_disc(rng, cx, cy, radius, 0.7)
        for _ in range(int(rng.integers(1, 5))):  # exudates come in small clusters
            x, y = x0 + rng.normal(0, 0.03 * radius), y0 + rng.normal(0, 0.03 * radius)
            r = radius * rng.uniform(0.012, 0.022)
            lesion("ellipse", [x - r, y - r, x + r, y + r], fill=(245, 225, 110))
    for _ in range(lesions.cotton_wool):
        x, y = _random_point_in_disc(rng, cx, cy, radius, 0.7)
        rx, ry = radius * rng.uniform(0.045, 0.08), radius * rng.uniform(0.03, 0.06)
        lesion("ellipse", [x - rx, y - ry, x + rx, y + ry], fill=(235, 215, 200))
    for _ in range(lesions.new_vessels):
        near_disc = rng.uniform() < 0.5
        x, y = (ox, oy) if near_disc else _random_point_in_disc(rng, cx, cy, radius, 0.7)
        for _ in range(int(rng.integers(6, 12))):  # a tangle of fine, tortuous vessels
            line = _polyline(rng, x, y, rng.uniform(0, 2 * math.pi), radius * rng.uniform(0.1, 0.22), 8, 0.9)
            lesion("line", line, fill=(int(base[0] * 0.5), 10, 20), width=max(1, int(round(radius * 0.012))))
        if rng.uniform() < 0.5:  # pre-retinal haemorrhage: a large boat-shaped bleed
            x, y = _random_point_in_disc(rng, cx, cy, radius, 0.6)
            rx, ry = radius * rng.uniform(0.1, 0.16), radius * rng.uniform(0.06, 0.1)
            lesion("chord", [x - rx, y - ry, x + rx, y + ry], 0, 180, fill=dark_red)

    # Optics: slight defocus, then sensor noise everywhere (the black border is never exactly zero).
    image = image.filter(ImageFilter.GaussianBlur(radius * rng.uniform(0.002, 0.006)))
    pixels = np.asarray(image, dtype=np.int16)
    pixels[outside] = 0
    pixels += rng.integers(0, 4, size=(height, width, 1), dtype=np.int16)
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return (photo, mask) if lesion_mask else photo


def lesion_mask_path(root: str | os.PathLike, name: str) -> Path:
    """Where generate(..., lesion_masks=True) writes image `name`'s lesion mask (PNG, 255 on lesions)."""
    return Path(root) / LESION_MASKS_DIR / f"{name}.png"


def _write_one(job) -> None:
    path, grade, seed, split, index, size, mask_path = job
    image = render_fundus(grade, seed, split, index, size, lesion_mask=mask_path is not None)
    if mask_path is not None:
        image, mask = image
        mask.save(mask_path)
    quality = 75 + (index * 7) % 21  # JPEG noise of varying strength, as in the wild
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG" if path.suffix == ".png" else "JPEG", quality=quality)


def generate(out: str | os.PathLike, splits: dict[str, int], seed: int = 0, fmt: str = "lab",
             size: int = 512, workers: int = 1, progress: bool = True, lesion_masks: bool = False) -> Path:
    """Write a synthetic dataset with the given images per split (and with lesion_masks, each image's
    lesion mask in LESION_MASKS_DIR); returns the output folder."""
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise ValueError(f"--format must be lab, kaggle or aptos, got {fmt!r}")
    out = Path(out)
    jobs = []
    for split, n in splits.items():
        if n == 0:  # an empty split would be an unusable dataset, so none is written
            continue
        layout = SplitLayout.of(out, split, fmt)
        names, grades = image_names(n, split, fmt, seed), split_grades(n, seed, split)
        layout.image_dirs[0].mkdir(parents=True, exist_ok=True)
        layout.write_index(names, grades)
        if lesion_masks:
            (out / LESION_MASKS_DIR).mkdir(parents=True, exist_ok=True)
        jobs += [(layout.image_path(name), int(g), seed, split, i, size, lesion_mask_path(out, name) if lesion_masks else None)
                 for i, (name, g) in enumerate(zip(names, grades))]
    bar = tqdm(total=len(jobs), desc=f"synthetic fundus ({fmt})", unit="img", disable=not progress)
    if workers > 1:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=8):
                bar.update()
    else:
        for job in jobs:
            _write_one(job)
            bar.update()
    bar.close()
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    p = argparse.ArgumentParser(prog="python -m dr_resnet.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--train", type=int, default=1000, help="training images")
    p.add_argument("--test", type=int, default=250, help="test images")
    p.add_argument("--seed", type=int, default=0, help="image i of a split depends only on (seed, split, i)")
    p.add_argument("--format", choices=FORMATS, default="lab", help="the layout written")
    p.add_argument("--size", type=int, default=512, help="typical canvas height in pixels (varies +-15%%)")
    p.add_argument("--workers", type=int, help="processes (default: one per CPU)")
    p.add_argument("--lesion-masks", action="store_true",
                   help=f"also write each image's lesion mask (OUT/{LESION_MASKS_DIR}/<name>.png, 255 on lesions)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = os.cpu_count() or 1
    if args.train < 0 or args.test < 0 or args.size < 32:
        p.error("--train/--test must be >= 0 and --size >= 32")

    def work() -> None:
        out = generate(args.out, {"train": args.train, "test": args.test}, args.seed, args.format, args.size,
                       args.workers, progress=sys.stderr.isatty(), lesion_masks=args.lesion_masks)
        for split, n in (("train", args.train), ("test", args.test)):
            print(f"{split}: {n} images, grades 0..4 = {grade_counts(n).tolist()}")
        print(f"wrote {args.format} dataset to {out}")
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
