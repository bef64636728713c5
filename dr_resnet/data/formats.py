"""On-disk dataset formats: detect them, read and validate a split's index, write one.

  lab     {split}_img.csv + {split}_label.csv, headerless, one value a line; images/<name>.jpeg or <name>.jpeg
  kaggle  {split}Labels.csv with header image,level; images {split}/<image>.jpeg
  aptos   {split}.csv with header id_code,diagnosis; images {split}_images/<id_code>.png

Every problem in a split (missing image, bad label, unequal CSVs, duplicates, no rows) is found at once
and raised as one DatasetError naming the file and rows. Nothing is skipped. No torch here: the
preprocessing and synthetic-data CLIs use this module and must start fast.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dr_resnet import NUM_GRADES
from dr_resnet.errors import UserError
from dr_resnet.registry import FORMATS

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")
MAX_ROWS_SHOWN = 10


class DatasetError(UserError, ValueError):
    """A split on disk is unusable; the message names the file, the rows and the fix."""


@dataclass(frozen=True)
class SplitLayout:
    """Where one format keeps a split's names, labels and images."""

    format: str
    csv_files: tuple[Path, ...]  # the split's index file(s), as read
    image_dirs: tuple[Path, ...]  # searched in order
    extension: str  # native image extension, tried first

    @staticmethod
    def of(root: Path, split: str, fmt: str) -> "SplitLayout":
        if fmt == "lab":
            return SplitLayout("lab", (root / f"{split}_img.csv", root / f"{split}_label.csv"),
                               (root / "images", root), ".jpeg")
        if fmt == "kaggle":
            return SplitLayout("kaggle", (root / f"{split}Labels.csv",), (root / split,), ".jpeg")
        if fmt == "aptos":
            return SplitLayout("aptos", (root / f"{split}.csv",), (root / f"{split}_images",), ".png")
        raise DatasetError(f"unknown data format {fmt!r}: use one of auto, {', '.join(FORMATS)}")

    def present(self) -> bool:
        return all(p.is_file() for p in self.csv_files)

    def image_path(self, name: str, extension: str | None = None) -> Path:
        """Where a writer puts image `name` (the first image folder; native extension unless given)."""
        return self.image_dirs[0] / f"{name}{extension or self.extension}"

    def write_index(self, names: Sequence[str], labels: Sequence[int]) -> None:
        """Write the split's index file(s) in this format."""
        if self.format == "lab":
            self.csv_files[0].write_text("".join(f"{n}\n" for n in names))
            self.csv_files[1].write_text("".join(f"{int(g)}\n" for g in labels))
            return
        with open(self.csv_files[0], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HEADERS[self.format])
            writer.writerows(zip(names, (int(g) for g in labels)))


HEADERS = {"kaggle": ("image", "level"), "aptos": ("id_code", "diagnosis")}
SPLIT_FILE_SUFFIX = {"lab": "_img.csv", "kaggle": "Labels.csv", "aptos": ".csv"}


def find_splits(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(split, format) of every split under root whose index files are all there, sorted by name."""
    root = Path(root)
    found = set()
    for fmt, suffix in SPLIT_FILE_SUFFIX.items():
        for p in root.glob(f"*{suffix}"):
            split = p.name[: -len(suffix)]
            if split and SplitLayout.of(root, split, fmt).present() and (
                    fmt != "aptos" or (root / f"{split}_images").is_dir()):
                found.add((split, fmt))
    return sorted(found)


def detect_format(root: str | os.PathLike, split: str) -> str:
    """The one format whose split files exist under root; an error if none or several do."""
    root = Path(root)
    found = [f for f in FORMATS if SplitLayout.of(root, split, f).present()]
    if len(found) == 1:
        return found[0]
    if not found:
        expected = "; ".join(f"{f}: " + " + ".join(p.name for p in SplitLayout.of(root, split, f).csv_files)
                             for f in FORMATS)
        raise DatasetError(f"no '{split}' split found in {root} (expected one of {expected})")
    raise DatasetError(f"{root} holds '{split}' split files of several formats ({', '.join(found)}): "
                       f"name one with data.format=...")


def _problem(path: Path, what: str, rows: Sequence[int], fix: str = "") -> str:
    shown = ", ".join(str(r) for r in rows[:MAX_ROWS_SHOWN])
    more = f" and {len(rows) - MAX_ROWS_SHOWN} more" if len(rows) > MAX_ROWS_SHOWN else ""
    return f"{path}: {what} in {len(rows)} row(s): {shown}{more}" + (f" ({fix})" if fix else "")


def _read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.reader(f))


def _read_single_column(path: Path, problems: list[str]) -> list[tuple[int, str]]:
    """(line number, value) for a headerless one-value-a-line file; every line counts, none is a header."""
    values, bad = [], []
    for line, row in enumerate(_read_rows(path), start=1):
        cells = [c.strip() for c in row]
        if len(cells) != 1 or not cells[0]:
            bad.append(line)
        values.append((line, cells[0] if len(cells) == 1 else ",".join(cells)))
    if bad:
        problems.append(_problem(path, "not exactly one non-empty value", bad))
    return values


def _read_with_header(path: Path, name_col: str, label_col: str,
                      problems: list[str]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    rows = _read_rows(path)
    if not rows:
        problems.append(f"{path}: empty file (expected a header '{name_col},{label_col}')")
        return [], []
    header = [c.strip() for c in rows[0]]
    missing = [c for c in (name_col, label_col) if c not in header]
    if missing:
        problems.append(f"{path}: header {header} lacks column(s) {missing} (expected '{name_col},{label_col}')")
        return [], []
    ni, li = header.index(name_col), header.index(label_col)
    names, labels, short = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            short.append(line)
            continue
        names.append((line, row[ni].strip()))
        labels.append((line, row[li].strip()))
    if short:
        problems.append(_problem(path, f"not {len(header)} fields", short))
    return names, labels


def _parse_labels(path: Path, labels: list[tuple[int, str]], problems: list[str]) -> list[int]:
    parsed, bad = [], []
    for line, text in labels:
        if text.isdigit() and int(text) < NUM_GRADES:
            parsed.append(int(text))
        else:
            bad.append(line)
            parsed.append(-1)
    if bad:
        problems.append(_problem(path, f"label not an integer in 0..{NUM_GRADES - 1}", bad,
                                 f"e.g. row {bad[0]} reads {dict(labels)[bad[0]]!r}"))
    return parsed


class _DirIndex:
    """Lists each image folder once (a scandir beats one stat per row on big or network folders)."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = [(d, {e.name for e in os.scandir(d) if e.is_file()} if d.is_dir() else set()) for d in dirs]

    def find(self, name: str, extension: str) -> Path | None:
        stem_has_ext = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        candidates = [name] if stem_has_ext else [name + extension] + [name + e for e in IMAGE_EXTENSIONS
                                                                        if e != extension]
        for d, files in self.dirs:
            for c in candidates:
                if c in files:
                    return d / c
        return None


@dataclass(frozen=True)
class Split:
    """A validated split: image i is `names[i]` at `paths[i]` with grade `labels[i]`, from line `rows[i]`."""

    root: Path
    name: str
    format: str
    names: list[str]
    paths: list[Path]
    labels: np.ndarray
    rows: list[int]

    @property
    def layout(self) -> SplitLayout:
        return SplitLayout.of(self.root, self.name, self.format)


def read_split(root: str | os.PathLike, split: str = "train", fmt: str = "auto") -> Split:
    """Read and validate a split; raises one DatasetError listing every problem."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a directory")
    fmt = detect_format(root, split) if fmt == "auto" else fmt
    layout = SplitLayout.of(root, split, fmt)
    for p in layout.csv_files:
        if not p.is_file():
            raise DatasetError(f"{p} not found ({fmt} format needs {', '.join(q.name for q in layout.csv_files)})")
    problems: list[str] = []
    if fmt == "lab":
        names = _read_single_column(layout.csv_files[0], problems)
        label_cells = _read_single_column(layout.csv_files[1], problems)
        label_file = layout.csv_files[1]
        if len(names) != len(label_cells):
            problems.append(f"{layout.csv_files[0]} has {len(names)} rows but {label_file} has "
                            f"{len(label_cells)}: row i of one must be the label of row i of the other")
    else:
        name_col, label_col = ("image", "level") if fmt == "kaggle" else ("id_code", "diagnosis")
        names, label_cells = _read_with_header(layout.csv_files[0], name_col, label_col, problems)
        label_file = layout.csv_files[0]
    name_file = layout.csv_files[0]
    labels = _parse_labels(label_file, label_cells, problems)

    if not names and not problems:
        problems.append(f"{name_file}: the '{split}' split has no rows")
    first_seen: dict[str, int] = {}
    duplicates = []
    for line, name in names:
        if name in first_seen:
            duplicates.append(line)
        else:
            first_seen[name] = line
    if duplicates:
        problems.append(_problem(name_file, "duplicate image name", duplicates,
                                 f"e.g. row {duplicates[0]} repeats row {first_seen[dict(names)[duplicates[0]]]}"))

    index = _DirIndex(layout.image_dirs)
    paths, missing = [], []
    for line, name in names:
        path = index.find(name, layout.extension)
        if path is None:
            missing.append(line)
        paths.append(path)
    if missing:
        where = " or ".join(str(d) for d in layout.image_dirs)
        example = dict(names)[missing[0]]
        problems.append(_problem(name_file, "image file missing", missing,
                                 f"e.g. {example}{layout.extension} not in {where}"))
    if problems:
        raise DatasetError(f"{fmt} split '{split}' in {root} is not usable:\n  " + "\n  ".join(problems))
    return Split(root, split, fmt, [n for _, n in names], paths, np.asarray(labels, dtype=np.int64),
                 [line for line, _ in names])
