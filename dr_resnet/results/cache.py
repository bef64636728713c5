"""The report's results cache: what a run's files give the report that takes time to compute (a predictions
file's scores for the paired comparisons, its calibration; bootstrap intervals where the run's summary.json
has none), kept between reports, so that a report over a growing sweep computes only what changed.

It lives in the report's out folder (.report_cache/, one .npz file per run file and kind), not in the run
folders: those are training's (a sweep running, or someone else's read-only results, must not be written
to by a reader), and the out folder is the one place the report writes anyway; by default it is the sweep
folder itself, so reports of one sweep share it (find_runs skips hidden folders). An entry is keyed by the
file it was computed from, by path, size, modification time (ns) and inode: training writes predictions by
renaming a new file into place, so a rewritten file never matches. Nothing else a run holds goes into these
entries (metrics.jsonl, config.yaml, summary.json and launch_status.json are read at every report, which
costs little; a metrics log that grows leaves its unchanged predictions' entries valid). A damaged or
unreadable entry counts as absent: it is computed again and rewritten. Only the report writes here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from dr_resnet.files import atomic_path
from dr_resnet.results.stats import Resamples, draw_resamples

CACHE_DIR = ".report_cache"
FORMAT = 1  # what an entry holds: a change to it makes every older entry count as absent

Arrays = dict[str, np.ndarray]


class ResultsCache:
    """Entries computed from run files, in `folder` (None: kept nowhere, computed whenever asked); counts what
    it computed and what it read. It also holds the bootstrap's draws of the test set last asked for
    (stats.Resamples): every run on one test set resamples the same patients."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.computed = 0
        self.read = 0
        self.unwritten = ""  # why an entry could not be stored ('' when every one was)
        self._drawn: Resamples | None = None

    def get(self, kind: str, source: Path, compute: Callable[[], Arrays]) -> Arrays:
        """`compute()`'s arrays for the file `source`: the stored ones while `source` is unchanged since
        they were stored, else computed (and stored)."""
        if self.folder is None:
            self.computed += 1
            return compute()
        key = entry_key(kind, source)
        path = self.folder / f"{hashlib.sha256(f'{kind}:{Path(source).resolve()}'.encode()).hexdigest()[:32]}.npz"
        found = _load(path, key)
        if found is not None:
            self.read += 1
            return found
        found = compute()
        self.computed += 1
        self._store(path, key, found)
        return found

    def _store(self, path: Path, key: str, arrays: Arrays) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), **arrays)
        except OSError as exc:  # a full disk: the report goes on, and computes it again next time
            self.unwritten = self.unwritten or f"{path}: {exc.strerror or exc}"

    def resamples(self, units: np.ndarray, resamples: int, seed: int) -> Resamples:
        """The bootstrap's draws for these units (a test set's patients), drawn once for every run on it."""
        if self._drawn is None or not self._drawn.fits(units, resamples, seed):
            self._drawn = draw_resamples(units, resamples, seed)
        return self._drawn

    def describe(self) -> str:
        """One line: where the cache is and what this report computed and read from it."""
        where = f"results cache {self.folder}" if self.folder else "no results cache"
        line = f"{where}: {self.computed} computed, {self.read} read"
        return line + (f" (not stored: {self.unwritten})" if self.unwritten else "")


def entry_key(kind: str, source: Path) -> str:
    """What an entry of `kind` computed from `source` is valid for: the format, the file's path, size,
    modification time and inode."""
    stat = os.stat(source)
    return json.dumps([FORMAT, kind, str(Path(source).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino])


def _load(path: Path, key: str) -> Arrays | None:
    """The entry's arrays if it is there, whole, and for `key`; else None."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if "key" not in stored.files or str(stored["key"]) != key:
                return None
            return {name: stored[name] for name in stored.files if name != "key"}
    except Exception:  # noqa: BLE001 - whatever a damaged entry raises (zipfile, numpy, OSError): it is absent
        return None
