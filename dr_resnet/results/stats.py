"""Uncertainty of the grading metrics: bootstrap 95% intervals, paired comparisons of two models on the
same images, McNemar's test. numpy and scipy only.

The bootstrap resamples patients (each image's id from dr_resnet.patients: EyePACS' <patient>_left|right,
or a table's patient column; both eyes of a patient move together, as they are not independent) when some
patient has several images, images otherwise; `unit` says which. A resample is a vector of counts, how
often each unit was drawn (Resamples: drawn once per test set and seed, shared by every statistic on it).
Every resampled statistic is a sum over images, so it is computed from per-unit sums: a resample's
confusion matrix is its counts times each unit's confusion counts, its referable-DR AUC a weighted rank sum
from each unit's images per run of equal scores (sparse), never an array per image and resample. All of
it sums whole numbers (halves for ties), exactly, in any order. Chunks of resamples hold at most
CHUNK_BYTES at once: 50,000 images (25,000 patients) x 2,000 resamples take 3 CPU seconds and 114 MB at
their peak, the draws' 48 MB included (docs/notebook/2026-12.md, Session 9).
Intervals are percentile intervals, seeded.

Paired comparisons of arms use the patient jackknife (leave_one_out, seed_pair_test): deterministic, no
resamples; what each run contributes (RunScores) is computed once per run, whatever it is compared with.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy import sparse, special
from scipy import stats as scipy_stats
from scipy.integrate import quad
from scipy.optimize import brentq

from dr_resnet import NUM_GRADES
from dr_resnet.results.metrics import METRICS, REFERABLE_GRADE, of_confusion
from dr_resnet.seeds import derive_seed

RESAMPLES, LEVEL = 2000, 0.95
CHUNK_BYTES = 64 * 2**20  # what one chunk of resamples may hold at once, every array it makes counted


def resampling_units(patients: Sequence[str] | None) -> tuple[np.ndarray, str]:
    """Each image's resampling unit (an integer) from its patient id (dr_resnet.patients: one per image);
    and what the units are: "patients" when some image shares its patient with another, else "images"."""
    if patients is None or not len(patients):
        return np.arange(0, dtype=np.int64), "images"
    units = np.unique([str(p) for p in patients], return_inverse=True)[1].astype(np.int64)
    return units, "patients" if units.max() + 1 < len(patients) else "images"


def _count(units: np.ndarray) -> int:
    return int(units.max()) + 1 if len(units) else 0


@dataclass(frozen=True)
class Resamples:
    """The bootstrap's draws on one test set: row k counts how often each unit (patient) is in resample k
    (as many units drawn, with replacement, as there are). Drawing them costs more than the metrics (a
    multinomial over every patient per resample), and a seed draws the same ones again: every statistic on
    one test set (a run's intervals of each metric, its operating points; every run on it) shares them."""

    units: np.ndarray  # each image's unit (resampling_units)
    counts: np.ndarray  # (units, resamples), small whole numbers: a column per resample
    seed: int

    @property
    def resamples(self) -> int:
        return self.counts.shape[1]

    def fits(self, units: np.ndarray, resamples: int, seed: int) -> bool:
        """Whether these are the draws of `resamples` resamples of `units` with `seed`."""
        return self.resamples == resamples and self.seed == seed and np.array_equal(self.units, units)

    def chunks(self, bytes_per_resample: int) -> Iterator[np.ndarray]:
        """The counts as (units, r) float64, r resamples at a time, so that these and what a resample's
        statistics allocate (bytes_per_resample) stay within CHUNK_BYTES (a loop over them holds one chunk
        while the next is made: two count)."""
        step = max(1, CHUNK_BYTES // (2 * 8 * len(self.counts) + bytes_per_resample))
        for start in range(0, self.resamples, step):
            yield self.counts[:, start:start + step].astype(np.float64, order="C")


def draw_resamples(units: np.ndarray, resamples: int, seed: int) -> Resamples:
    """The bootstrap's resamples of `units` (resampling_units) for `seed`: the same draws whatever the chunks."""
    rng = np.random.default_rng(derive_seed(seed, "bootstrap"))
    n_units = _count(units)
    counts = np.empty((n_units, resamples), dtype=np.uint8)
    rows = max(1, CHUNK_BYTES // (16 * max(1, n_units)))  # numpy draws them as int64, and copies them once
    for start in range(0, resamples, rows):
        drawn = rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=min(rows, resamples - start))
        if drawn.max(initial=0) > np.iinfo(counts.dtype).max:  # a unit drawn over 255 times: a tiny test set
            counts = counts.astype(np.min_scalar_type(n_units))
        counts[:, start:start + len(drawn)] = drawn.T
    return Resamples(np.asarray(units), counts, seed)


def bootstrap_weights(units: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """(r, N) arrays, chunk by chunk, `resamples` rows in all: row k counts how often each image is in
    resample k (its unit drawn with replacement, as many units as there are). The statistics themselves
    never make these (see Resamples); they show what a resample is."""
    for counts in draw_resamples(units, resamples, seed).chunks(8 * len(units)):
        yield counts.T[:, units]


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


class UnitAuc:
    """The referable AUC of resamples from their unit counts. Sorted by score, the images form runs of equal
    scores; only the runs holding a positive matter one by one (K of them): a positive's wins are the
    negatives in earlier runs and half of those in its own. So each unit's images are summed into three
    sparse (K, units) tables: its positives per positive run, its negatives in that run, and its negatives
    in the runs between two positive runs (a K + 1st column: those above every positive)."""

    def __init__(self, positive: np.ndarray, scores: np.ndarray, units: np.ndarray):
        n_units = _count(units)
        order = np.argsort(scores, kind="mergesort")
        s, pos, u = scores[order], positive[order], units[order]
        group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1 if len(s) else np.zeros(0, dtype=np.int64)
        holds = np.bincount(group, weights=pos, minlength=int(group[-1]) + 1 if len(s) else 0) > 0
        self.runs = int(holds.sum())
        run = (np.cumsum(holds) - 1)[group]  # each image's positive run (or the last one below it, -1 if none)
        inside = holds[group]

        def table(images: np.ndarray, columns: np.ndarray, width: int) -> sparse.csr_array:
            return sparse.csr_array((np.ones(int(images.sum())), (columns[images], u[images])), shape=(width, n_units))

        self.positives = table(pos, run, self.runs)
        self.tied = table(~pos & inside, run, self.runs)
        self.between = table(~pos & ~inside, run + 1, self.runs + 1)

    @property
    def bytes_per_resample(self) -> int:
        return 8 * (6 * self.runs + 2)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """(r,) AUCs of the resamples `counts` ((units, r), Resamples.chunks)."""
        pos, tied, between = self.positives @ counts, self.tied @ counts, self.between @ counts
        w_pos, w_neg = pos.sum(axis=0), tied.sum(axis=0) + between.sum(axis=0)
        below = np.cumsum(between[:-1], axis=0)  # negatives in the runs below each positive run
        below += np.cumsum(tied, axis=0)
        below -= 0.5 * tied  # earlier positive runs' negatives, and half of its own (ties)
        wins = np.einsum("kr,kr->r", pos, below)
        return np.divide(wins, w_pos * w_neg, out=np.full(counts.shape[1], 0.5), where=(w_pos > 0) & (w_neg > 0))


class UnitMetrics:
    """Every METRICS entry of resamples from their unit counts: each unit's images per confusion cell (a
    sparse (25, units) table: a resample's matrix is its product with the counts) and its referable AUC
    tables (UnitAuc)."""

    def __init__(self, labels: np.ndarray, grades: np.ndarray, scores: np.ndarray, units: np.ndarray):
        self.confusion = sparse.csr_array((np.ones(len(labels)), (labels * NUM_GRADES + grades, units)),
                                          shape=(NUM_GRADES ** 2, _count(units)))
        self.auc = UnitAuc(labels >= REFERABLE_GRADE, scores, units)

    @property
    def bytes_per_resample(self) -> int:
        return 8 * 12 * NUM_GRADES ** 2 + self.auc.bytes_per_resample  # the matrices and the metrics' steps

    def __call__(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        confusion = np.ascontiguousarray((self.confusion @ counts).T).reshape(-1, NUM_GRADES, NUM_GRADES)
        values = of_confusion(confusion)
        values["referable_auc"] = self.auc(counts)
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
                        level: float = LEVEL, drawn: Resamples | None = None) -> dict:
    """{"unit", "resamples", "level", and per metric {"value", "low", "high"}}: the metric on these
    images and its bootstrap percentile interval. `drawn`: the test set's resamples where they were drawn
    already (for another run or statistic on the same images), else they are drawn here."""
    labels, grades, scores = _arrays(labels, grades, scores)
    units, unit = resampling_units(patients if patients is not None else [str(i) for i in range(len(labels))])
    drawn = _resamples(drawn, units, resamples, seed)
    point = metrics_of(labels, grades, scores, np.ones((1, len(labels))))
    resampled = UnitMetrics(labels, grades, scores, units)
    samples = {m: [] for m in METRICS}
    for counts in drawn.chunks(resampled.bytes_per_resample):
        for m, v in resampled(counts).items():
            samples[m].append(v)
    result: dict = {"unit": unit, "resamples": resamples, "level": level, "seed": seed}
    for m in METRICS:
        low, high = _interval(np.concatenate(samples[m]), level)
        result[m] = {"value": float(point[m][0]), "low": low, "high": high}
    return result


def _resamples(drawn: Resamples | None, units: np.ndarray, resamples: int, seed: int) -> Resamples:
    if drawn is None:
        return draw_resamples(units, resamples, seed)
    if not drawn.fits(units, resamples, seed):
        raise ValueError(f"resamples drawn for {len(drawn.units)} images ({drawn.resamples} resamples, seed "
                         f"{drawn.seed}) given for {len(units)} images ({resamples}, seed {seed}) or other patients")
    return drawn


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool], units: np.ndarray | None = None) -> dict:
    """McNemar's test on paired right/wrong: the images only A got right against those only B got right.
    Images of one patient (`units`: resampling_units' ids) are not independent: where some patient has
    several images, Durkalski et al.'s (2003) clustered form: X2 = (sum_k d_k)^2 / sum_k d_k^2, d_k = (patient
    k's images only A got right minus those only B got right) / its number of images, chi-square with 1
    degree of freedom under no difference (McNemar's chi-square when every patient has one image).
    Otherwise the exact test: two-sided binomial p-value at 1/2."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    share = None
    if units is not None and len(units) and int(units.max()) + 1 < len(units):
        n_units = int(units.max()) + 1
        share = (np.bincount(units, weights=(a & ~b).astype(float) - (~a & b), minlength=n_units)
                 / np.bincount(units, minlength=n_units))
    return _mcnemar(int((a & ~b).sum()), int((~a & b).sum()), share)


def _mcnemar(only_a: int, only_b: int, share: np.ndarray | None) -> dict:
    """mcnemar's result from its counts and, clustered, each patient's d_k (None: the exact test)."""
    if share is not None:
        spread = float(np.sum(share ** 2))
        statistic = float(share.sum()) ** 2 / spread if spread > 0 else 0.0
        p = math.erfc(math.sqrt(statistic / 2))  # chi-square, 1 degree of freedom
        return {"a_only_right": only_a, "b_only_right": only_b, "statistic": statistic, "p_value": p,
                "test": MCNEMAR_CLUSTERED}
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        p = 1.0
    else:  # P(X <= k) for X ~ Binomial(n, 1/2), summed in log space, doubled
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
        top = max(logs)
        p = min(1.0, 2 * math.exp(top) * sum(math.exp(x - top) for x in logs))
    return {"a_only_right": only_a, "b_only_right": only_b, "p_value": p, "test": MCNEMAR_EXACT}


MCNEMAR_EXACT = "exact"
MCNEMAR_CLUSTERED = "clustered by patient (Durkalski et al. 2003)"


def _auc_leave_one_out(positive: np.ndarray, scores: np.ndarray, units: np.ndarray, n_units: int) -> np.ndarray:
    """(n_units,) referable AUCs, each with one unit's images left out: the Mann-Whitney count less the
    pairs that unit's images take part in (ties count half); 0.5 where a class is left empty."""
    neg_sorted, pos_sorted = np.sort(scores[~positive]), np.sort(scores[positive])
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    # each positive's negatives below it, each negative's positives above it (ties half)
    lo, hi = np.searchsorted(neg_sorted, scores, "left"), np.searchsorted(neg_sorted, scores, "right")
    below = lo + 0.5 * (hi - lo)
    lo, hi = np.searchsorted(pos_sorted, scores, "left"), np.searchsorted(pos_sorted, scores, "right")
    above = (n_pos - hi) + 0.5 * (hi - lo)
    wins = float(below[positive].sum())
    share = np.where(positive, below, above)  # the pairs each image takes part in
    removed = np.bincount(units, weights=share, minlength=n_units)
    # a unit's own positive-negative pairs were taken away twice (once per image): give them back once
    order = np.argsort(units, kind="stable")
    u, s, p = units[order], scores[order], positive[order]
    starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(u)])
    inside = np.zeros(n_units)
    rank = np.arange(len(u)) - np.repeat(starts, sizes)  # position within its unit
    for offset in range(1, int(sizes.max()) if len(sizes) else 0):
        i = np.flatnonzero(rank + offset < np.repeat(sizes, sizes))
        j = i + offset
        mixed = p[i] != p[j]
        i, j = i[mixed], j[mixed]
        pos_s, neg_s = np.where(p[i], s[i], s[j]), np.where(p[i], s[j], s[i])
        np.add.at(inside, u[i], (pos_s > neg_s) + 0.5 * (pos_s == neg_s))
    pos_left = n_pos - np.bincount(units, weights=positive, minlength=n_units)
    neg_left = n_neg - np.bincount(units, weights=~positive, minlength=n_units)
    pairs = pos_left * neg_left
    return np.divide(wins - removed + inside, pairs, out=np.full(n_units, 0.5), where=pairs > 0)


def leave_one_out(labels: np.ndarray, grades: np.ndarray, scores: np.ndarray, units: np.ndarray,
                  metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Each metric with each resampling unit (patient) left out in turn, (n_units,) per metric: confusion
    matrices add up, so a unit's own counts are subtracted from the whole; the AUC by its pair counts."""
    n_units = int(units.max()) + 1 if len(units) else 0
    cells = NUM_GRADES * NUM_GRADES
    own = np.bincount(units * cells + labels * NUM_GRADES + grades, minlength=n_units * cells).reshape(n_units, cells)
    left = (own.sum(axis=0) - own).reshape(n_units, NUM_GRADES, NUM_GRADES).astype(np.float64)
    found = {m: METRICS[m].of_confusion(left) for m in metrics if METRICS[m].of_confusion is not None}
    if "referable_auc" in metrics:
        found["referable_auc"] = _auc_leave_one_out(labels >= REFERABLE_GRADE, scores, units, n_units)
    return found


def jackknife_covariance(left_out: np.ndarray) -> np.ndarray:
    """(S, S) jackknife covariance of S statistics from their (n_units, S) leave-one-unit-out values:
    (n - 1)/n times the sum of the centred products (Efron & Stein: a test-set sampling covariance)."""
    n = len(left_out)
    centred = left_out - left_out.mean(axis=0)
    return (n - 1) / n * centred.T @ centred


def t_quantile(level: float, df: float | None) -> float:
    """The two-sided `level` quantile of Student's t with df degrees of freedom (the normal's for None)."""
    upper = 1 - (1 - level) / 2
    return float(scipy_stats.norm.ppf(upper) if df is None else scipy_stats.t.ppf(upper, df))


ONE_SEED = "one seed: the variation between seeds is unknown"
OVER_SEEDS = "seed pairs and test patients (seed-pair t, S - 1 degrees of freedom, with the test set's covariance)"


def over_seeds(values: np.ndarray, left_out: np.ndarray) -> dict:
    """The mean of S per-seed values scored on one test set and its standard error se^2 = s^2/S + C: s^2
    the values' sample variance (the seeds) and C the mean jackknife covariance between different seeds'
    values (the shared test set, which s^2 cannot see), from their (units, S) leave-one-unit-out values; t
    with S - 1 degrees of freedom. One seed: the test set's (jackknife) standard error alone, normal, `over`
    saying so. The seed-pair test's differences and an arm's own scores are both such values."""
    count = len(values)
    cov = jackknife_covariance(left_out) if len(left_out) > 1 else np.full((count, count), math.nan)
    mean = float(values.mean())
    entry = {"per_seed": values.tolist()}
    if count == 1:
        variance, df, over = float(cov[0, 0]), None, ONE_SEED
    else:
        seeds = float(values.var(ddof=1))
        shared = float((cov.sum() - np.trace(cov)) / (count * (count - 1)))
        # a negative covariance estimate would claim the shared test set makes the mean surer than
        # independent test sets would: it cannot, so it counts as 0
        variance, df, over = seeds / count + max(shared, 0.0), count - 1, OVER_SEEDS
        entry.update(seed_variance=seeds, test_set_covariance=shared)
    se = math.sqrt(variance) if variance >= 0 else math.nan
    return {**entry, "mean": mean, "se": se, "df": df, "over": over}


@dataclass(frozen=True)
class RunScores:
    """What one run's predictions on a test set bring to its paired comparisons, the same whatever it is
    compared with: each metric's value and its values with each unit (patient) left out in turn (the
    jackknife), and which images it graded right (McNemar's test), per image and summed per unit. A report
    computes it once per run (and keeps it: cache.py), not once per comparison."""

    point: dict[str, float]
    left_out: dict[str, np.ndarray]  # (units,) per metric: leave_one_out
    correct: np.ndarray  # (images,) bool
    correct_per_unit: np.ndarray  # (units,) images graded right
    unit_sizes: np.ndarray  # (units,) images
    unit: str  # "patients" where some patient has several images, else "images" (resampling_units)

    @property
    def images(self) -> int:
        return len(self.correct)


def run_scores(labels: np.ndarray, grades: np.ndarray, scores: np.ndarray, units: np.ndarray,
               metrics: Sequence[str]) -> RunScores:
    """One run's RunScores on images `labels` with resampling units `units` (resampling_units)."""
    n_units = _count(units)
    point = metrics_of(labels, grades, scores, np.ones((1, len(labels))))
    correct = np.asarray(grades) == np.asarray(labels)
    return RunScores({m: float(point[m][0]) for m in metrics}, leave_one_out(labels, grades, scores, units, metrics),
                     correct, np.bincount(units, weights=correct, minlength=n_units).astype(np.int64),
                     np.bincount(units, minlength=n_units), "patients" if n_units < len(labels) else "images")


def seed_pair_test(labels: np.ndarray, runs_a: list[tuple[np.ndarray, np.ndarray]],
                   runs_b: list[tuple[np.ndarray, np.ndarray]], units: np.ndarray,
                   metrics: Sequence[str]) -> dict[str, dict]:
    """A - B per metric over S seed pairs scored on one test set, each run its (grades, referable scores):
    seed_pair_test_of their RunScores."""
    return seed_pair_test_of(*([run_scores(labels, g, s, units, metrics) for g, s in side] for side in (runs_a, runs_b)),
                             metrics)


def seed_pair_test_of(side_a: list[RunScores], side_b: list[RunScores], metrics: Sequence[str]) -> dict[str, dict]:
    """A - B per metric over S seed pairs scored on one test set: over_seeds of the pairs' differences (two
    arms right on different patients differ alike in every pair: the test set's covariance term counts
    that), with its p-value and how many pairs agree in sign."""
    found = {}
    for m in metrics:
        a = np.array([run.point[m] for run in side_a])
        b = np.array([run.point[m] for run in side_b])
        d = a - b
        summary = over_seeds(d, np.stack([x.left_out[m] - y.left_out[m] for x, y in zip(side_a, side_b)], axis=1))
        difference = summary.pop("mean")
        entry = {"a": float(a.mean()), "b": float(b.mean()), "difference": difference, **summary}
        if len(d) > 1:
            entry["seeds_agree"] = int(np.sum(np.sign(d) == np.sign(difference))) if difference else 0
        entry["p_value"] = t_p_value(difference, entry["se"], entry["df"])
        found[m] = entry
    return found


def seed_mean_test(labels: np.ndarray, runs: list[tuple[np.ndarray, np.ndarray]], units: np.ndarray,
                   metrics: Sequence[str], level: float = LEVEL) -> dict[str, dict]:
    """An arm's score per metric over its S seeds on one test set (over_seeds: the seeds and the test
    patients both count), with its `level` t-interval (low, high) and the seeds' standard deviation."""
    return seed_mean_test_of([run_scores(labels, g, s, units, metrics) for g, s in runs], metrics, level)


def seed_mean_test_of(runs: list[RunScores], metrics: Sequence[str], level: float = LEVEL) -> dict[str, dict]:
    """seed_mean_test from the seeds' RunScores."""
    found = {}
    for m in metrics:
        values = np.array([run.point[m] for run in runs])
        entry = over_seeds(values, np.stack([run.left_out[m] for run in runs], axis=1))
        half = t_quantile(level, entry["df"]) * entry["se"]
        entry.update(low=entry["mean"] - half, high=entry["mean"] + half, level=level,
                     sd=float(values.std(ddof=1)) if len(values) > 1 else None)
        found[m] = entry
    return found


def clipped(metric: str, interval: tuple[float, float]) -> tuple[float, float]:
    """An interval of a difference kept within what the difference can be (the width of the metric's bounds:
    QWK -2..2, the others -1..1): with one or two degrees of freedom a t-interval can reach far beyond."""
    low, high = METRICS[metric].bounds
    bound = high - low
    return max(interval[0], -bound), min(interval[1], bound)


def t_p_value(difference: float, se: float, df: float | None) -> float:
    """Two-sided p-value of difference / se against t(df) (normal for None); 1 for a zero difference."""
    if difference == 0 or math.isnan(se):
        return 1.0 if difference == 0 else math.nan
    if se == 0:  # a difference with no spread at all (collapsed runs): no test can be read from it
        return math.nan
    statistic = abs(difference) / se
    return float(2 * (scipy_stats.norm.sf(statistic) if df is None else scipy_stats.t.sf(statistic, df)))


def t_interval(entry: dict, level: float = LEVEL) -> tuple[float, float]:
    """difference +- the t quantile at `level` times its standard error (seed_pair_test's entry)."""
    half = t_quantile(level, entry["df"]) * entry["se"]
    return entry["difference"] - half, entry["difference"] + half


def power(noncentrality: float, df: float | None, level: float) -> float:
    """The chance that a two-sided t-test at 1 - level rejects when difference / se = noncentrality: the
    non-central t's tails, integrated over the chi-square of the standard error (stable where scipy's nct
    is not, at the large noncentralities that one or two seeds need). The integrand is scipy.stats' normal
    tails and chi-square density as scipy computes them (ndtr; exp of the log density), called directly:
    through the distribution objects a report's power figures took a minute."""
    crit = t_quantile(level, df)
    if df is None:
        return float(scipy_stats.norm.sf(crit - noncentrality) + scipy_stats.norm.cdf(-crit - noncentrality))
    log_scale = special.gammaln(df / 2.) + (np.log(2) * df) / 2. - np.log(2 * df)

    def rejects(x: float) -> float:  # x^2 = v / df, the chi-square over its degrees of freedom (mean 1)
        bound = crit * x
        v = x * x * df
        density = x * np.exp(special.xlogy(df / 2. - 1, v) - v / 2. - log_scale) if v > 0 else 0.0
        return (special.ndtr(-(bound - noncentrality)) + special.ndtr(-bound - noncentrality)) * density
    # Only where both hold is there anything to integrate: the chi-square's own mass (between its 1e-15 and
    # 1 - 1e-15 quantiles) and crit x below |noncentrality| + 12 (beyond, both tails are below 1e-32). Over v
    # in (0, inf) at once quad missed the peak at v = df (narrow with many degrees of freedom: it answered 0
    # from about 180 on) and, at one degree of freedom and a family's level, the spike near 0.
    low, high = np.sqrt(scipy_stats.chi2.ppf([1e-15, 1 - 1e-15], df) / df)
    high = min(high, (abs(noncentrality) + 12) / crit)
    if high <= low:
        return 0.0
    return float(quad(rejects, low, high, limit=200, points=[1.0] if low < 1 < high else None)[0])


POWER = 0.8  # the chance of finding a difference that the report's "smallest detectable difference" means


@functools.lru_cache(maxsize=1024)
def detectable(df: float | None, level: float, target: float = POWER) -> float:
    """The difference, in standard errors, that a two-sided t-test at 1 - level finds with chance `target`
    (remembered: every member of a family asks it with the same degrees of freedom and level)."""
    high = 1.0
    while power(high, df, level) < target:
        high *= 2
    return float(brentq(lambda x: power(x, df, level) - target, 0.0, high))


def seeds_needed(difference: float, seed_variance: float, covariance: float, level: float, target: float = POWER,
                 most: int = 200) -> int | None:
    """The fewest seed pairs whose test (se^2 = s^2/S + C on this test set) finds `difference` with chance
    `target`; None when even `most` do not (the test set's own term C does not shrink with seeds). More
    seeds only help (a smaller se, more degrees of freedom), so it is searched by halving."""
    def enough(seeds: int) -> bool:
        se = math.sqrt(max(seed_variance, 0.0) / seeds + max(covariance, 0.0))
        return se == 0 or power(abs(difference) / se, seeds - 1, level) >= target

    if most < 2 or not enough(most):
        return None
    low, high = 2, most
    while low < high:
        middle = (low + high) // 2
        if enough(middle):
            high = middle
        else:
            low = middle + 1
    return low


Scored = tuple[Sequence[int], Sequence[float]]  # one run's (grades, referable scores) per image


def paired_comparison(labels: Sequence[int], a: Scored | list[Scored], b: Scored | list[Scored],
                      patients: Sequence[str] | None = None, level: float = LEVEL,
                      metrics: Sequence[str] = ("accuracy", "qwk", "referable_auc")) -> dict:
    """A minus B on the same images, each side one run's (grades, referable scores) or a list of them (the
    seeds of an arm, paired seed by seed). Per metric, seed_pair_test's entry with its `level` interval
    (low, high: over seed pairs and patients; over patients alone with one seed a side). McNemar's test
    per pair of runs (descriptive), clustered by patient where patients have several images."""
    side_a, side_b = (list(x) if isinstance(x, list) else [x] for x in (a, b))
    if len(side_a) != len(side_b) or not side_a:
        raise ValueError(f"paired runs: {len(side_a)} on one side, {len(side_b)} on the other")
    labels = np.asarray(labels, dtype=np.int64)
    units, _ = resampling_units(patients if patients is not None else [str(i) for i in range(len(labels))])
    scored = ([run_scores(labels, *_arrays(labels, *run)[1:], units, metrics) for run in side]
              for side in (side_a, side_b))
    return compare_scored(*scored, level=level, metrics=metrics)


def compare_scored(side_a: list[RunScores], side_b: list[RunScores], level: float = LEVEL,
                   metrics: Sequence[str] = ("accuracy", "qwk", "referable_auc")) -> dict:
    """paired_comparison from each run's RunScores (all on one test set, paired seed by seed)."""
    if len(side_a) != len(side_b) or not side_a:
        raise ValueError(f"paired runs: {len(side_a)} on one side, {len(side_b)} on the other")
    first = side_a[0]
    result: dict = {"unit": first.unit, "level": level, "images": first.images, "runs_per_side": len(side_a)}
    for m, entry in seed_pair_test_of(side_a, side_b, metrics).items():
        entry["low"], entry["high"] = clipped(m, t_interval(entry, level))
        result[m] = entry
    tests = [mcnemar_of(x, y) for x, y in zip(side_a, side_b)]
    result["mcnemar"] = tests[0] if len(tests) == 1 else tests
    return result


def mcnemar_of(a: RunScores, b: RunScores) -> dict:
    """mcnemar of two runs on one test set from their RunScores: the same test, the same numbers."""
    share = (a.correct_per_unit - b.correct_per_unit) / a.unit_sizes if a.unit == "patients" else None
    return _mcnemar(int((a.correct & ~b.correct).sum()), int((~a.correct & b.correct).sum()), share)


SCREENING_SPECIFICITIES = (0.90, 0.98)  # the operating points Gulshan et al. (2016) report for referable DR


def enough_negatives(specificity: float) -> int:
    """Held-out negatives a specificity threshold needs to rest on about 10 of them above it: 10 / (1 - target)."""
    return math.ceil(10 / (1 - specificity) - 1e-9)


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
                     resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL,
                     drawn: Resamples | None = None) -> list[dict]:
    """Referable DR (grade >= 2) at screening operating points: for each target specificity, the threshold
    on the referable score fitted on the held-out (labels, scores), then the test split's sensitivity and
    specificity at it with patient-bootstrap intervals (test `patients`, one per image; `drawn`: their
    resamples, as bootstrap_intervals)."""
    val_positive = np.asarray(held_out[0]) >= REFERABLE_GRADE
    positive = np.asarray(test[0]) >= REFERABLE_GRADE
    scores = np.asarray(test[1], dtype=np.float64)
    units, unit = resampling_units(patients if patients is not None else [str(i) for i in range(len(scores))])
    drawn, n_units = _resamples(drawn, units, resamples, seed), _count(units)
    found = []
    for target in specificities:
        threshold = specificity_threshold(val_positive, held_out[1], target)
        refer = scores >= threshold
        point = {"sensitivity": float(refer[positive].mean()) if positive.any() else math.nan,
                 "specificity": float((~refer[~positive]).mean()) if (~positive).any() else math.nan}
        samples = {"sensitivity": [], "specificity": []}
        # each unit's positives, positives referred, negatives and negatives not referred: (4, units)
        counted = sparse.csr_array(np.stack([np.bincount(units, weights=members, minlength=n_units)
                                             for members in (positive, positive & refer, ~positive, ~positive & ~refer)]))
        for counts in drawn.chunks(8 * 8):
            sums = counted @ counts  # (4, r)
            for name, row in (("sensitivity", 0), ("specificity", 2)):
                samples[name].append(np.divide(sums[row + 1], sums[row], out=np.full(counts.shape[1], np.nan),
                                               where=sums[row] > 0))
        negatives = int((~val_positive).sum())
        entry = {"target_specificity": target, "threshold": threshold,
                 "held_out_specificity": float((np.asarray(held_out[1]) < threshold)[~val_positive].mean()),
                 "held_out_negatives": negatives, "unit": unit}
        if negatives < enough_negatives(target):
            entry["warning"] = (f"{negatives} held-out negatives: the threshold rests on the "
                                f"{negatives - math.ceil(target * negatives)} scoring above it (about "
                                f"{enough_negatives(target)} are needed for a {target:.0%} specificity)")
        for name in samples:
            low, high = _interval(np.concatenate(samples[name]), level)
            entry[name] = {"value": point[name], "low": low, "high": high}
        found.append(entry)
    return found


# The methods behind each uncertainty figure the report, evaluate and summary.json give, in the words their
# results carry ("unit", "over", "test"): docs/reference/metrics.md lists them.
METHODS = (
    ("a run's metric", f"{LEVEL:.0%} percentile bootstrap interval over {RESAMPLES} seeded resamples of the test "
                       "patients (of its images where no patient has two)"),
    ("an arm's score, a difference between two arms", f"over {OVER_SEEDS}; {ONE_SEED}, the test set's jackknife alone "
                                                      "(normal)"),
    ("McNemar's test, one image a patient", f"{MCNEMAR_EXACT}: two-sided binomial p-value at 1/2 of the images only "
                                            "one of the two runs graded right"),
    ("McNemar's test, patients with several images", MCNEMAR_CLUSTERED),
    ("screening operating points", "a threshold on the referable score fitted on the held-out part for each "
                                   f"specificity of {', '.join(f'{s:.0%}' for s in SCREENING_SPECIFICITIES)}, the test "
                                   "split's sensitivity and specificity at it with bootstrap intervals"),
)
