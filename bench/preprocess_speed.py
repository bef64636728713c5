"""Preprocessing speed on full-size photos: one decode (dr_resnet.preprocess now) against the two decodes
it made before session 9, and a naive full decode, side by side in one run.

Synthetic fundus photos at full-size camera resolutions (6-15 MP, every side a multiple of 8), JPEG
quality 75-89; each path crops and JPEG-encodes every photo in this process, one core, the three paths
alternating, each photo's best of --repeats. Prints ms per photo (and of them decoding), decodes per photo, the
ratios, and how far the one-decode crops are from the two-decode ones (crop box in full-size pixels,
mean pixel difference).

    python bench/preprocess_speed.py [--images 20] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dr_resnet.data.preprocess import BadImageError, Settings, crop_square, cut_square, retina_box, retina_square, square_of

# Width x height of common fundus cameras' photos (EyePACS: 3-18 MP), cycled through.
FULL_SIZES = ((3888, 2592), (4752, 3168), (3216, 2136), (3456, 2304), (3072, 2048))
# Grey levels of noise in the disc: the JPEGs come out at about 0.9 MB for 9 MP, as EyePACS's do (88k photos,
# 80 GB), and entropy decoding, which every DCT scale pays in full, costs what it costs on real photos.
TEXTURE = 5


def full_size_photo(index: int, width: int, height: int, seed: int = 1) -> Image.Image:
    """Synthetic photo `index` (dr_resnet.synthetic, drawn at half the height: four times faster) brought to
    width x height: scaled to the height, its disc kept round, then padded with black or cut at the sides to
    the width; with retinal texture (noise of TEXTURE grey levels inside the disc) so that its JPEG is about
    as large as a real photo's."""
    from dr_resnet.data.synthetic import render_fundus

    photo = render_fundus(index % 5, seed, "train", index, size=height // 2)
    photo = photo.resize((round(photo.width * height / photo.height), height), Image.Resampling.BILINEAR)
    left = (photo.width - width) // 2
    pixels = np.asarray(photo.crop((left, 0, left + width, height)), dtype=np.int16)
    noise = np.random.default_rng([seed, index]).standard_normal((height, width), dtype=np.float32) * TEXTURE
    noise[pixels[..., 0] <= 10] = 0  # red is the retina's brightest channel; the border stays black
    pixels += noise.round().astype(np.int16)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_photo(job: tuple[Path, int]) -> Path:
    path, index = job
    width, height = FULL_SIZES[index % len(FULL_SIZES)]
    full_size_photo(index, width, height).save(path, quality=75 + (index * 7) % 21)  # as synthetic.generate
    return path


def write_photos(folder: Path, n: int, workers: int = 2) -> list[Path]:
    """n full-size synthetic JPEGs in folder, cycling through FULL_SIZES."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i}.jpeg", i) for i in range(n)]
    with Pool(workers) as pool:
        return pool.map(_write_photo, jobs)


# --- The two-decode path as dr_resnet.data.preprocess had it before session 9, kept to be measured and
# compared with: the retina located on a decode of its own at up to 1/8, then a second decode at the
# coarsest scale that gives settings.size pixels across it. ---

LOCATE_SIDE_BEFORE = 256


def _open_before(path: Path, scale: int = 1) -> Image.Image:
    image = Image.open(path)
    if scale > 1 and image.format == "JPEG":
        image.draft("RGB", (math.ceil(image.width / scale), math.ceil(image.height / scale)))
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if "A" in image.getbands() else image.convert("RGB")
    return image


def _coarsest_scale_before(side: float, needed: int) -> int:
    return max([s for s in (1, 2, 4, 8) if side / s >= needed], default=1)


def two_decode_square(src: Path, settings: Settings) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """retina_square as it was before session 9 (preprocess version 1)."""
    try:
        with Image.open(src) as probe:
            full_w, full_h = probe.size
            is_jpeg = probe.format == "JPEG"
        locate_scale = _coarsest_scale_before(min(full_w, full_h), LOCATE_SIDE_BEFORE) if is_jpeg else 1
        small = _open_before(src, locate_scale)
        box = retina_box(np.asarray(small.convert("L")), settings.threshold)
        if box is None:
            raise BadImageError(f"{src}: no retina found")
        rel = [box[0] / small.width, box[1] / small.height, box[2] / small.width, box[3] / small.height]
        image = small
        if is_jpeg:
            retina_side = max(box[2] - box[0], box[3] - box[1]) * locate_scale
            scale = _coarsest_scale_before(retina_side, settings.size)
            if scale != locate_scale:
                image = _open_before(src, scale)
        return image, square_of(rel, image.size)
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        kind = "not an image" if isinstance(exc, UnidentifiedImageError) else "cannot be decoded"
        raise BadImageError(f"{src}: {kind} ({exc})") from exc


def two_decode_crop(src: Path, settings: Settings) -> Image.Image:
    """crop_square as it was before session 9 (without Graham normalisation, which the bench leaves off)."""
    return cut_square(*two_decode_square(src, settings), settings.size)


# --- The naive way: every pixel decoded, the border found with numpy, padded, resized. ---

def naive_crop(src: Path, settings: Settings) -> Image.Image:
    rgb = np.asarray(Image.open(src).convert("RGB"))
    mask = rgb.mean(axis=2) > settings.threshold
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    side = max(crop.shape[:2])
    square = np.zeros((side, side, 3), np.uint8)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    return Image.fromarray(square).resize((settings.size, settings.size), Image.Resampling.LANCZOS)


class DecodeCounter:
    """Counts the decodes PIL makes (ImageFile.load with pixels still to read) while it is entered, and the
    seconds they take."""

    def __init__(self) -> None:
        self.count, self.seconds = 0, 0.0

    def __enter__(self) -> DecodeCounter:
        self._load = load = ImageFile.ImageFile.load

        def counting_load(image: ImageFile.ImageFile):
            if not image.tile:
                return load(image)
            self.count += 1
            start = time.perf_counter()
            try:
                return load(image)
            finally:
                self.seconds += time.perf_counter() - start

        ImageFile.ImageFile.load = counting_load
        return self

    def __exit__(self, *exc) -> None:
        ImageFile.ImageFile.load = self._load


def box_in_full_pixels(square: tuple[float, float, float, float], full: tuple[int, int]) -> np.ndarray:
    """A square from retina_square (fractions of the decoded image) in the full-size photo's pixels."""
    return np.array(square) * np.array([full[0], full[1], full[0], full[1]])


def timed_photo(crop: Callable[[Path, Settings], Image.Image], path: Path, settings: Settings) -> tuple[float, float, int]:
    """Milliseconds for crop + JPEG encode of one photo, of them decoding, and its decodes."""
    with DecodeCounter() as decodes:
        start = time.perf_counter()
        crop(path, settings).save(io.BytesIO(), format="JPEG", quality=settings.quality)
        total = time.perf_counter() - start
    return total * 1000, decodes.seconds * 1000, decodes.count


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-naive", action="store_true", help="leave the naive full decode out (the slowest)")
    args = p.parse_args()
    settings = Settings(size=args.size)
    work = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    try:
        photos = write_photos(work, args.images)
        load_before = os.getloadavg()[0]
        sizes = [Image.open(f).size for f in photos]
        paths = {"two decodes (before)": two_decode_crop, "one decode (now)": crop_square}
        if not args.no_naive:
            paths["naive full decode"] = naive_crop
        # Each photo through each path in turn (the order alternating), --repeats times; each photo's fastest
        # time a path, so a burst of other work on the machine spoils one timing, not the figure.
        timings = {name: np.full((args.repeats, len(photos), 3), np.inf) for name in paths}
        for r in range(args.repeats):
            for i, path in enumerate(photos):
                for name in (list(paths) if (r + i) % 2 == 0 else list(paths)[::-1]):
                    timings[name][r, i] = timed_photo(paths[name], path, settings)
        load_after = os.getloadavg()[0]
        box_diff, pixel_diff = [], []
        for path, full in zip(photos, sizes):
            before, now = two_decode_square(path, settings)[1], retina_square(path, settings)[1]
            box_diff.append(np.abs(box_in_full_pixels(before, full) - box_in_full_pixels(now, full)).max())
            a = np.asarray(two_decode_crop(path, settings), dtype=float)
            b = np.asarray(crop_square(path, settings), dtype=float)
            pixel_diff.append(np.abs(a - b).mean())
        mean_mp = sum(w * h for w, h in sizes) / len(sizes) / 1e6
        mean_mb = sum(f.stat().st_size for f in photos) / len(photos) / 1e6
        print(f"{args.images} synthetic full-size JPEGs ({', '.join(f'{w}x{h}' for w, h in FULL_SIZES)}; mean "
              f"{mean_mp:.1f} MP, {mean_mb:.2f} MB), output {args.size} px, crop + JPEG encode, one core, "
              f"each photo's best of {args.repeats}")
        print(f"{cpu_model()}, {os.cpu_count()} cores; load average {load_before:.1f} before the timings, "
              f"{load_after:.1f} after")
        best = {}  # per path: ms a photo, ms of it decoding, decodes a photo (each photo's fastest repeat)
        for name, times in timings.items():
            fastest = times[times[..., 0].argmin(axis=0), np.arange(len(photos))]
            best[name] = fastest.mean(axis=0)
        for name in paths:
            total, decoding, decodes = best[name]
            print(f"{name:22s} {total:7.1f} ms/photo ({decoding:6.1f} ms decoding, {decodes:.2f} decodes)  "
                  f"{1000 / total:5.1f} photos/s")
        two, one = best["two decodes (before)"], best["one decode (now)"]
        print(f"two decodes / one decode: {two[0] / one[0]:.2f}x per photo, {two[1] / one[1]:.2f}x decoding")
        if not args.no_naive:
            print(f"naive / one decode: {best['naive full decode'][0] / one[0]:.2f}x per photo")
        print(f"one decode vs two: crop box differs by at most {max(box_diff):.1f} full-size px (mean "
              f"{np.mean(box_diff):.1f}); output pixels by {np.mean(pixel_diff):.2f} grey levels on average "
              f"(worst photo {max(pixel_diff):.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
