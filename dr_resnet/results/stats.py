"""Uncertainty of the grading metrics: bootstrap 95% intervals, paired comparisons of two models on the
same images, McNemar's test. numpy only.

The bootstrap resamples patients (each image's id from dr_resnet.patients: EyePACS' <patient>_left|right,
or a table's patient column; both eyes of a patient move together, as they are not independent) when some
patient has several images, images otherwise; `unit` says which. It is vectorised: each resample is a
vector of weights (how often each image was drawn), so a resample's confusion matrix is one matrix
product and its referable-DR AUC one weighted rank sum; 10,000 images x 2,000 resamples take seconds.
Intervals are percentile intervals, seeded.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from dr_resnet import NUM_GRADES
from dr_resnet.results.metrics import METRICS, REFERABLE_GRADE, of_confusion
from dr_resnet.seeds import derive_seed

RESAMPLES, LEVEL = 2000, 0.95
CHUNK_CELLS = 20_000_000  # weights held at once (resamples x images): bounds memory (~160 MB)


def resampling_units(patients: Sequence[str] | None) -> tuple[np.ndarray, str]:
    """Each image's resampling unit (an integer) from its patient id (dr_resnet.patients: one per image);
    and what the units are: "patients" when some image shares its patient with another, else "images"."""
    if patients is None or not len(patients):
        return np.arange(0, dtype=np.int64), "images"
    units = np.unique([str(p) for p in patients], return_inverse=True)[1].astype(np.int64)
    return units, "patients" if units.max() + 1 < len(patients) else "images"


def bootstrap_weights(units: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """(r, N) arrays, chunk by chunk, `resamples` rows in all: row k counts how often each image is in
    resample k (its unit drawn with replacement, as many units as there are)."""
    rng = np.random.default_rng(derive_seed(seed, "bootstrap"))
    n_units = int(units.max()) + 1 if len(units) else 0
    chunk = max(1, CHUNK_CELLS // max(1, len(units)))
    done = 0
    while done < resamples:
        rows = min(chunk, resamples - done)
        counts = rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=rows)
        yield counts[:, units].astype(np.float64)
        done += rows


def weighted_confusion(labels: np.ndarray, grades: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R, 5, 5) confusion matrices, one per row of weights."""
    cells = np.eye(NUM_GRADES * NUM_GRADES)[labels * NUM_GRADES + grades]  # (N, 25) one-hot
    return (weights @ cells).reshape(-1, NUM_GRADES, NUM_GRADES)


def weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R,) ROC AUCs, one per row of weights: the weighted chance that a positive scores above a negative,
    ties counting half (metrics.roc_auc for unit weights); 0.5 where a resample lacks a class."""
    order = np.argsort(scores, kind="mergesort")
    s, pos = scores[order], positive[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # each image's run of equal scores
    ends = np.r_[starts[1:], len(s)]
    negative_cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w * ~pos, axis=1)], axis=1)
    below = negative_cum[:, starts[group]]  # negatives scoring strictly lower
    tied = negative_cum[:, ends[group]] - below
    w_pos, w_neg = (w * pos).sum(axis=1), (w * ~pos).sum(axis=1)
    wins = (w * pos * (below + 0.5 * tied)).sum(axis=1)
    return np.divide(wins, w_pos * w_neg, out=np.full(len(w), 0.5), where=(w_pos > 0) & (w_neg > 0))


def metrics_of(labels: np.ndarray, grades: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every METRICS entry per row of weights: the confusion-matrix metrics as metrics.py declares them,
    on one weighted matrix per row; the referable AUC by weighted ranks."""
    values = of_confusion(weighted_confusion(labels, grades, weights))
    values["referable_auc"] = weighted_auc(labels >= REFERABLE_GRADE, scores, weights)
    return values


def _arrays(labels, grades, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels, grades = np.asarray(labels, dtype=np.int64), np.asarray(grades, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if not labels.shape == grades.shape == scores.shape:
        raise ValueError(f"{len(labels)} labels, {len(grades)} grades and {len(scores)} scores: one each per image")
    return labels, grades, scores


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_intervals(labels: Sequence[int], grades: Sequence[int], scores: Sequence[float],
                        patients: Sequence[str] | None = None, resamples: int = RESAMPLES, seed: int = 0,
                        level: float = LEVEL) -> dict:
    """{"unit", "resamples", "level", and per metric {"value", "low", "high"}}: the metric on these
    images and its bootstrap percentile interval."""
    labels, grades, scores = _arrays(labels, grades, scores)
    units, unit = resampling_units(patients if patients is not None else [str(i) for i in range(len(labels))])
    point = metrics_of(labels, grades, scores, np.ones((1, len(labels))))
    samples = {m: [] for m in METRICS}
    for weights in bootstrap_weights(units, resamples, seed):
        for m, v in metrics_of(labels, grades, scores, weights).items():
            samples[m].append(v)
    result: dict = {"unit": unit, "resamples": resamples, "level": level, "seed": seed}
    for m in METRICS:
        low, high = _interval(np.concatenate(samples[m]), level)
        result[m] = {"value": float(point[m][0]), "low": low, "high": high}
    return result


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """McNemar's exact test on paired right/wrong: the images only A got right against those only B got
    right, two-sided binomial p-value at 1/2."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        p = 1.0
    else:  # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space, doubled
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
        top = max(logs)
        p = min(1.0, 2 * math.exp(top) * sum(math.exp(x - top) for x in logs))
    return {"a_only_right": only_a, "b_only_right": only_b, "p_value": p}


Scored = tuple[Sequence[int], Sequence[float]]  # one run's (grades, referable scores) per image


def paired_comparison(labels: Sequence[int], a: Scored | list[Scored], b: Scored | list[Scored],
                      patients: Sequence[str] | None = None, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL, metrics: Sequence[str] = ("accuracy", "qwk", "referable_auc")) -> dict:
    """A minus B on the same images, each side one run's (grades, referable scores) or a list of them (the
    seeds of an arm, paired seed by seed): per metric the difference of the (seed-averaged) metrics and
    its paired-bootstrap interval (every run scored on each resample, so the interval is the test set's
    uncertainty about that mean difference), and McNemar's test per pair of runs."""
    side_a, side_b = (list(x) if isinstance(x, list) else [x] for x in (a, b))
    if len(side_a) != len(side_b) or not side_a:
        raise ValueError(f"paired runs: {len(side_a)} on one side, {len(side_b)} on the other")
    labels = np.asarray(labels, dtype=np.int64)
    runs_a = [_arrays(labels, *run)[1:] for run in side_a]
    runs_b = [_arrays(labels, *run)[1:] for run in side_b]
    units, unit = resampling_units(patients if patients is not None else [str(i) for i in range(len(labels))])

    def mean_metrics(runs, weights) -> dict[str, np.ndarray]:
        per_run = [metrics_of(labels, grades, scores, weights) for grades, scores in runs]
        return {m: np.mean([v[m] for v in per_run], axis=0) for m in metrics}

    ones = np.ones((1, len(labels)))
    point_a, point_b = mean_metrics(runs_a, ones), mean_metrics(runs_b, ones)
    samples = {m: [] for m in metrics}
    for weights in bootstrap_weights(units, resamples, seed):
        va, vb = mean_metrics(runs_a, weights), mean_metrics(runs_b, weights)
        for m in metrics:
            samples[m].append(va[m] - vb[m])
    result: dict = {"unit": unit, "resamples": resamples, "level": level, "images": len(labels), "runs_per_side": len(runs_a)}
    for m in metrics:
        low, high = _interval(np.concatenate(samples[m]), level)
        result[m] = {"a": float(point_a[m][0]), "b": float(point_b[m][0]),
                     "difference": float(point_a[m][0] - point_b[m][0]), "low": low, "high": high}
    tests = [mcnemar(ga == labels, gb == labels) for (ga, _), (gb, _) in zip(runs_a, runs_b)]
    result["mcnemar"] = tests[0] if len(tests) == 1 else tests
    return result
