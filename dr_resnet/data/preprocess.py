"""Crop the black border of fundus photos, pad to a centred square, resize, save as JPEG.

    python -m dr_resnet.preprocess --src RAW --dst OUT --size 512 --workers N [--skip-bad]

OUT is a dataset of the same format and layout as RAW (split files copied, images as <name>.jpeg; a
format other than lab, kaggle, aptos and folders is named with --format and its data.* keys). Fast on
3-18 MP EyePACS photos: a JPEG is decoded once at reduced DCT scale (PIL ``draft``), the coarsest that
still gives `size` pixels across a retina spanning RETINA_SHARE of the short side, and the retina is
found on that image (a smaller retina costs a second, finer decode; a larger one is reduced in memory
to the scale it needs). Re-running skips finished images (each is written to a temporary name and
renamed); OUT/preprocess.json records the settings and the crops' VERSION, and a re-run with other ones
is refused. Unreadable images are an error naming each file, or with --skip-bad are left out of OUT's
split files and listed in OUT/skipped.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dr_resnet.data.formats import (
    FORMATS,
    DatasetError,
    Split,
    SplitLayout,
    TableOptions,
    add_format_arguments,
    find_splits,
    format_arguments,
    image_stem,
    read_split,
    split_names,
)
from dr_resnet.errors import UserError, run_command
from dr_resnet.files import atomic_path

log = logging.getLogger("dr_resnet.preprocess")
SETTINGS_FILE = "preprocess.json"
SKIPPED_FILE = "skipped.csv"
LOCATE_SIDE = 256  # pixels on the short side of the copy the retina is located on (up to twice this)
# The crops' version, recorded in preprocess.json so that one folder never holds two kinds: 1 (no "version"
# key) located the retina on a decode of its own at up to 1/8; 2 locates it on the one decode that is cropped.
VERSION = 2
RETINA_SHARE = 0.8  # the least share of a fundus photo's short side its retina spans: the decode is sized for it


class BadImageError(UserError, ValueError):
    """An image cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class Settings:
    size: int = 512
    threshold: int = 10  # grey level above which a pixel is retina; JPEG noise in the border stays below
    quality: int = 95
    normalize: str = "none"  # none | graham (local average colour subtracted, rim masked)


NORMALIZATIONS = ("none", "graham")
RIM_KEEP = 0.9  # Graham kept the inner 90% of the disc radius: the rim's blur artefacts go


def graham_normalize(image: Image.Image, radius: float) -> Image.Image:
    """Ben Graham's Kaggle-2015 preprocessing: 4 * (image - its Gaussian blur at sigma = radius / 30) + 128,
    so local contrast (lesions, vessels) stays and illumination and pigment colour go; outside
    RIM_KEEP x radius the image is set to the neutral 128."""
    from PIL import ImageFilter

    pixels = np.asarray(image, dtype=np.float32)
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius / 30)), dtype=np.float32)
    out = np.clip(4 * (pixels - blurred) + 128, 0, 255)
    h, w = out.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    out[(xx - (w - 1) / 2) ** 2 + (yy - (h - 1) / 2) ** 2 > (RIM_KEEP * radius) ** 2] = 128
    return Image.fromarray(out.round().astype(np.uint8))


def retina_box(grey: np.ndarray, threshold: int, min_share: float = 0.05) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the bright region. A row or column counts when its bright pixels
    exceed min_share of the fullest one's, so specks of noise or a burnt-in mark do not widen the box
    (the disc loses under a pixel at its rim)."""
    mask = grey > threshold
    row_counts, col_counts = mask.sum(axis=1), mask.sum(axis=0)
    if row_counts.max() == 0:
        return None
    rows = np.flatnonzero(row_counts > min_share * row_counts.max())
    cols = np.flatnonzero(col_counts > min_share * col_counts.max())
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _decode(src: Path, scale_for: Callable[[int], int]) -> tuple[Image.Image, int, bool]:
    """`src` decoded once, EXIF orientation applied, in RGB, the reduction it was decoded at, and whether it
    is a JPEG: a JPEG at the DCT reduction (1, 2, 4 or 8) that scale_for picks from the photo's short side,
    read from its header before decoding; other formats in full."""
    image = Image.open(src)
    is_jpeg = image.format == "JPEG"
    scale = scale_for(min(image.size)) if is_jpeg else 1
    if scale > 1:
        # draft takes the largest reduction s with size // requested >= s on both sides, so asking for the
        # floor of size / scale gets exactly `scale` (the ceiling fell back to the next finer one at odd
        # sizes). It returns the decoded box in original pixels, or None where it cannot reduce.
        full_width = image.width
        drafted = image.draft("RGB", (max(1, full_width // scale), max(1, image.height // scale)))
        scale = round(full_width / drafted[1][2]) if drafted else 1
    ImageOps.exif_transpose(image, in_place=True)  # not a copy of every pixel when there is nothing to turn
    if image.mode != "RGB":
        # Alpha is dropped onto black (the border colour); CMYK, greyscale and palettes convert as PIL does.
        image = image.convert("RGBA").convert("RGB") if "A" in image.getbands() else image.convert("RGB")
    return image, scale, is_jpeg


def _coarsest_scale(side: float, needed: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) that keeps `side` pixels at `needed` or more."""
    return max([s for s in (1, 2, 4, 8) if side / s >= needed], default=1)


def _locate(image: Image.Image, threshold: int) -> tuple[float, float, float, float] | None:
    """The retina's box as (left, top, right, bottom) fractions of the width and height, found on a copy
    reduced in memory (pixel blocks averaged, as a reduced DCT decode does) to a short side of LOCATE_SIDE
    to twice that: a box to within half a percent of the photo, at a few milliseconds."""
    factor = max(1, min(image.size) // LOCATE_SIDE)
    small = image.reduce(factor) if factor > 1 else image
    box = retina_box(np.asarray(small.convert("L")), threshold)
    if box is None:
        return None
    return box[0] / small.width, box[1] / small.height, box[2] / small.width, box[3] / small.height


def retina_square(src: Path, settings: Settings) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """`src` decoded (a JPEG at the coarsest of the reductions 1, 2, 4 and 8 that keeps settings.size pixels
    across the retina) and the square centred on its retina, as (left, top, right, bottom) fractions of the
    decoded width and height: the same square maps onto any picture of the photo's geometry (a lesion
    mask, say).

    One decode serves both: the square's side is the retina's larger extent, which for a fundus photo is
    at least RETINA_SHARE of the short side (the whole short side where the disc is clipped), so a JPEG is
    decoded at the coarsest DCT scale that keeps that many pixels at settings.size, and the retina is
    located on that image. Only a retina smaller than that (the square under settings.size pixels) costs a
    second, finer decode; a larger one is reduced in memory to the scale a decode sized for it would have
    given (pixel blocks averaged, as the DCT reduction does), so the resize to settings.size does no more
    work than before."""
    try:
        image, scale, is_jpeg = _decode(src, lambda short: _coarsest_scale(RETINA_SHARE * short, settings.size))
        rel = _locate(image, settings.threshold)
        if rel is None:
            raise BadImageError(f"{src}: no retina found (no pixel brighter than --threshold {settings.threshold}; "
                                f"an all-black or blank image)")
        side = max((rel[2] - rel[0]) * image.width, (rel[3] - rel[1]) * image.height)
        if scale > 1 and side < settings.size:
            finer = _coarsest_scale(side * scale, settings.size)
            image, scale, _ = _decode(src, lambda short: finer)
        elif is_jpeg:
            further = min(_coarsest_scale(side, settings.size), 8 // scale)  # as far as a DCT reduction goes
            if further > 1:
                image = image.reduce(further)
        return image, square_of(rel, image.size)
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        kind = "not an image" if isinstance(exc, UnidentifiedImageError) else "cannot be decoded"
        raise BadImageError(f"{src}: {kind} ({exc})") from exc


def cut_square(image: Image.Image, square: tuple[float, float, float, float], size: int,
               resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """The square (fractions of the width and height, from retina_square) of `image`, resized to size x size.
    crop() fills what lies outside the image with black: the padding to a square comes free."""
    w, h = image.size
    box = (round(square[0] * w), round(square[1] * h), round(square[2] * w), round(square[3] * h))
    return image.crop(box).resize((size, size), resample)


def crop_square(src: Path, settings: Settings) -> Image.Image:
    """The retina of `src`, centred in a black square of settings.size pixels (Graham-normalised if the
    settings say so): what a prepared dataset holds, and what predict makes of a raw photo."""
    image, square = retina_square(src, settings)
    try:
        out = cut_square(image, square, settings.size)
    except (OSError, ValueError) as exc:  # a truncated file fails when its pixels are read
        raise BadImageError(f"{src}: cannot be decoded ({exc})") from exc
    if settings.normalize == "graham":
        # The disc spans the square's width (a clipped disc still spans it in the other direction).
        out = graham_normalize(out, settings.size / 2)
    return out


def _read_manifest(path: Path) -> dict:
    """preprocess.json's content; an error naming the file where it is not the one preprocess writes."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
        return saved
    except ValueError as exc:
        raise DatasetError(f"{path}: not the settings file preprocess writes ({exc})") from exc


def _saved_settings(saved: dict) -> dict:
    """The image settings of a preprocess.json: a key an older file lacks had its default then (the option
    did not exist yet)."""
    return {**asdict(Settings()), **{k: v for k, v in saved.items() if k in asdict(Settings())}}


def read_settings(root: str | os.PathLike) -> Settings | None:
    """The settings a prepared dataset was made with (its preprocess.json); None for a folder that
    preprocess did not write. Keys an older file lacks had their defaults then. The crops' version is not
    a setting: training reads a folder of any version alike."""
    path = Path(root) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return Settings(**_saved_settings(_read_manifest(path)))
    except TypeError as exc:
        raise DatasetError(f"{path}: not the settings file preprocess writes ({exc})") from exc


def process_one(src: Path, dst: Path, settings: Settings) -> str | None:
    """Write dst from src unless it exists; returns an error message instead of raising (for pools)."""
    if dst.exists():
        return None
    try:
        image = crop_square(src, settings)
    except BadImageError as exc:
        return str(exc)
    with atomic_path(dst) as tmp:
        image.save(tmp, format="JPEG", quality=settings.quality)
    return None


def _job(args) -> tuple[int, str | None]:
    i, src, dst, settings = args
    return i, process_one(src, dst, settings)


def _check_settings(dst: Path, settings: Settings, overwrite: bool, selection: dict) -> Callable[[], None]:
    """preprocess.json: the crops' VERSION and the image settings (a second run with another version or
    other settings is refused: one folder never mixes two kinds of crop) and which rows the copy holds
    (`selection`: the format, data.filter, data.label_map and what they left out). Checked now; returns
    what writes it, called once --overwrite has removed every old crop (a run killed while removing them
    leaves the old file, so a rerun without --overwrite is still refused)."""
    path = dst / SETTINGS_FILE
    if path.exists() and not overwrite:
        saved = _read_manifest(path)
        made_by = saved.get("version", 1)  # version 1 recorded none
        if made_by != VERSION:
            raise DatasetError(f"{path}: {dst} holds crops of preprocess version {made_by}, and this is version "
                               f"{VERSION}: use another --dst, or --overwrite to redo every image")
        before = _saved_settings(saved)
        if before != asdict(settings):
            raise DatasetError(f"{path}: {dst} was made with {before}, not {asdict(settings)}: "
                               f"use another --dst, or --overwrite to redo every image")
    dst.mkdir(parents=True, exist_ok=True)
    return lambda: path.write_text(json.dumps({"version": VERSION, **asdict(settings), "selection": selection}) + "\n")


def square_of(rel: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The square around a retina's box (fractions of the image), whole pixels of an image of `size`, as
    fractions again: the crop both decodes (one, or the bench's old two) cut."""
    w, h = size
    left, top, right, bottom = rel[0] * w, rel[1] * h, rel[2] * w, rel[3] * h
    side = max(right - left, bottom - top)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    square = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
    return square[0] / w, square[1] / h, square[2] / w, square[3] / h


def _target(split: Split, i: int, dst: Path) -> Path:
    """Where image i of a split goes in the output: the same place in the same layout, as <stem>.jpeg."""
    name = split.names[i]
    if split.format in FORMATS:
        return SplitLayout.of(dst, split.name, split.format).image_path(name, ".jpeg")
    if split.format == "folders":
        return dst / split.name / str(int(split.labels[i])) / f"{name}.jpeg"
    return dst / split.table.images.relative_to(split.root) / f"{image_stem(name)}.jpeg"


def _write_split_files(split: Split, dst: Path, bad: set[int]) -> None:
    """The split's index in the output: copied, or without the bad rows if there are any. A folders
    split's index is its folders (a bad image is not written)."""
    if split.format == "folders":
        return
    if split.format in FORMATS:
        out_layout = SplitLayout.of(dst, split.name, split.format)
        if not bad:
            for src_file, dst_file in zip(split.layout.csv_files, out_layout.csv_files):
                shutil.copyfile(src_file, dst_file)
            return
        keep = [i for i in range(len(split.names)) if i not in bad]
        out_layout.write_index([split.names[i] for i in keep], split.labels[keep] if split.labelled else None)
        return
    # A table: its header and the rows the split kept (a filter's or a dropped label's rows have no prepared
    # image), but the bad images'.
    target = dst / split.index_file.relative_to(split.root)
    target.parent.mkdir(parents=True, exist_ok=True)
    kept_lines = set(split.rows) - {split.rows[i] for i in bad}
    table = split.table
    with open(split.index_file, newline="", encoding="utf-8-sig") as f:
        lines = f.read().splitlines(keepends=True) if table.delimiter == " " else list(csv.reader(f))
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as out:
        writer = None if table.delimiter == " " else csv.writer(out, delimiter=table.delimiter)
        for line, record in enumerate(lines, start=1):
            if line not in kept_lines and not (table.header and line == 1):
                continue
            if writer is None:
                out.write(record)
            else:
                writer.writerow(record)


def _targets(splits: list[Split], dst: Path) -> list[list[Path]]:
    """Each split's output file per image; an error where two images would be written to one file (a.png
    and a.jpg both become a.jpeg)."""
    found = []
    for split in splits:
        targets, seen = [_target(split, i, dst) for i in range(len(split.names))], {}
        for i, target in enumerate(targets):
            if target in seen:
                raise DatasetError(f"{split.index_file}: rows {split.rows[seen[target]]} and {split.rows[i]} "
                                   f"({split.names[seen[target]]}, {split.names[i]}) would both be written as "
                                   f"{target}: rename one")
            seen[target] = i
        found.append(targets)
    return found


def preprocess(src: str | os.PathLike, dst: str | os.PathLike, settings: Settings, workers: int = 1,
               skip_bad: bool = False, overwrite: bool = False, progress: bool = True, fmt: str = "auto",
               options: TableOptions | None = None, say: Callable[[str], None] = log.info
               ) -> list[tuple[str, int, str, str]]:
    """Preprocess every split under src (of data.format `fmt`; auto: the splits of every detected
    format) into dst, in the same layout, its tables holding exactly the rows prepared; returns the
    skipped (split, row, file, reason). `say` is told the rows the format's rules left out."""
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    found = find_splits(src) if fmt == "auto" else [(s, fmt) for s in split_names(src, fmt, options)]
    if not found:
        raise DatasetError(f"no dataset split files found in {src} (lab: <split>_img.csv + <split>_label.csv; "
                           f"kaggle: <split>Labels.csv; aptos: <split>.csv + <split>_images/; folders: <split>/0..4/; "
                           f"another layout: --format and its data.* keys)")
    if dst.resolve() == src.resolve():
        raise DatasetError(f"--dst must differ from --src ({src})")
    # Every index validated before any work; an unlabelled split (prediction only) is prepared too.
    splits = [read_split(src, name, f, options, unlabelled_ok=True) for name, f in found]
    for split in splits:  # the rows the format's own rules leave out, said before any work
        for line in split.left_out:
            say(f"{split.name}: {line} ({split.index_file.name}): not prepared, not in {dst}'s table")
    targets = _targets(splits, dst)
    options = options or TableOptions()
    record = _check_settings(dst, settings, overwrite, {"format": fmt, "filter": options.filter,
                                                        "label_map": options.label_map,
                                                        "left_out": {s.name: s.left_out for s in splits if s.left_out}})
    jobs, owners = [], []
    for split, split_targets in zip(splits, targets):
        for i, (path, target) in enumerate(zip(split.paths, split_targets)):
            target.parent.mkdir(parents=True, exist_ok=True)
            if overwrite and target.exists():
                target.unlink()
            jobs.append((len(jobs), path, target, settings))
            owners.append((split, i))
    record()
    errors: dict[int, str] = {}
    with tqdm(total=len(jobs), desc="preprocess", unit="img", disable=not progress) as bar:
        pool = Pool(workers) if workers > 1 else None
        try:
            for job_id, error in (pool.imap_unordered(_job, jobs, chunksize=4) if pool else map(_job, jobs)):
                if error:
                    errors[job_id] = error
                bar.update()
        finally:
            if pool:
                pool.close()
                pool.join()
    skipped = [(owners[j][0].name, owners[j][0].rows[owners[j][1]], str(jobs[j][1]), msg)
               for j, msg in sorted(errors.items())]
    if skipped and not skip_bad:
        listing = "\n  ".join(f"{s} row {r}: {msg}" for s, r, _, msg in skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        raise DatasetError(f"{len(skipped)} image(s) could not be preprocessed (split files not written; "
                           f"fix or remove them, or pass --skip-bad to leave them out and list them "
                           f"in {dst / SKIPPED_FILE}):\n  {listing}{more}")
    for split in splits:
        _write_split_files(split, dst, {owners[j][1] for j in errors if owners[j][0] is split})
    report = dst / SKIPPED_FILE
    if skipped:
        with open(report, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["split", "row", "file", "reason"])
            writer.writerows(skipped)
    elif report.exists():
        report.unlink()
    return skipped


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    p = argparse.ArgumentParser(prog="python -m dr_resnet.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="raw dataset folder (any data.format; see --format)")
    p.add_argument("--dst", required=True, help="output dataset folder")
    p.add_argument("--size", type=int, default=Settings.size, help="output side in pixels")
    p.add_argument("--workers", type=int, help="processes (default: one per CPU)")
    p.add_argument("--threshold", type=int, default=Settings.threshold,
                   help="grey level (0-255) above which a pixel counts as retina")
    p.add_argument("--quality", type=int, default=Settings.quality, help="JPEG quality")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="none",
                   help="graham: subtract the local average colour (Gaussian at disc radius / 30), mask the rim")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable images out of the output split files and list them in skipped.csv")
    p.add_argument("--overwrite", action="store_true", help="redo images that already exist in --dst")
    add_format_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    if args.workers is None:
        args.workers = os.cpu_count() or 1
    if args.size < 8 or not 0 <= args.threshold < 255 or not 1 <= args.quality <= 100 or args.workers < 1:
        p.error("need --size >= 8, 0 <= --threshold < 255, 1 <= --quality <= 100, --workers >= 1")
    settings = Settings(args.size, args.threshold, args.quality, args.normalize)

    def work() -> None:
        fmt, options = format_arguments(args)
        skipped = preprocess(args.src, args.dst, settings, args.workers, args.skip_bad, args.overwrite,
                             progress=sys.stderr.isatty(), fmt=fmt, options=options, say=print)
        for split, row, file, reason in skipped:
            print(f"skipped {split} row {row}: {reason}", file=sys.stderr)
        summary = f", skipped {len(skipped)} (listed in {Path(args.dst) / SKIPPED_FILE})" if skipped else ""
        print(f"preprocessed {args.src} -> {args.dst} at {args.size}px{summary}")
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
