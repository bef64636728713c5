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


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool], units: np.ndarray | None = None) -> dict:
    """McNemar's test on paired right/wrong: the images only A got right against those only B got right.
    Images of one patient (`units`: resampling_units' ids) are not independent: where some patient has
    several images, the clustered form (Durkalski et al. 2003, equal weight per image): X2 = (sum_k d_k)^2 /
    sum_k d_k^2, d_k = patient k's images only A got right minus those only B got right, chi-square with 1
    degree of freedom under no difference (it is McNemar's chi-square when every patient has one image).
    Otherwise the exact test: two-sided binomial p-value at 1/2."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if units is not None and len(units) and int(units.max()) + 1 < len(units):
        d = np.bincount(units, weights=(a & ~b).astype(float) - (~a & b), minlength=int(units.max()) + 1)
        spread = float(np.sum(d ** 2))
        statistic = float(d.sum()) ** 2 / spread if spread > 0 else 0.0
        p = math.erfc(math.sqrt(statistic / 2))  # chi-square, 1 degree of freedom
        return {"a_only_right": only_a, "b_only_right": only_b, "p_value": p, "test": "clustered by patient"}
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        p = 1.0
    else:  # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space, doubled
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
        top = max(logs)
        p = min(1.0, 2 * math.exp(top) * sum(math.exp(x - top) for x in logs))
    return {"a_only_right": only_a, "b_only_right": only_b, "p_value": p, "test": "exact"}


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: twice the smaller share of resamples on either
    side of 0 (at least one resample's worth: a p-value is never reported as 0)."""
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    if not len(d):
        return 1.0
    return float(min(1.0, 2 * max(min(np.mean(d <= 0), np.mean(d >= 0)), 1 / len(d))))


Scored = tuple[Sequence[int], Sequence[float]]  # one run's (grades, referable scores) per image


def paired_comparison(labels: Sequence[int], a: Scored | list[Scored], b: Scored | list[Scored],
                      patients: Sequence[str] | None = None, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL, metrics: Sequence[str] = ("accuracy", "qwk", "referable_auc")) -> dict:
    """A minus B on the same images, each side one run's (grades, referable scores) or a list of them (the
    seeds of an arm, paired seed by seed). Per metric: the difference of the (seed-averaged) metrics; its
    paired-bootstrap interval over patients (low, high: the test set's uncertainty about that mean, every
    run scored on each resample); with several seed pairs also the hierarchical interval (seeds_low,
    seeds_high: seed pairs and patients both resampled, so the spread between seeds counts too), each
    seed pair's own difference and how many of them share the mean's sign; and a bootstrap p-value (from
    the hierarchical resamples when there are several seeds). McNemar's test per pair of runs, clustered
    by patient where patients have several images."""
    side_a, side_b = (list(x) if isinstance(x, list) else [x] for x in (a, b))
    if len(side_a) != len(side_b) or not side_a:
        raise ValueError(f"paired runs: {len(side_a)} on one side, {len(side_b)} on the other")
    labels = np.asarray(labels, dtype=np.int64)
    runs_a = [_arrays(labels, *run)[1:] for run in side_a]
    runs_b = [_arrays(labels, *run)[1:] for run in side_b]
    units, unit = resampling_units(patients if patients is not None else [str(i) for i in range(len(labels))])
    pairs = len(runs_a)

    def per_pair(weights) -> dict[str, np.ndarray]:  # (pairs, R) differences, A_k - B_k
        va = [metrics_of(labels, grades, scores, weights) for grades, scores in runs_a]
        vb = [metrics_of(labels, grades, scores, weights) for grades, scores in runs_b]
        return {m: np.stack([x[m] - y[m] for x, y in zip(va, vb)]) for m in metrics}

    ones = np.ones((1, len(labels)))
    point_a = {m: float(np.mean([metrics_of(labels, g, s, ones)[m][0] for g, s in runs_a])) for m in metrics}
    point_b = {m: float(np.mean([metrics_of(labels, g, s, ones)[m][0] for g, s in runs_b])) for m in metrics}
    own = per_pair(ones)  # each seed pair's difference on the test set as it is
    pooled, hierarchical = {m: [] for m in metrics}, {m: [] for m in metrics}
    seed_draws = np.random.default_rng(derive_seed(seed, "bootstrap", 1))
    for weights in bootstrap_weights(units, resamples, seed):
        differences = per_pair(weights)
        drawn = seed_draws.multinomial(pairs, np.full(pairs, 1 / pairs), size=len(weights)).T / pairs  # (pairs, R)
        for m in metrics:
            pooled[m].append(differences[m].mean(axis=0))
            hierarchical[m].append((differences[m] * drawn).sum(axis=0))
    result: dict = {"unit": unit, "resamples": resamples, "level": level, "images": len(labels), "runs_per_side": pairs}
    for m in metrics:
        low, high = _interval(np.concatenate(pooled[m]), level)
        difference = point_a[m] - point_b[m]
        entry = {"a": point_a[m], "b": point_b[m], "difference": difference, "low": low, "high": high}
        samples = np.concatenate(hierarchical[m] if pairs > 1 else pooled[m])
        if pairs > 1:
            entry["seeds_low"], entry["seeds_high"] = _interval(samples, level)
            entry["per_seed"] = own[m][:, 0].tolist()
            entry["seeds_agree"] = int(np.sum(np.sign(own[m][:, 0]) == np.sign(difference))) if difference else 0
        entry["p_value"] = bootstrap_p_value(samples) if difference else 1.0
        result[m] = entry
    tests = [mcnemar(ga == labels, gb == labels, units) for (ga, _), (gb, _) in zip(runs_a, runs_b)]
    result["mcnemar"] = tests[0] if len(tests) == 1 else tests
    return result


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down correction: which of the hypotheses are rejected with the family-wise error rate
    held at alpha (p-values in any order; the answer in the same order)."""
    order = np.argsort(p_values, kind="stable")
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


SCREENING_SPECIFICITIES = (0.90, 0.98)  # the operating points Gulshan et al. (2016) report for referable DR


def specificity_threshold(positive: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    """The lowest referral threshold (refer when score >= it) at which at least `specificity` of the
    negatives score below it: fitted on held-out images, never on test."""
    negatives = np.sort(np.asarray(scores, dtype=np.float64)[~np.asarray(positive, dtype=bool)])
    if not len(negatives):
        raise ValueError("no negative (grade < 2) image to fit a specificity on")
    k = math.ceil(specificity * len(negatives))  # negatives that must score strictly below the threshold
    if k == 0:
        return float(negatives[0])
    return float(np.nextafter(negatives[k - 1], np.inf))


def operating_points(held_out: tuple[Sequence[int], Sequence[float]], test: tuple[Sequence[int], Sequence[float]],
                     patients: Sequence[str] | None = None, specificities: Sequence[float] = SCREENING_SPECIFICITIES,
                     resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> list[dict]:
    """Referable DR (grade >= 2) at screening operating points: for each target specificity, the threshold
    on the referable score fitted on the held-out (labels, scores), then the test split's sensitivity and
    specificity at it with patient-bootstrap intervals (test `patients`, one per image)."""
    val_positive = np.asarray(held_out[0]) >= REFERABLE_GRADE
    positive = np.asarray(test[0]) >= REFERABLE_GRADE
    scores = np.asarray(test[1], dtype=np.float64)
    units, unit = resampling_units(patients if patients is not None else [str(i) for i in range(len(scores))])
    found = []
    for target in specificities:
        threshold = specificity_threshold(val_positive, held_out[1], target)
        refer = scores >= threshold
        point = {"sensitivity": float(refer[positive].mean()) if positive.any() else math.nan,
                 "specificity": float((~refer[~positive]).mean()) if (~positive).any() else math.nan}
        samples = {"sensitivity": [], "specificity": []}
        for weights in bootstrap_weights(units, resamples, seed):
            for name, members, hit in (("sensitivity", positive, refer), ("specificity", ~positive, ~refer)):
                total = (weights * members).sum(axis=1)
                samples[name].append(np.divide((weights * (members & hit)).sum(axis=1), total,
                                               out=np.full(len(weights), np.nan), where=total > 0))
        entry = {"target_specificity": target, "threshold": threshold,
                 "held_out_specificity": float((np.asarray(held_out[1]) < threshold)[~val_positive].mean()),
                 "unit": unit}
        for name in samples:
            low, high = _interval(np.concatenate(samples[name]), level)
            entry[name] = {"value": point[name], "low": low, "high": high}
        found.append(entry)
    return found
