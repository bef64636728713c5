"""On-disk dataset formats: detect them, read and validate a split's index, write one. LAYOUTS says where
lab, folders and csv keep a split; PRESETS where kaggle and aptos do, and eyepacs, idrid, messidor2 and ddr:
those datasets as their publishers ship them.

Every table format also takes data.filter (rows kept: column=value, all of them) and data.label_map (the
dataset's labels to grades 0..4; a label mapped to "drop" leaves its rows out): rows left out are counted
in a log line, never silently. Every problem in a split (missing image, bad label, unequal CSVs,
duplicates, no rows) is found at once and raised as one DatasetError naming the file and rows. Nothing
is skipped. No torch here: the preprocessing and synthetic-data CLIs use this module and must start fast.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dr_resnet import NUM_GRADES
from dr_resnet.errors import UserError
from dr_resnet.patients import patients_of
from dr_resnet.registry import DATASETS, FORMAT_CHOICES, FORMATS, IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

_ANY_CASE_EXTENSIONS = (*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS))  # what _DirIndex tries
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
        if fmt in FORMATS:  # kaggle, aptos: where their PRESETS entry reads them
            preset = PRESETS[fmt]
            table, images = (p.format(split=split) for p in preset.tables["*"])
            return SplitLayout(fmt, (root / table,), (root / images,), preset.suffix)
        raise DatasetError(f"{fmt} is a format dr-resnet reads but does not write: write lab, kaggle or aptos")

    def present(self) -> bool:
        return all(p.is_file() for p in self.csv_files)

    def image_path(self, name: str, extension: str | None = None) -> Path:
        """Where a writer puts image `name` (the first image folder; native extension unless given)."""
        return self.image_dirs[0] / f"{name}{extension or self.extension}"

    def write_index(self, names: Sequence[str], labels: Sequence[int] | None) -> None:
        """Write the split's index file(s) in this format (labels None: an unlabelled table, names only)."""
        if self.format == "lab":
            self.csv_files[0].write_text("".join(f"{n}\n" for n in names))
            self.csv_files[1].write_text("".join(f"{int(g)}\n" for g in labels))
            return
        with open(self.csv_files[0], "w", newline="") as f:
            writer = csv.writer(f)
            if labels is None:
                writer.writerow((PRESETS[self.format].image_column,))
                writer.writerows((n,) for n in names)
                return
            writer.writerow((PRESETS[self.format].image_column, PRESETS[self.format].label_column))
            writer.writerows(zip(names, (int(g) for g in labels)))


# Where each format that is not a table of PRESETS keeps a split (docs/reference/files.md lists both).
LAYOUTS = {
    "lab": "{split}_img.csv + {split}_label.csv, headerless, one value a line; images/<name>.jpeg or <name>.jpeg",
    "folders": "{split}/{grade}/<name>.<ext>, a folder per grade 0..4 (torchvision's ImageFolder convention)",
    "csv": "any table with a header: data.train_csv / data.test_csv and data.train_images / data.test_images "
           "(relative to the root), data.image_column, data.label_column, data.image_suffix",
}
SPLIT_FILE_SUFFIX = {"lab": "_img.csv", "kaggle": "Labels.csv", "aptos": ".csv"}
DETECTED = ("lab", "kaggle", "aptos", "folders")  # what data.format=auto recognises; the others are named
DROP = "drop"  # a data.label_map target that leaves the label's rows out (counted in the log)


@dataclass(frozen=True)
class TableOptions:
    """The data.* keys that say how to read a table: the csv format's files and columns, and any table
    format's filter and label map. `files` maps a split to its (table, image folder), relative to the root."""

    files: tuple[tuple[str, str, str], ...] = ()  # (split, table, image folder)
    image_column: str = "image"
    label_column: str = "level"
    image_suffix: str = ""
    filter: str = ""
    label_map: str = ""
    patient_column: str = ""

    @staticmethod
    def of(data) -> "TableOptions":
        """From a DataConfig: data.train_csv/train_images belong to data.train_split, the test ones to data.test_split."""
        files = tuple((split, table, images) for split, table, images in (
            (data.train_split, data.train_csv, data.train_images), (data.test_split, data.test_csv, data.test_images))
            if table)
        return TableOptions(files, data.image_column, data.label_column, data.image_suffix, data.filter, data.label_map,
                            data.patient_column)

    def filters(self) -> tuple[tuple[str, str], ...]:
        return _pairs(self.filter, "data.filter", "column=value")

    def labels(self) -> tuple[tuple[str, str], ...]:
        return _pairs(self.label_map, "data.label_map", f"label=grade (0..{NUM_GRADES - 1} or {DROP})")


def _pairs(text: str, key: str, form: str) -> tuple[tuple[str, str], ...]:
    """'a=1, b=2' as (("a", "1"), ("b", "2")); an error naming the key for anything else."""
    pairs = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        left, sep, right = part.partition("=")
        if not sep or not left.strip():
            raise DatasetError(f"{key}={text!r}: {part!r} is not {form} (several: comma-separated)")
        pairs.append((left.strip(), right.strip()))
    return tuple(pairs)


@dataclass(frozen=True)
class Table:
    """Where one split of a table format lives and how to read it."""

    file: Path
    images: Path
    image_column: str | int  # a header name, or a position in headerless files
    label_column: str | int
    suffix: str = ""  # the image extension when names carry none (others are tried too)
    header: bool = True
    delimiter: str = ","
    filters: tuple[tuple[str, str], ...] = ()
    label_map: tuple[tuple[str, str], ...] = ()
    patient_column: str | int | None = None  # the patient of each row (None: from the image name)


@dataclass(frozen=True)
class Preset:
    """A dataset as its publisher ships it: each split's table and image folder ("*": any split name, as
    {split}), its columns, the image extension, and the filters a split always carries."""

    tables: dict[str, tuple[str, str]]
    image_column: str | int
    label_column: str | int
    suffix: str
    header: bool = True
    delimiter: str = ","
    split_filters: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    label_map: tuple[tuple[str, str], ...] = ()
    views: tuple[str, ...] = ()  # splits that are parts of another (EyePACS' leaderboard halves of its test split)
    pairs: str = ""  # a file of the images one patient's exam holds, a row each (Messidor-2's messidor-2.csv)
    about: str = ""  # which dataset it is, and what of it is read

    def table(self, root: Path, split: str, options: TableOptions) -> Table | None:
        place = self.tables.get(split) or self.tables.get("*")
        if place is None:
            return None
        file, images = (p.format(split=split) for p in place)
        user_map = dict(options.labels())
        return Table(root / file, root / images, self.image_column, self.label_column, self.suffix, self.header,
                     self.delimiter, self.split_filters.get(split, ()) + options.filters(),
                     tuple({**dict(self.label_map), **user_map}.items()), options.patient_column or None)

    def splits(self) -> list[str]:
        """The splits the dataset ships (what describe and preprocess go through), views aside."""
        return [s for s in self.tables if s != "*" and s not in self.views]


_IDRID = "2. Groundtruths/{} IDRiD_Disease Grading_{} Labels.csv"
PRESETS: dict[str, Preset] = {
    "kaggle": Preset({"*": ("{split}Labels.csv", "{split}")}, "image", "level", ".jpeg",
                     about="the layout of Kaggle's Diabetic Retinopathy Detection, for any split (dr-resnet writes it too)"),
    "aptos": Preset({"*": ("{split}.csv", "{split}_images")}, "id_code", "diagnosis", ".png",
                    about="the layout of Kaggle's APTOS 2019 Blindness Detection, for any split (dr-resnet writes it too)"),
    "eyepacs": Preset({"train": ("trainLabels.csv", "train"), "test": ("retinopathy_solution.csv", "test"),
                       "public": ("retinopathy_solution.csv", "test"), "private": ("retinopathy_solution.csv", "test")},
                      "image", "level", ".jpeg",
                      split_filters={"public": (("Usage", "Public"),), "private": (("Usage", "Private"),)},
                      views=("public", "private"),
                      about="Kaggle's Diabetic Retinopathy Detection (EyePACS): trainLabels.csv; the test labels released "
                            "afterwards (retinopathy_solution.csv, column Usage: the public and private leaderboard halves)"),
    "idrid": Preset({"train": (_IDRID.format("a.", "Training"), "1. Original Images/a. Training Set"),
                     "test": (_IDRID.format("b.", "Testing"), "1. Original Images/b. Testing Set")},
                    "Image name", "Retinopathy grade", ".jpg",
                    about='IDRiD, part B (disease grading), unpacked: the root is the "B. Disease Grading" folder'),
    "messidor2": Preset({"test": ("messidor_data.csv", "IMAGES")}, "image_id", "adjudicated_dr_grade", ".png",
                        split_filters={"test": (("adjudicated_gradable", "1"),)}, pairs="messidor-2.csv",
                        about="Messidor-2: ADCIS's IMAGES folder beside Google's adjudicated grades (messidor_data.csv, "
                              "Kaggle google-brain/messidor2-dr-grades); the ungradable images carry no grade and are left "
                              'out; messidor-2.csv (ADCIS) pairs each exam\'s two images, "left;right" a row: a patient each'),
    "ddr": Preset({"train": ("train.txt", "train"), "valid": ("valid.txt", "valid"), "test": ("test.txt", "test")},
                  0, 1, ".jpg", header=False, delimiter=" ", label_map=(("5", DROP),),
                  about='DDR\'s grading part (the root is DR_grading): {split}.txt lines "<file> <grade>"; grade 5 is '
                        "ungradable"),
}


def table_of(root: Path, split: str, fmt: str, options: TableOptions | None = None) -> Table | None:
    """The table of a split in a table format (None where the format has no such split)."""
    options = options or TableOptions()
    if fmt in PRESETS:
        return PRESETS[fmt].table(root, split, options)
    if fmt == "csv":
        place = {s: (t, i) for s, t, i in options.files}.get(split)
        if place is None:
            return None
        return Table(root / place[0], root / place[1], options.image_column, options.label_column,
                     options.image_suffix, filters=options.filters(), label_map=options.labels(),
                     patient_column=options.patient_column or None)
    return None


def split_names(root: Path, fmt: str, options: TableOptions | None = None) -> list[str]:
    """The splits a named format defines whose files are all there."""
    options = options or TableOptions()
    if fmt == "csv":
        names = [s for s, _, _ in options.files]
    elif fmt in PRESETS and PRESETS[fmt].splits():
        names = PRESETS[fmt].splits()
    else:
        return [s for s, f in find_splits(root) if f == fmt]
    return [s for s in names if _present(root, s, fmt, options)]


def _present(root: Path, split: str, fmt: str, options: TableOptions | None = None) -> bool:
    if fmt == "lab":
        return SplitLayout.of(root, split, fmt).present()
    if fmt == "folders":
        return (root / split).is_dir() and any((root / split / str(g)).is_dir() for g in range(NUM_GRADES))
    table = table_of(root, split, fmt, options)
    return table is not None and table.file.is_file()


def find_splits(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(split, format) of every split under root in a format data.format=auto detects, sorted by name."""
    root = Path(root)
    found = set()
    for fmt, suffix in SPLIT_FILE_SUFFIX.items():
        for p in root.glob(f"*{suffix}"):
            split = p.name[: -len(suffix)]
            if split and SplitLayout.of(root, split, fmt).present() and (
                    fmt != "aptos" or (root / f"{split}_images").is_dir()):
                found.add((split, fmt))
    if root.is_dir():
        found.update((d.name, "folders") for d in root.iterdir() if _present(root, d.name, "folders"))
    return sorted(found)


def detect_format(root: str | os.PathLike, split: str) -> str:
    """The one format whose split files exist under root; an error if none or several do."""
    root = Path(root)
    found = [f for f in DETECTED if _present(root, split, f)]
    if len(found) == 1:
        return found[0]
    if not found:
        expected = "; ".join(f"{f}: " + " + ".join(p.name for p in SplitLayout.of(root, split, f).csv_files)
                             for f in FORMATS)
        raise DatasetError(f"no '{split}' split found in {root} (expected one of {expected}; folders: {split}/0 .. "
                           f"{split}/4; other layouts: data.format=csv or one of {', '.join(DATASETS)})")
    raise DatasetError(f"{root} holds '{split}' split files of several formats ({', '.join(found)}): "
                       f"name one with data.format=...")


def _problem(path: Path, what: str, rows: Sequence[int], fix: str = "") -> str:
    shown = ", ".join(str(r) for r in rows[:MAX_ROWS_SHOWN])
    more = f" and {len(rows) - MAX_ROWS_SHOWN} more" if len(rows) > MAX_ROWS_SHOWN else ""
    return f"{path}: {what} in {len(rows)} row(s): {shown}{more}" + (f" ({fix})" if fix else "")


def _read_rows(path: Path, delimiter: str = ",") -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        if delimiter == " ":  # whitespace-separated lists (DDR): any run of blanks separates
            return [line.split() for line in f.read().splitlines()]
        return list(csv.reader(f, delimiter=delimiter))


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


def _same(cell: str, wanted: str) -> bool:
    """A filter's match: equal text, or equal numbers ("1" matches "1.0")."""
    if cell == wanted:
        return True
    try:
        return float(cell) == float(wanted)
    except ValueError:
        return False


def _read_table(table: Table, problems: list[str], left_out: list[str], unlabelled: list[bool]
                ) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[str] | None]:
    """(line, image name), (line, label text) and the patient (None without table.patient_column) of the
    rows a table keeps. An empty patient cell is a problem naming its rows. Header names are matched
    without stray spaces; trailing empty columns and blank lines are no rows; rows that data.filter or a
    label mapped to drop leave out are counted in the log and in `left_out` (a line per rule). A header
    of the image column and no other but the filters' and the patient's is an unlabelled split
    (`unlabelled` gets True; the label texts are then the names); any other header without the label
    column is a problem naming it."""
    path = table.file
    rows = _read_rows(path, table.delimiter)
    if table.header:
        if not rows:
            problems.append(f"{path}: empty file (expected a header naming '{table.image_column}' and "
                            f"'{table.label_column}')")
            return [], [], None
        header = [c.strip() for c in rows[0]]
        known = {table.image_column, table.patient_column, *(c for c, _ in table.filters)}
        if table.label_column not in header and table.image_column in header and set(filter(None, header)) <= known:
            unlabelled.append(True)  # e.g. APTOS's test.csv (id_code alone): the labels were never published
            table = dataclasses.replace(table, label_column=table.image_column, label_map=())
        wanted = [("image column", table.image_column), ("label column", table.label_column),
                  *(("filter column", c) for c, _ in table.filters),
                  *([("patient column", table.patient_column)] if table.patient_column is not None else [])]
        missing = [f"{c!r} ({role})" for role, c in wanted if c not in header]
        if missing:
            problems.append(f"{path}: header {[h for h in header if h]} lacks column(s) {', '.join(missing)}")
            return [], [], None
        column = {c: header.index(c) for role, c in wanted}
        body, first = rows[1:], 2
    else:
        column = {c: c for c in (table.image_column, table.label_column, table.patient_column) if c is not None}
        body, first = rows, 1
    needed = max(column.values()) + 1
    names, labels, patients, short, no_patient = [], [], [], [], []
    filtered = dropped = 0
    label_map = dict(table.label_map)
    for line, row in enumerate(body, start=first):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue  # a blank line, or one of empty cells only
        if len(cells) < needed:
            short.append(line)
            continue
        if not all(_same(cells[column[c]], v) for c, v in table.filters):
            filtered += 1
            continue
        label = cells[column[table.label_column]]
        label = label_map.get(label, label)
        if label == DROP:
            dropped += 1
            continue
        names.append((line, cells[column[table.image_column]]))
        labels.append((line, label))
        if table.patient_column is not None:
            patients.append(cells[column[table.patient_column]])
            if not patients[-1]:
                no_patient.append(line)
    if short:
        problems.append(_problem(path, f"fewer than the {needed} fields its columns need", short))
    if no_patient:
        problems.append(_problem(path, f"empty patient id (column {table.patient_column!r})", no_patient))
    if filtered:
        left_out.append(f"{filtered} row(s) left out by the filter {', '.join(f'{c}={v}' for c, v in table.filters)}")
    if dropped:
        left_out.append(f"{dropped} row(s) left out by the label map "
                        f"({', '.join(f'{k}={v}' for k, v in table.label_map if v == DROP)})")
    for line in left_out:
        log.info("%s: %s", path, line)
    return names, labels, (patients if table.patient_column is not None else None)


def _whole_number(text: str) -> int | None:
    """'2' or '2.0' (a table pandas saved again) -> 2; anything else, 2.5 included, None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _parse_labels(path: Path, labels: list[tuple[int, str]], problems: list[str],
                  mapped: bool = False) -> list[int]:
    parsed, bad = [], []
    for line, text in labels:
        grade = _whole_number(text)
        if grade is not None and 0 <= grade < NUM_GRADES:
            parsed.append(grade)
        else:
            bad.append(line)
            parsed.append(-1)
    if bad:
        fix = "map the dataset's labels with data.label_map" if not mapped else "check data.label_map"
        problems.append(_problem(path, f"label not an integer in 0..{NUM_GRADES - 1}", bad,
                                 f"e.g. row {bad[0]} reads {dict(labels)[bad[0]]!r}; {fix}"))
    return parsed


class _DirIndex:
    """Lists each image folder once (a scandir beats one stat per row on big or network folders)."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = [(d, {e.name for e in os.scandir(d) if e.is_file()} if d.is_dir() else set()) for d in dirs]
        self.ambiguous: list[tuple[str, list[Path]]] = []  # names that two files answer to (a.jpeg and a.JPEG)

    def find(self, name: str, extension: str) -> Path | None:
        """The file of an image name: the name as given when it has an image extension, else the name with
        `extension` or any other image extension (a preprocessed copy holds <stem>.jpeg for a.png)."""
        stem = image_stem(name)
        others = [stem + e for e in _ANY_CASE_EXTENSIONS if e != extension]
        candidates = ([name] if stem != name else []) + [stem + extension] + others
        for d, files in self.dirs:
            found = [c for c in candidates if c in files]
            if found:
                same = [c for c in found if c.lower() == found[0].lower()]
                if len(same) > 1 and found[0] != name:  # the name does not say which of them
                    self.ambiguous.append((name, [d / c for c in same]))
                return d / found[0]
        return None


def read_pairs(path: Path, names: Sequence[str]) -> list[str]:
    """Each image's patient from a pairs file (rows of one exam's images, ';' or ',' between them, an
    optional header row): the exam's first image's stem; an image in no row is its own patient (counted
    in the log). Names match without case or extension."""
    exam_of: dict[str, str] = {}
    text = path.read_text(encoding="utf-8-sig")
    for number, line in enumerate(text.splitlines(), start=1):
        cells = [c.strip() for c in line.replace(";", ",").split(",") if c.strip()]
        if not cells or (number == 1 and not any(image_stem(c) != c for c in cells)):
            continue  # a blank line, or a header ("left;right"): no cell is an image file name
        for cell in cells:
            exam_of[image_stem(cell).lower()] = image_stem(cells[0])
    patients = [exam_of.get(image_stem(n).lower(), "") for n in names]
    alone = sum(1 for p in patients if not p)
    if alone:
        log.info("%s: %d of %d image(s) are in no pair: each counts as its own patient", path, alone, len(names))
    return [p or image_stem(n) for p, n in zip(patients, names)]


def image_stem(name: str) -> str:
    """An image name without its image extension (IM002385.JPG -> IM002385; a name without one as it is)."""
    base, ext = os.path.splitext(name)
    return base if ext.lower() in IMAGE_EXTENSIONS else name


@dataclass(frozen=True)
class Split:
    """A validated split: image i is `names[i]` at `paths[i]` with grade `labels[i]`, from line `rows[i]`
    of `index_file` (folders: the i-th image of the split's folder, by grade then name)."""

    root: Path
    name: str
    format: str
    names: list[str]
    paths: list[Path]
    labels: np.ndarray
    rows: list[int]
    index_file: Path
    table: Table | None = None  # how a table format's split was read (None: lab, folders)
    patients: list[str] = field(default_factory=list)  # each image's patient (patients.patients_of)
    patient_source: str = ""  # where the patients come from when not from the names: a column, a pairs file
    left_out: list[str] = field(default_factory=list)  # the rows the format's rules left out, a line per rule
    labelled: bool = True  # False: a prediction-only split (its table has no label column); labels are -1

    @property
    def layout(self) -> SplitLayout:
        return SplitLayout.of(self.root, self.name, self.format)


def _read_folders(root: Path, split: str, problems: list[str]) -> tuple[list, list, list]:
    """(line, name), (line, grade text), (line, path) of {split}/{grade}/*: names are file names without
    extension; a folder that is not a grade, or a file that is not an image, is a problem."""
    base = root / split
    entries, odd_dirs, odd_files = [], [], []
    for grade_dir in sorted(p for p in base.iterdir() if not p.name.startswith(".")):
        if not grade_dir.is_dir():
            odd_files.append(grade_dir.name)
            continue
        if not (grade_dir.name.isdigit() and int(grade_dir.name) < NUM_GRADES):
            odd_dirs.append(grade_dir.name)
            continue
        for f in sorted(p for p in grade_dir.iterdir() if not p.name.startswith(".")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                entries.append((f.stem, grade_dir.name, f))
            else:
                odd_files.append(f"{grade_dir.name}/{f.name}")
    if odd_dirs:
        problems.append(f"{base}: folder(s) {odd_dirs} are not grades: the folders format holds one folder per grade, "
                        f"named 0..{NUM_GRADES - 1}")
    if odd_files:
        shown = ", ".join(odd_files[:MAX_ROWS_SHOWN]) + (" ..." if len(odd_files) > MAX_ROWS_SHOWN else "")
        problems.append(f"{base}: {len(odd_files)} entr(ies) that are not images in a grade folder: {shown} "
                        f"(images end in {', '.join(IMAGE_EXTENSIONS)})")
    numbered = list(enumerate(entries, start=1))
    return ([(i, n) for i, (n, _, _) in numbered], [(i, g) for i, (_, g, _) in numbered],
            [p for _, (_, _, p) in numbered])


def read_split(root: str | os.PathLike, split: str = "train", fmt: str = "auto",
               options: TableOptions | None = None, unlabelled_ok: bool = False) -> Split:
    """Read and validate a split; raises one DatasetError listing every problem. A split whose table has
    no label column (APTOS's test.csv) is an error naming the ways to a labelled test part, or, with
    `unlabelled_ok` (describe, preprocess, split, predict), a Split with `labelled` False and labels -1."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a directory")
    fmt = detect_format(root, split) if fmt == "auto" else fmt
    if options is not None and options.patient_column and fmt in ("lab", "folders"):
        raise DatasetError(f"data.patient_column={options.patient_column} names a table column, but the {fmt} format "
                           f"in {root} has no table: leave it empty (patients then come from the image names)")
    problems: list[str] = []
    found_paths = None
    table = None
    explicit_patients, patient_source = None, ""
    left_out: list[str] = []
    unlabelled: list[bool] = []
    if fmt == "lab":
        layout = SplitLayout.of(root, split, fmt)
        for p in layout.csv_files:
            if not p.is_file():
                raise DatasetError(f"{p} not found (lab format needs {', '.join(q.name for q in layout.csv_files)})")
        names = _read_single_column(layout.csv_files[0], problems)
        label_cells = _read_single_column(layout.csv_files[1], problems)
        name_file, label_file = layout.csv_files
        if len(names) != len(label_cells):
            problems.append(f"{name_file} has {len(names)} rows but {label_file} has "
                            f"{len(label_cells)}: row i of one must be the label of row i of the other")
        image_dirs, extension = layout.image_dirs, layout.extension
    elif fmt == "folders":
        name_file = label_file = root / split
        if not name_file.is_dir():
            raise DatasetError(f"{name_file} not found (folders format: {split}/0 .. {split}/{NUM_GRADES - 1})")
        names, label_cells, found_paths = _read_folders(root, split, problems)
        image_dirs, extension = (), ""
    else:
        table = table_of(root, split, fmt, options)
        if table is None:
            defined = split_names(root, fmt, options)
            how = ("set data.train_csv / data.test_csv (and the image folders) for the splits you use"
                   if fmt == "csv" else f"its splits: {', '.join(PRESETS[fmt].splits())}")
            raise DatasetError(f"{fmt} format has no '{split}' split in {root} ({how}; found: {', '.join(defined) or 'none'})")
        if not table.file.is_file():
            raise DatasetError(f"{table.file} not found ({fmt} format, '{split}' split)")
        names, label_cells, explicit_patients = _read_table(table, problems, left_out, unlabelled)
        pairs = root / PRESETS[fmt].pairs if fmt in PRESETS and PRESETS[fmt].pairs else None
        if explicit_patients is None and pairs is not None:
            if pairs.is_file():
                explicit_patients, patient_source = read_pairs(pairs, [n for _, n in names]), f"the pairs in {pairs.name}"
            else:
                log.warning("%s not found: each %s image counts as its own patient (the bootstrap resamples images, "
                            "and a patient's two eyes may be split apart)", pairs, fmt)
        elif explicit_patients is not None:
            patient_source = f"the table's column {table.patient_column!r}"
        name_file = label_file = table.file
        image_dirs, extension = (table.images,), table.suffix
    if unlabelled and not unlabelled_ok:
        how = "data.test_csv (format csv) names a labelled table" if split != "train" else "name a labelled split"
        raise DatasetError(f"{table.file} has no '{table.label_column}' column: the {fmt} '{split}' split in {root} is "
                           f"unlabelled (prediction only: python -m dr_resnet.predict --images). To train and test, "
                           f"test on labelled images: python -m dr_resnet.split --src {root} --dst DIR pools the "
                           f"labelled splits and splits them by patient, or {how}")
    labels = ([-1] * len(names) if unlabelled else
              _parse_labels(label_file, label_cells, problems, mapped=bool(table and table.label_map)))

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

    if found_paths is not None:
        paths = found_paths
    else:
        index = _DirIndex(image_dirs)
        paths, missing = [], []
        for line, name in names:
            path = index.find(name, extension)
            if path is None:
                missing.append(line)
            paths.append(path)
        for name, files in index.ambiguous:
            problems.append(f"image {name!r} is {' and '.join(str(f) for f in files)}, files whose names differ only in "
                            f"the case of their extension: remove or rename all but one")
        if missing:
            where = " or ".join(str(d) for d in image_dirs)
            example = dict(names)[missing[0]]
            shown = example if os.path.splitext(example)[1].lower() in IMAGE_EXTENSIONS else f"{example}{extension}"
            problems.append(_problem(name_file, "image file missing", missing, f"e.g. {shown} not in {where}"))
    if problems:
        raise DatasetError(f"{fmt} split '{split}' in {root} is not usable:\n  " + "\n  ".join(problems))
    plain_names = [n for _, n in names]
    return Split(root, split, fmt, plain_names, paths, np.asarray(labels, dtype=np.int64),
                 [line for line, _ in names], name_file, table, patients_of(plain_names, explicit_patients), patient_source,
                 left_out, not unlabelled)


def add_format_arguments(parser) -> None:
    """--format and data.KEY=VALUE arguments: how the commands that read a dataset without training
    (describe, preprocess, evaluate) are told its layout, with train's keys and checks."""
    parser.add_argument("--format", default="auto", choices=FORMAT_CHOICES,
                        help="the dataset's layout (data.format; auto detects lab, kaggle, aptos and folders)")
    parser.add_argument("data_keys", nargs="*", metavar="data.KEY=VALUE",
                        help="how to read a table: data.test_csv, data.test_images, data.image_column, data.label_column, "
                             "data.image_suffix, data.filter, data.label_map (train --help says each)")


def format_arguments(args) -> tuple[str, TableOptions]:
    """(data.format, TableOptions) from the arguments add_format_arguments declared."""
    from dr_resnet.config import data_settings

    data = data_settings(args.data_keys, format=args.format)
    return data.format, TableOptions.of(data)
