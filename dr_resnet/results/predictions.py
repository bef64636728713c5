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
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"image", "true_grade", "grade", "referable_score"}
        if not needed <= set(reader.fieldnames or []):
            raise PredictionsError(f"{path}: not a predictions file (needs columns {', '.join(sorted(needed))})")
        columns = [c for c in reader.fieldnames if c == "score" or c.startswith("p_grade")]
        names, labels, grades, scores, values, patients, epochs = [], [], [], [], [], [], set()
        for number, row in enumerate(reader, start=2):
            try:
                labels.append(int(row["true_grade"]))
                grades.append(int(row["grade"]))
                scores.append(float(row["referable_score"]))
                values.append([float(row[c]) for c in columns])
            except (TypeError, ValueError) as exc:
                raise PredictionsError(f"{path}: row {number} is damaged ({exc})") from None
            names.append(row["image"])
            patients.append(row.get("patient"))
            epochs.add(row.get("epoch") or "")
    if len(epochs) > 1:
        raise PredictionsError(f"{path}: rows of several epochs ({', '.join(sorted(epochs))}): the file is damaged")
    epoch = epochs.pop() if epochs else ""
    values_array = np.array(values, dtype=np.float64)
    if columns == ["score"]:
        values_array = values_array.reshape(-1)
    return Predictions(names, np.array(labels, dtype=np.int64), np.array(grades, dtype=np.int64),
                       np.array(scores, dtype=np.float64), values_array,
                       patients_of(names, patients if "patient" in reader.fieldnames else None),
                       int(epoch) if epoch else None)
