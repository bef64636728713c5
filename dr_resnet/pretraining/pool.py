"""Which photos self-supervised pretraining sees, and the refusal of a pool that holds what the arms are tested on.

The pool is data.root's training split, all of it, followed by every pretrain.pools entry (ROOT[:SPLIT[:FORMAT]]:
another dataset's folder, APTOS's unlabelled test.csv, a clinic's archive in a format dr-resnet reads). No grade is
read here, so the held-out part's photos are in it too, and data.train_fraction (how many images keep their label in
a learning curve) does not shrink it: that is the point of pretraining on unlabelled photos. Each split is read by
formats.read_split (unlabelled tables allowed) and every photo goes through training's photo check (data/check.py's
screen, with the same data.bad_images policy) once, shared out over the processes of a distributed run.

The evaluation's test split (data.test_split of data.root) must stay unseen: a backbone that learned from the test
photos, even without their grades, flatters every arm started from it. So an entry that shares an image or a patient
with the test split stops the run with one line (refuse_test_overlap). An image is shared when it is the same file
(its folder resolved: a link to the test folder counts) or a copy of one: the same name, extension aside, and the
same number of bytes (the test folder copied elsewhere). A source that holds half or more of the test photos' names
at other sizes is the test split saved again (preprocessed at another size, say) and is refused too; a few such
names may be another dataset's photos with the same kind of name: they are named in a warning, not refused. A
patient is shared when patients.py names it the same within the same dataset folder: patient ids are qualified by
their folder, so two datasets' "10_left" are different people, while EyePACS' left eye in a pool
and its right eye in the test split are one. The training split is not checked: the arms train on it (its own
patient overlap with the test split is train's warning), so pretraining on it shows the backbone nothing new.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from dr_resnet.config import ConfigError, DataConfig
from dr_resnet.data import check
from dr_resnet.data.dataset import RetinopathyDataset, UnreadableImageError, load_image
from dr_resnet.data.formats import DatasetError, Split, TableOptions, image_stem, read_split
from dr_resnet.errors import UserError
from dr_resnet.registry import FORMAT_CHOICES
from dr_resnet.training.components import read_everywhere

log = logging.getLogger(__name__)

POOLS_KEY = "pretrain.pools"
SHOWN = 3  # names an overlap line shows
TEST = "test"  # the test split's name among the parts read together


class PoolOverlapError(UserError):
    """A pool shares images or patients with the evaluation's test split; the line names the entry and the fix."""


class PoolRepeatError(DatasetError):
    """A photo would be in the pool twice (an entry naming the training split, or two entries the same photos)."""


@dataclass(frozen=True)
class PoolSource:
    """One pretrain.pools entry: a dataset folder, its split and format ("auto": detected, as data.format)."""

    root: Path
    split: str = "train"
    format: str = "auto"

    @property
    def said(self) -> str:
        return f"{self.root}:{self.split}"


def parse_pools(text: str) -> list[PoolSource]:
    """pretrain.pools as its sources: comma-separated ROOT[:SPLIT[:FORMAT]] entries (SPLIT "train" and FORMAT
    "auto" where left out or empty; "" is no pool). A malformed entry is a ConfigError naming the key and it."""
    sources: list[PoolSource] = []
    for entry in (e.strip() for e in str(text).split(",")):
        if not entry:
            continue
        parts = [p.strip() for p in entry.split(":")]

        def bad(why: str) -> ConfigError:
            return ConfigError(f"{POOLS_KEY}={text!r}: entry {entry!r} {why} (an entry is ROOT[:SPLIT[:FORMAT]], "
                               f"several comma-separated, e.g. /data/aptos:test:aptos)")
        if len(parts) > 3:
            raise bad(f"has {len(parts) - 1} ':', at most 2")
        root, split, fmt = (*parts, "", "")[:3]
        if not root:
            raise bad("names no folder")
        fmt = fmt or "auto"
        if fmt == "csv":
            raise bad("is in the csv format, whose tables data.train_csv / data.test_csv name for data.root only: a "
                      "pool needs a layout of its own (lab, kaggle, aptos, folders or a dataset's)")
        if fmt not in FORMAT_CHOICES:
            raise bad(f"names the format {fmt!r}, not one of {', '.join(c for c in FORMAT_CHOICES if c != 'csv')}")
        source = PoolSource(Path(root).expanduser(), split or "train", fmt)
        if any(s.root.resolve() == source.root.resolve() and s.split == source.split for s in sources):
            raise bad(f"repeats the split {source.said}")
        sources.append(source)
    return sources


def qualified(root: Path, patient: str) -> str:
    """A patient id qualified by its dataset folder (resolved): the same person only within one dataset."""
    return f"{root}::{patient}"


@dataclass
class PhotoPool:
    """The photos pretraining learns from: photo i is `names[i]` at `paths[i]`, of patient `patients[i]` (qualified by
    its folder), from row `rows[i]` of source `source_of[i]`. `sources` is the record the backbone file, summary and
    report carry ({root, split, format, images, patients} each, the training split first); `named[s]` says whether
    source s is a pretrain.pools entry rather than data.root's training split; `skipped` the photos
    data.bad_images=skip left out (check.screen's rows)."""

    paths: list[Path]
    names: list[str]
    patients: list[str]
    rows: list[int]
    source_of: list[int]
    sources: list[dict]
    named: list[bool]
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def record(self) -> list[dict]:
        """Each source with its counts, for backbone.json, summary.json and the report."""
        return [dict(s) for s in self.sources]


@dataclass
class _Photos:
    """One source's photos in the shape check.screen and components.same_everywhere take a dataset in."""

    root: Path
    split: str
    format: str
    names: list[str]
    paths: list[Path]
    rows: list[int]
    patients: list[str]
    labels: np.ndarray
    named: bool

    @staticmethod
    def of(split: Split, named: bool) -> "_Photos":
        return _Photos(split.root, split.name, split.format, split.names, split.paths, split.rows, split.patients,
                       split.labels, named)

    def subset(self, keep: np.ndarray, split: str) -> "_Photos":
        rows = np.flatnonzero(keep)
        return replace(self, split=split, names=[self.names[i] for i in rows], paths=[self.paths[i] for i in rows],
                       rows=[self.rows[i] for i in rows], patients=[self.patients[i] for i in rows],
                       labels=self.labels[rows])


def photo_pool(d: DataConfig, pools: str, ranks: check.Ranks | None = None
               ) -> tuple[PhotoPool, RetinopathyDataset | None]:
    """The pool (data.root's training split, then each pretrain.pools entry, every photo checked) and the evaluation's
    test split (None without data.test_split), a pool sharing anything with the test split refused before any photo
    is decoded (refuse_test_overlap). An entry whose folder is data.root reads its tables with data.*'s options and
    format. `ranks`: the processes sharing the photo check (components.check_ranks() under DDP; None: this one)."""
    sources = parse_pools(pools)
    data_root, options = Path(d.root), TableOptions.of(d)
    spelled = {data_root.resolve(): data_root}  # one spelling a folder (check.screen groups photos by it)

    def read() -> dict:
        parts: dict = {"training": _Photos.of(read_split(data_root, d.train_split, d.format, options, unlabelled_ok=True),
                                              named=False)}
        for number, source in enumerate(sources, start=1):
            home = source.root.resolve() == data_root.resolve()
            root = spelled.setdefault(source.root.resolve(), source.root)
            fmt = d.format if home and source.format == "auto" else source.format
            try:
                split = read_split(root, source.split, fmt, options if home else None, unlabelled_ok=True)
            except DatasetError as exc:
                raise DatasetError(f"{POOLS_KEY} entry {source.said}: {exc}") from None
            parts[f"pool {number}"] = _Photos.of(split, named=True)
        if d.test_split:
            parts[TEST] = RetinopathyDataset(data_root, d.test_split, format=d.format, image_size=d.image_size,
                                             options=options)
        return parts

    parts = read_everywhere(read)
    test = parts.pop(TEST, None)
    _refuse_repeats(list(parts.values()))
    refuse_test_overlap(_pool_of(parts, []), test)
    groups: dict[Path, dict[str, _Photos]] = {}
    for name, part in parts.items():
        groups.setdefault(Path(part.root).resolve(), {})[name] = part
    checked, skipped = {}, []
    for folder, group in groups.items():
        kept, bad = check.screen(group, d.bad_images, max(1, d.workers), d.image_size,
                                 "Replace or remove them, or set data.bad_images=skip to pretrain without them (they are "
                                 "then named in the log)", log, source=d.root if folder == data_root.resolve() else None,
                                 ranks=ranks or check.Ranks())
        checked.update(kept)
        skipped += bad
    pool = _pool_of({name: checked[name] for name in parts}, skipped)
    for s in pool.sources:
        log.info("pretraining pool: %s:%s (%s): %d photo(s) of %d patient(s)", s["root"], s["split"], s["format"],
                 s["images"], s["patients"])
    log.info("pretraining pool: %d photo(s) from %d source(s), no grade read (the training split whole, whatever "
             "data.train_fraction)", len(pool), len(pool.sources))
    return pool, test


def _pool_of(parts: dict[str, _Photos], skipped: list[dict]) -> PhotoPool:
    pool = PhotoPool([], [], [], [], [], [], [], skipped)
    for number, part in enumerate(parts.values()):
        root = Path(part.root).resolve()
        pool.paths += part.paths
        pool.names += part.names
        pool.patients += [qualified(root, p) for p in part.patients]
        pool.rows += part.rows
        pool.source_of += [number] * len(part.paths)
        pool.sources.append({"root": str(root), "split": part.split, "format": part.format, "images": len(part.paths),
                             "patients": len(set(part.patients))})
        pool.named.append(part.named)
    return pool


class _Files:
    """Where a file is, its folder resolved once (a link to a folder names the same files), and its size."""

    def __init__(self) -> None:
        self._folders: dict[Path, Path] = {}

    def key(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.parent not in self._folders:
            self._folders[path.parent] = path.parent.resolve()
        return self._folders[path.parent] / path.name


def _refuse_repeats(parts: list[_Photos]) -> None:
    files, first = _Files(), {}
    for number, part in enumerate(parts):
        repeated: dict[int, list[str]] = {}
        for name, path in zip(part.names, part.paths):
            earlier = first.setdefault(files.key(path), number)
            if earlier != number:
                repeated.setdefault(earlier, []).append(name)
        for earlier, names in repeated.items():
            what = "data.root's training split" if earlier == 0 else f"the entry {parts[earlier].root}:{parts[earlier].split}"
            raise PoolRepeatError(f"{POOLS_KEY} entry {part.root}:{part.split} repeats {len(names)} photo(s) of {what} "
                                  f"(e.g. {', '.join(names[:SHOWN])}): each photo is in the pool once; leave the entry out")


SAVED_AGAIN_SHARE = 0.5  # a source holding this share of the test split's names (at any size) is its copy


def refuse_test_overlap(pool: PhotoPool, test: RetinopathyDataset | None) -> None:
    """Raise PoolOverlapError (one line) where a pretrain.pools entry shares images or patients with the evaluation's
    test split (see the module's docstring for what counts as the same); warn of photos carrying a test photo's name
    at another size. The training split (not named) is not checked. None: no test split, nothing to refuse."""
    if test is None:
        return
    files = _Files()
    test_root = Path(test.root).resolve()
    test_at = {files.key(p): j for j, p in enumerate(test.paths)}
    by_stem: dict[str, list[int]] = {}
    for j, p in enumerate(test.paths):
        by_stem.setdefault(image_stem(Path(p).name), []).append(j)
    test_patients = {qualified(test_root, p): p for p in test.patients}
    sizes: dict[Path, int] = {}

    def size(path) -> int:
        key = files.key(path)
        if key not in sizes:
            sizes[key] = os.stat(key).st_size
        return sizes[key]

    lines = []
    for s, source in enumerate(pool.sources):
        if not pool.named[s]:
            continue
        images, patients, look_alikes = [], {}, []
        for i in (i for i, k in enumerate(pool.source_of) if k == s):
            path = pool.paths[i]
            j = test_at.get(files.key(path))
            if j is None:
                namesakes = by_stem.get(image_stem(Path(path).name), [])
                j = next((j for j in namesakes if size(test.paths[j]) == size(path)), None)
                if j is None and namesakes:
                    look_alikes.append(pool.names[i])
            if j is not None:
                images.append(pool.names[i])
                patients[qualified(test_root, test.patients[j])] = test.patients[j]
            if pool.patients[i] in test_patients:
                patients[pool.patients[i]] = test_patients[pool.patients[i]]
        if len(look_alikes) >= SAVED_AGAIN_SHARE * len(test.paths):
            # most of the test photos' names at other sizes: the test split saved again (preprocessed at another
            # size, say), not another dataset's photos that happen to share a kind of name
            images += look_alikes
            look_alikes = []
        if images or patients:
            example = ", ".join(images[:SHOWN]) if images else "patient " + ", ".join(list(patients.values())[:SHOWN])
            lines.append(f"{source['root']}:{source['split']} shares {len(images)} image(s) and {len(patients)} "
                         f"patient(s) with it (e.g. {example})")
        elif look_alikes:
            log.warning("%s entry %s:%s: %d photo(s) carry the name of a test photo at another size (e.g. %s): if they "
                        "are the test photos saved again (a preprocessed copy), leave them out of the pool", POOLS_KEY,
                        source["root"], source["split"], len(look_alikes), ", ".join(look_alikes[:SHOWN]))
    if lines:
        raise PoolOverlapError(f"{POOLS_KEY}: the arms are tested on the '{test.split}' split of {test.root}, and the "
                               f"pretraining pool must not see it: {'; '.join(lines)}. Name another split, or leave "
                               f"those photos (and those patients' other photos) out of the pool")


class PoolDataset(Dataset):
    """The pool's photos, ``ds[i] = (uint8 image (3, S, S), i)``, decoded as training decodes them (load_image: padded
    to a centred square, resized to `image_size`); the views are made on the device. A photo that cannot be read (any
    more) raises UnreadableImageError naming the file, its row and source, as RetinopathyDataset does."""

    def __init__(self, pool: PhotoPool, image_size: int) -> None:
        self.pool = pool
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.pool.paths[index]
        try:
            image = load_image(path, self.image_size)
        except (UserError, OSError) as exc:  # deleted, truncated or overwritten since the pool was read
            source = self.pool.sources[self.pool.source_of[index]]
            reason = str(exc).removeprefix(f"{path}: ")
            raise UnreadableImageError(f"{path} (row {self.pool.rows[index]} of the '{source['split']}' split in "
                                       f"{source['root']}, a pretraining photo): {reason}. Restore the file, or remove "
                                       f"its row and start the run again (it resumes from its last checkpoint)") from None
        return image, index
