"""Every photo of a split checked before a run spends time on it: decodable to its last byte (a truncated
JPEG otherwise stops a run in whichever epoch first draws it, or is trained on half grey), not blank (an
all-black photo would be trained on with its grade), and its size (a photo far below the training size is
upscaled into blur).

Each photo is decoded once per job: the photos are shared out over every process of the run (process r of
w checks photos r, r + w, r + 2w, ..., in parallel worker processes of its own) and the verdicts gathered,
so every process holds the same verdict for every photo (with data.bad_images=skip, every rank leaves out
the same photos), and no process checks alone for longer than the process group's timeout. JPEGs decode
at an eighth of their size (PIL's draft mode still reads the whole stream, so truncation is found, at a
fraction of the cost).

A read that fails with an errno (a network file system's EIO or ESTALE, EMFILE, a file removed since the
split was read) is the storage's fault, not the photo's: it is tried again a few times, and if it keeps
failing every process stops with one line naming the file. Only a failed decode is a verdict: what PIL
raises for a truncated or undecodable file (OSError without an errno, ValueError, SyntaxError, a
decompression bomb).

The verdicts are cached in one file per dataset folder, $DR_RESNET_CACHE/image_checks/ (by default
~/.cache/dr_resnet/image_checks/), each photo's under its path relative to the folder with its size and
modification time. The folder is the source (data.root), also when a run reads its staged copy (which
keeps sizes and times), so staged runs, requeues and `evaluate` share the verdicts, and the next start
checks only what changed. A file grows by about 100 bytes a photo ever checked in that folder (9 MB for
EyePACS's 88k photos; a removed photo's entry stays), only rank 0 writes it (merged with what is there),
and deleting it, or the whole folder, is always safe: the next start checks again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dr_resnet import processes
from dr_resnet.data.formats import DatasetError
from dr_resnet.files import write_text

log = logging.getLogger(__name__)

BLANK_LEVEL = 10  # a photo whose brightest pixel is at most this grey level is blank
CACHE_VERSION = 2  # bump when what a verdict means or how it is keyed changes: older caches are then ignored
READ_TRIES = 4  # reads of a photo that fail with an errno before the run stops (network file systems recover)
RETRY_S = 0.5  # the first wait between two of them, doubled each time (0.5 + 1 + 2 s in all)


@dataclass(frozen=True)
class Verdict:
    problem: str  # why the photo cannot be trained on ('' when it can)
    width: int
    height: int


@dataclass(frozen=True)
class ReadFailure:
    """A file that could not be read in READ_TRIES tries (an error with an errno): no verdict on the photo."""

    line: str  # names the file and the errno


class PhotoReadError(DatasetError):
    """A photo could not be read (the storage's error, not the photo's): every process stops with its line."""


class PhotoListsDifferError(DatasetError):
    """The processes of a run were given different photos to check (their datasets differ)."""


def _alone(obj: object) -> list:
    return [obj]


@dataclass(frozen=True)
class Ranks:
    """The processes that share a check: this one is `rank` of `size`, and `gather(obj)` returns every
    process's `obj` in rank order (distributed.all_gather_objects, over gloo also beside NCCL); each calls
    it once per check. By default a process alone."""

    rank: int = 0
    size: int = 1
    gather: Callable[[object], list] = _alone


def _retrying(work: Callable[[], object], path: Path) -> object:
    """`work()`, tried again (after RETRY_S, then twice as long, ...) while it fails with an errno; after
    READ_TRIES failures, a ReadFailure naming the file and the errno."""
    wait, started = RETRY_S, time.monotonic()
    for attempt in range(1, READ_TRIES + 1):
        try:
            return work()
        except OSError as exc:
            if exc.errno is None:
                raise
            if attempt == READ_TRIES:
                name = errno.errorcode.get(exc.errno, str(exc.errno))
                return ReadFailure(f"cannot read {path} on {socket.gethostname()}: [Errno {exc.errno}] {exc.strerror} "
                                   f"({name}), {READ_TRIES} tries in {time.monotonic() - started:.1f} s. The file "
                                   f"system failed, not the photo (a network file system's error, too many open "
                                   f"files, a file removed since the split was read): fix it, then start again")
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def _decode(path: Path) -> Verdict:
    """The photo's verdict; an OSError with an errno (a failed read) is raised, for the caller to retry."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # JPEG only; a no-op for others
            image.load()
            brightest = int(np.asarray(image.convert("L")).max())
    except OSError as exc:
        if exc.errno is not None:  # the read failed (EIO, ESTALE, EMFILE, ENOENT...): no verdict on the photo
            raise
        # PIL's own: "image file is truncated", "cannot identify image file" (UnidentifiedImageError), ...
        return Verdict(f"cannot be decoded ({exc})", 0, 0)
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return Verdict(f"cannot be decoded ({exc})", 0, 0)
    if brightest <= BLANK_LEVEL:
        return Verdict(f"blank (no pixel brighter than {brightest} of 255)", width, height)
    return Verdict("", width, height)


def check_file(path: str | os.PathLike) -> Verdict | ReadFailure:
    """One photo's verdict, or a ReadFailure where reading it kept failing (never raises: a pool worker's
    answer)."""
    return _retrying(lambda: _decode(Path(path)), Path(path))


def cache_folder() -> Path:
    """$DR_RESNET_CACHE, else $XDG_CACHE_HOME/dr_resnet, else ~/.cache/dr_resnet."""
    if os.environ.get("DR_RESNET_CACHE"):
        return Path(os.environ["DR_RESNET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dr_resnet"


def cache_file(source: Path) -> Path:
    """The file of the verdicts on the photos in the dataset folder `source` (resolved)."""
    return cache_folder() / "image_checks" / f"{hashlib.sha1(str(source).encode()).hexdigest()[:16]}.json"


def photo_key(path: Path, root: Path) -> str:
    """A photo's name in its dataset: its path relative to the dataset's folder (the same in every copy of
    it), or its whole path where it lies outside (a table's image folder elsewhere)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path.resolve())


def _read_cache(file: Path, source: Path) -> dict[str, list]:
    try:
        saved = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):  # a damaged or unreadable cache is only a slower start
        saved = {}
    current = saved.get("version") == CACHE_VERSION and saved.get("root") == str(source)
    return saved.get("files", {}) if current else {}


def _write_cache(file: Path, source: Path, new: dict[str, list]) -> None:
    entries = {**_read_cache(file, source), **new}  # what another job added since this one read it stays
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_text(file, json.dumps({"version": CACHE_VERSION, "root": str(source), "files": entries}))
    except OSError:  # a read-only home: the check still holds, the next start repeats it
        pass


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _answered(answers) -> list:
    """`answers` (a lazy iterable) up to the first ReadFailure, which stops the check at once (a file system
    that failed one read is likely to fail the next thousands, each tried READ_TRIES times)."""
    found = []
    for answer in answers:
        if isinstance(answer, ReadFailure):
            raise PhotoReadError(answer.line)
        found.append(answer)
    return found


def _check_share(paths: list[Path], keys: list[str], cached: dict[str, list], workers: int) -> list[tuple]:
    """This process's photos' answers, in order: (problem, width, height, stamp), the stamp ([size, mtime])
    where the photo was decoded now, None where its verdict came from the cache."""
    stamps = _answered(_retrying(lambda p=p: _stamp(p), p) for p in paths)
    answers: list[tuple | None] = [None] * len(paths)
    todo = []
    for i, (key, stamp) in enumerate(zip(keys, stamps)):
        entry = cached.get(key)
        if entry and entry[:2] == stamp:
            answers[i] = (*entry[2:5], None)
        else:
            todo.append(i)
    if workers > 1 and len(todo) > 64:
        with processes.context().Pool(workers, initializer=processes.default_stop_signals,
                                      initargs=(os.getpid(),)) as pool:  # leaving it early ends its workers
            verdicts = _answered(pool.imap(check_file, [paths[i] for i in todo], chunksize=16))
    else:
        verdicts = _answered(map(check_file, [paths[i] for i in todo]))
    for i, verdict in zip(todo, verdicts):
        answers[i] = (verdict.problem, verdict.width, verdict.height, stamps[i])
    return answers


def check_images(paths: Sequence[Path], root: str | os.PathLike, workers: int = 1,
                 source: str | os.PathLike | None = None, ranks: Ranks = Ranks()) -> dict[Path, Verdict]:
    """Each photo's verdict. The photos are read under `root`, a copy of the dataset folder `source` (itself
    by default), whose cache gives the verdicts of unchanged files; `ranks` share the rest out (this process
    checks its share in `workers` processes), every one gets every verdict, and rank 0 adds the new ones to
    the cache. Every process stops with one line where any could not read a photo (PhotoReadError) or the
    processes were given different photos (PhotoListsDifferError)."""
    paths = list(dict.fromkeys(Path(p) for p in paths))
    root = Path(root)
    source = Path(source if source is not None else root).resolve()
    keys = [photo_key(p, root) for p in paths]
    file = cache_file(source)
    started = time.monotonic()
    share = range(ranks.rank, len(paths), ranks.size)
    answers, failure, error = [], None, None
    try:
        answers = _check_share([paths[i] for i in share], [keys[i] for i in share], _read_cache(file, source), workers)
    except Exception as exc:  # the others learn it in the gather, instead of waiting there until its timeout
        error = exc
        failure = (True, str(exc)) if isinstance(exc, PhotoReadError) else \
            (False, f"{type(exc).__name__}: {exc} (its log has the traceback)")
    listed = (len(paths), hashlib.sha1("\n".join(keys).encode()).hexdigest())
    gathered = ranks.gather((listed, failure, answers))
    if error is not None:
        raise error
    if any(theirs != gathered[0][0] for theirs, _, _ in gathered):
        counts = ", ".join(f"rank {r}: {n}" for r, ((n, _), _, _) in enumerate(gathered))
        raise PhotoListsDifferError(f"the processes were given different photos to check ({counts}; equal counts: "
                                    f"other files): every process must read the same dataset, the same copy of {source}")
    for r, (_, failed, _) in enumerate(gathered):
        if failed:
            read_error, line = failed
            raise (PhotoReadError if read_error else RuntimeError)(f"rank {r}: {line}")
    verdicts: dict[Path, Verdict] = {}
    new: dict[str, list] = {}
    for r, (_, _, theirs) in enumerate(gathered):
        for i, (problem, width, height, stamp) in zip(range(r, len(paths), ranks.size), theirs):
            verdicts[paths[i]] = Verdict(problem, width, height)
            if stamp is not None:
                new[keys[i]] = [*stamp, problem, width, height]
    if new:
        log.info("photo check: %d of %d photo(s) decoded in %.1f s over %d process(es), the others' verdicts from %s",
                 len(new), len(paths), time.monotonic() - started, ranks.size, file)
        if ranks.rank == 0:
            _write_cache(file, source, new)
    return verdicts


def fingerprint(dataset) -> tuple[int, str]:
    """A dataset's image count and a hash of its images' names (photo_key) and grades: the same for every copy
    of the dataset (a node's staged one included), different where an image or a grade differs."""
    digest = hashlib.sha1()
    for path, label in zip(dataset.paths, dataset.labels):
        digest.update(f"{photo_key(Path(path), Path(dataset.root))}\t{int(label)}\n".encode())
    return len(dataset.paths), digest.hexdigest()[:16]


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


def screen(datasets: dict[str, object], policy: str, workers: int, image_size: int, fix: str, log,
           source: str | os.PathLike | None = None, ranks: Ranks = Ranks()) -> tuple[dict[str, object], list[dict]]:
    """Check every photo of the datasets (name -> RetinopathyDataset, all read from one folder, a copy of
    `source` where given) once, shared out over `ranks` (check_images); policy "stop": an error naming
    every bad photo (`fix` says what else to do); "skip": each dataset without its bad photos, which are
    logged; returns the datasets and the skipped photos. Small photos are warned about either way."""
    [root] = {Path(d.root) for d in datasets.values()}
    verdicts = check_images([p for d in datasets.values() for p in d.paths], root, workers, source, ranks)
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
