"""Per-image predictions on a labelled split (predictions.csv): what training writes for its selected
epoch and evaluate for its checkpoint, and what intervals and paired comparisons are computed from, so
they work offline and on old runs. torch-free.

Columns: image (its name in the split), patient (dr_resnet.patients: what the bootstrap resamples),
epoch (the training epoch whose model made them; empty for evaluate's of a checkpoint file), true_grade,
grade (predicted), p_grade0..p_grade4 (the classification and ordinal heads' grade probabilities) or score
(the regression head's), and referable_score (grade >= 2; higher is more likely). Files written before the
patient and epoch columns existed read with patients from the names and no epoch.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dr_resnet.errors import UserError
from dr_resnet.files import atomic_write
from dr_resnet.patients import patients_of
from dr_resnet.registry import HEAD_SPECS


def value_columns(head_kind: str) -> list[str]:
    """What a head reports per image: the five grade probabilities, or the regression score."""
    return HEAD_SPECS[head_kind].value_columns


@dataclass(frozen=True)
class Predictions:
    names: list[str]
    labels: np.ndarray
    grades: np.ndarray
    referable_scores: np.ndarray
    values: np.ndarray  # (N, 5) probabilities or (N,) scores
    patients: list[str]  # each image's patient (the bootstrap's resampling unit)
    epoch: int | None = None  # the training epoch that made them (None: not recorded)


def write_predictions(path: str | os.PathLike, names: Sequence[str], labels: np.ndarray, grades: np.ndarray,
                      values: np.ndarray, referable_scores: np.ndarray, head_kind: str,
                      patients: Sequence[str] | None = None, epoch: int | None = None) -> Path:
    """Write predictions.csv atomically (a temporary file renamed); patients default to the names' own."""
    path = Path(path)
    columns = value_columns(head_kind)
    values = np.asarray(values, dtype=np.float64).reshape(len(names), len(columns))
    patients = patients_of(names, patients)
    epoch_cell = "" if epoch is None else int(epoch)
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "patient", "epoch", "true_grade", "grade", *columns, "referable_score"])
        for name, patient, label, grade, row, score in zip(names, patients, labels, grades, values, referable_scores):
            # 9 significant digits: every float32 reads back exactly (the AUC's ties stay as they were).
            writer.writerow([name, patient, epoch_cell, int(label), int(grade), *(f"{v:.9g}" for v in row),
                             f"{float(score):.9g}"])
    return path


class PredictionsError(UserError, ValueError):
    """A predictions.csv that cannot be read; the message names the file and row."""


def read_predictions(path: str | os.PathLike) -> Predictions:
    """The file's columns, parsed by numpy (csv.DictReader row by row took three times as long: a sweep's
    report reads hundreds of 50,000-row files); a damaged file is read again row by row, for the one line
    naming its first bad row."""
    path = Path(path)
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    needed = {"image", "true_grade", "grade", "referable_score"}
    if not needed <= set(header):
        raise PredictionsError(f"{path}: not a predictions file (needs columns {', '.join(sorted(needed))})")
    columns = [c for c in header if c == "score" or c.startswith("p_grade")]
    at = {c: i for i, c in enumerate(header)}  # a repeated column: its last, as csv.DictReader
    texts = [c for c in ("image", "patient", "epoch") if c in at]
    try:
        grades = _columns(path, [at["true_grade"], at["grade"]], np.int64)
        numbers = _columns(path, [*(at[c] for c in columns), at["referable_score"]], np.float64)
        cells = _columns(path, [at[c] for c in texts], str)
    except ValueError as exc:
        _first_damaged_row(path)
        raise PredictionsError(f"{path}: the file is damaged ({exc})") from None
    found = dict(zip(texts, cells.T.tolist()))
    names = found["image"]
    epochs = set(found.get("epoch", []))
    if len(epochs) > 1:
        raise PredictionsError(f"{path}: rows of several epochs ({', '.join(sorted(epochs))}): the file is damaged")
    epoch = epochs.pop() if epochs else ""
    values = np.ascontiguousarray(numbers[:, :-1])
    if columns == ["score"]:
        values = values.reshape(-1)
    return Predictions(names, np.ascontiguousarray(grades[:, 0]), np.ascontiguousarray(grades[:, 1]),
                       np.ascontiguousarray(numbers[:, -1]), values, patients_of(names, found.get("patient")),
                       int(epoch) if epoch else None)


def _columns(path: Path, which: list[int], dtype: type) -> np.ndarray:
    """(rows, len(which)) cells of the file's columns `which` (the csv module's quoting), as dtype."""
    with open(path) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a file of no rows: numpy warns, the answer is empty
        return np.loadtxt(f, dtype=dtype, delimiter=",", quotechar='"', comments=None, skiprows=1, usecols=which,
                          ndmin=2).reshape(-1, len(which))


def _first_damaged_row(path: Path) -> None:
    """Raise PredictionsError naming the first row whose numbers do not read (returns if every row reads)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames if c == "score" or c.startswith("p_grade")]
        for number, row in enumerate(reader, start=2):
            try:
                int(row["true_grade"]), int(row["grade"]), float(row["referable_score"])
                [float(row[c]) for c in columns]
            except (TypeError, ValueError) as exc:
                raise PredictionsError(f"{path}: row {number} is damaged ({exc})") from None
