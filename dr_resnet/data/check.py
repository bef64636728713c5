"""Every photo of a split checked before a run spends time on it: decodable to its last byte (a truncated
JPEG otherwise stops a run in whichever epoch first draws it, or is trained on half grey), not blank (an
all-black photo would be trained on with its grade), and its size (a photo far below the training size is
upscaled into blur).

One pass in parallel processes; JPEGs decode at an eighth of their size (PIL's draft mode still reads the
whole stream, so truncation is found, at a fraction of the cost). Each file's verdict is cached by its
path, size and modification time in the user's cache folder, so the next start checks only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dr_resnet import processes
from dr_resnet.data.formats import DatasetError
from dr_resnet.files import write_text

BLANK_LEVEL = 10  # a photo whose brightest pixel is at most this grey level is blank
CACHE_VERSION = 1  # bump when what a verdict means changes: older caches are then ignored


@dataclass(frozen=True)
class Verdict:
    problem: str  # why the photo cannot be trained on ('' when it can)
    width: int
    height: int


def check_file(path: str | os.PathLike) -> Verdict:
    """One photo's verdict (never raises for a bad photo: a pool worker's answer)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # JPEG only; a no-op for others
            image.load()
            brightest = int(np.asarray(image.convert("L")).max())
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return Verdict(f"cannot be decoded ({exc})", 0, 0)
    if brightest <= BLANK_LEVEL:
        return Verdict(f"blank (no pixel brighter than {brightest} of 255)", width, height)
    return Verdict("", width, height)


def cache_folder() -> Path:
    """$DR_RESNET_CACHE, else $XDG_CACHE_HOME/dr_resnet, else ~/.cache/dr_resnet."""
    if os.environ.get("DR_RESNET_CACHE"):
        return Path(os.environ["DR_RESNET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dr_resnet"


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def check_images(paths: Sequence[Path], workers: int = 1, cache: Path | None = None) -> dict[Path, Verdict]:
    """Each photo's verdict, from the cache where the file is unchanged, else checked (in `workers`
    processes) and added to the cache. `cache` defaults to one file per folder of photos' parent."""
    paths = [Path(p) for p in paths]
    if not paths:
        return {}
    if cache is None:
        key = hashlib.sha1(str(paths[0].resolve().parent).encode()).hexdigest()[:16]
        cache = cache_folder() / "image_checks" / f"{key}.json"
    try:
        saved = json.loads(cache.read_text()) if cache.is_file() else {}
    except ValueError:  # a damaged cache is only a slower start
        saved = {}
    entries = saved.get("files", {}) if saved.get("version") == CACHE_VERSION else {}
    found: dict[Path, Verdict] = {}
    todo = []
    for path in paths:
        entry = entries.get(str(path))
        if entry and entry[:2] == _stamp(path):
            found[path] = Verdict(*entry[2:])
        else:
            todo.append(path)
    if todo:
        if workers > 1 and len(todo) > 64:
            with processes.context().Pool(workers, initializer=processes.default_stop_signals,
                                          initargs=(os.getpid(),)) as pool:
                verdicts = pool.map(check_file, todo, chunksize=16)
        else:
            verdicts = [check_file(p) for p in todo]
        for path, verdict in zip(todo, verdicts):
            found[path] = verdict
            entries[str(path)] = [*_stamp(path), verdict.problem, verdict.width, verdict.height]
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_text(cache, json.dumps({"version": CACHE_VERSION, "files": entries}))
        except OSError:  # a read-only home: the check still holds, the next start repeats it
            pass
    return found


class BadImagesError(DatasetError):
    """Photos that cannot be trained on or evaluated; the message names every one and the ways out."""


def bad_rows(dataset, verdicts: dict[Path, Verdict]) -> list[dict]:
    """A RetinopathyDataset's bad photos: split, row of its table, file and why."""
    return [{"split": dataset.split, "row": dataset.rows[i], "file": str(path), "reason": verdicts[Path(path)].problem}
            for i, path in enumerate(dataset.paths) if verdicts[Path(path)].problem]


def small_photos(datasets: Sequence, verdicts: dict[Path, Verdict], image_size: int) -> list[str]:
    """The photos far below the size the network sees (a shorter side under a quarter of it)."""
    return [f"{p} ({verdicts[Path(p)].width} x {verdicts[Path(p)].height} px)" for d in datasets for p in d.paths
            if not verdicts[Path(p)].problem and min(verdicts[Path(p)].width, verdicts[Path(p)].height) * 4 < image_size]


def screen(datasets: dict[str, object], policy: str, workers: int, image_size: int, fix: str,
           log) -> tuple[dict[str, object], list[dict]]:
    """Check every photo of the datasets (name -> RetinopathyDataset) once; policy "stop": an error naming
    every bad photo (`fix` says what else to do); "skip": each dataset without its bad photos, which are
    logged; returns the datasets and the skipped photos. Small photos are warned about either way."""
    verdicts = check_images([p for d in datasets.values() for p in d.paths], workers)
    every = [b for d in datasets.values() for b in bad_rows(d, verdicts)]
    small = small_photos(list(datasets.values()), verdicts, image_size)
    if small:
        log.warning("%d photo(s) far below the %d px the network sees (upscaled into blur), e.g. %s", len(small),
                    image_size, "; ".join(small[:5]))
    if not every:
        return datasets, []
    listing = "\n  ".join(f"{b['file']} (row {b['row']}, split '{b['split']}'): {b['reason']}" for b in every)
    if policy != "skip":
        raise BadImagesError(f"{len(every)} photo(s) cannot be used:\n  {listing}\n{fix}")
    log.warning("leaving out %d photo(s) that cannot be used:\n  %s", len(every), listing)
    kept = {}
    for name, dataset in datasets.items():
        good = np.array([not verdicts[Path(p)].problem for p in dataset.paths], dtype=bool)
        kept[name] = dataset if good.all() else dataset.subset(good, dataset.split)
    return kept, every
