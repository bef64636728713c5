"""What the report keeps of a run's predictions file (predictions.csv, predictions_final.csv) once it has read
it: its epoch, which test set it holds, what the run brings to the paired comparisons (stats.RunScores) and
its calibration. A 50,000-image file is about 10 MB in memory and 0.1 s to read; this is a tenth of that,
and the results cache (cache.py) keeps it between reports, so the report reads each file once, when it is
new or changed, and drops it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dr_resnet.results.metrics import expected_calibration_error
from dr_resnet.results.predictions import read_predictions
from dr_resnet.results.stats import RunScores, resampling_units, run_scores


@dataclass(frozen=True)
class FileFacts:
    """A predictions file's small facts, which a run record keeps."""

    epoch: int | None  # the training epoch that made them (None: not recorded)
    images: int
    test_set: str  # a digest of its images' names and true grades: files of one test set share it
    patients: str  # a digest of its images' patients (the resampling units)
    calibration: dict | None  # expected_calibration_error of its grade probabilities (None: a score head)


@dataclass(frozen=True)
class ScoredFile:
    facts: FileFacts
    scores: RunScores


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def score_file(path: Path, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """The file read and scored, as arrays for the cache (ScoredFile.of reads them back)."""
    found = read_predictions(path)
    units, _ = resampling_units(found.patients)
    scores = run_scores(found.labels, found.grades, found.referable_scores, units, metrics)
    facts = {"epoch": found.epoch, "images": len(found.names), "test_set": digest(found.names, found.labels.tolist()),
             "patients": digest(found.patients),
             "calibration": expected_calibration_error(found.values, found.labels) if found.values.ndim == 2 else None}
    return {"facts": np.array(json.dumps(facts)), "metrics": np.array(list(metrics)),
            "point": np.array([scores.point[m] for m in metrics]),
            **{f"left_out.{m}": scores.left_out[m] for m in metrics},
            "correct": np.packbits(scores.correct), "correct_per_unit": small(scores.correct_per_unit),
            "unit_sizes": small(scores.unit_sizes), "unit": np.array(scores.unit)}


def small(counts: np.ndarray) -> np.ndarray:
    """Counts in the fewest bytes that hold them (a patient's images: one byte), for the cache."""
    return counts.astype(np.min_scalar_type(int(counts.max(initial=0))))


def facts_of(arrays: dict[str, np.ndarray]) -> FileFacts:
    return FileFacts(**json.loads(str(arrays["facts"])))


def scored_of(arrays: dict[str, np.ndarray]) -> ScoredFile:
    facts = facts_of(arrays)
    metrics = [str(m) for m in arrays["metrics"]]
    scores = RunScores({m: float(v) for m, v in zip(metrics, arrays["point"])},
                       {m: arrays[f"left_out.{m}"] for m in metrics},
                       np.unpackbits(arrays["correct"], count=facts.images).astype(bool),
                       arrays["correct_per_unit"].astype(np.int64), arrays["unit_sizes"].astype(np.int64),
                       str(arrays["unit"]))
    return ScoredFile(facts, scores)
