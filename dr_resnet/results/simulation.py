"""Simulated test sets and runs with a known truth, to check that the arms' comparison claims a difference
no more often than it says (tests/test_calibration.py, bench/calibration.py), and that an arm's interval over
its seeds and the test patients covers the arm's expected score as often as it says (tests/test_stats.py).
numpy only.

A test set: patients with two eyes whose DR severities are correlated; true grades cut from the severity at
EyePACS's shares (73% grade 0). A run grades each eye as its severity plus an error made of three parts:
- a per-arm, per-patient error (`patient_effect`), the same in every seed of the arm: arms that are right on
  different patients, which every seed pair on this test set then shares;
- a per-run, per-image error;
- the run's skill, which scales its whole error and varies between seeds (`seed_sd`: log-normal).
Both arms draw from one distribution unless `effect` > 0, which shrinks arm A's error by that share. Each
replication draws a fresh test set, fresh arms and fresh seeds. An arm's expected score, which its interval
over seeds (seed_mean_test) estimates, averages over all three: a large Monte Carlo of one run on each of
many fresh test sets (expected_scores).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as scipy_stats

from dr_resnet import NUM_GRADES
from dr_resnet.results.metrics import METRICS
from dr_resnet.results.stats import LEVEL, seed_mean_test, seed_pair_test, t_interval, t_quantile

GRADE_SHARES = (0.73, 0.07, 0.15, 0.025, 0.025)  # EyePACS' training labels, grade 0..4
CUTS = scipy_stats.norm.ppf(np.cumsum(GRADE_SHARES)[:-1])


@dataclass(frozen=True)
class Setting:
    """One simulated experiment: seed pairs a side, the runs' variation and the test set's shape."""

    seeds: int
    seed_sd: float = 0.12  # sd of log(skill) between seeds
    patient_effect: float = 0.0  # sd of an arm's per-patient error, kept across its seeds
    image_sd: float = 0.5  # sd of a run's per-image error
    eye_correlation: float = 0.6  # between a patient's two eyes' severities
    patients: int = 125  # two eyes each
    effect: float = 0.0  # arm A's error is (1 - effect) times arm B's


def test_set(setting: Setting, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(severity, true grade, patient unit) per image: two eyes per patient, correlated."""
    shared = rng.standard_normal(setting.patients).repeat(2)
    own = rng.standard_normal(2 * setting.patients)
    r = setting.eye_correlation
    severity = np.sqrt(r) * shared + np.sqrt(1 - r) * own
    return severity, np.searchsorted(CUTS, severity), np.arange(setting.patients).repeat(2)


def arm_runs(setting: Setting, severity: np.ndarray, units: np.ndarray, scale: float,
             rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """One arm's seeds on the test set: (grades, referable scores) per run."""
    per_patient = setting.patient_effect * rng.standard_normal(int(units.max()) + 1)[units]
    runs = []
    for _ in range(setting.seeds):
        skill = np.exp(setting.seed_sd * rng.standard_normal())
        score = severity + scale * skill * (per_patient + setting.image_sd * rng.standard_normal(len(severity)))
        runs.append((np.searchsorted(CUTS, score), score))
    return runs


def replicate(setting: Setting, rng: np.random.Generator, metric: str = "qwk") -> dict:
    """One simulated comparison of arm A against arm B: seed_pair_test's entry for `metric`."""
    severity, labels, units = test_set(setting, rng)
    runs_a = arm_runs(setting, severity, units, 1 - setting.effect, rng)
    runs_b = arm_runs(setting, severity, units, 1.0, rng)
    return seed_pair_test(labels, runs_a, runs_b, units, (metric,))[metric]


def claims(setting: Setting, replications: int, seed: int = 0, level: float = 0.95) -> dict:
    """Over `replications` fresh experiments: the share whose `level` interval excludes 0 (a claimed
    difference), the same share for a t-test on the seed pairs' differences alone (the test set taken as
    fixed), the mean difference, its sd over replications, and the mean estimated standard error."""
    rng = np.random.default_rng(seed)
    found = [replicate(setting, rng) for _ in range(replications)]
    differences = np.array([e["difference"] for e in found])
    claimed = np.array([not (low <= 0 <= high) for low, high in (t_interval(e, level) for e in found)])
    naive = []
    if setting.seeds > 1:
        for e in found:
            d = np.asarray(e["per_seed"])
            se = d.std(ddof=1) / np.sqrt(len(d))
            naive.append(bool(se > 0 and abs(d.mean()) / se > scipy_stats.t.ppf(1 - (1 - level) / 2, len(d) - 1)))
    return {"claimed": float(claimed.mean()), "naive_claimed": float(np.mean(naive)) if naive else None,
            "mean_difference": float(differences.mean()), "sd_difference": float(differences.std(ddof=1)),
            "mean_se": float(np.mean([e["se"] for e in found]))}


def expected_scores(setting: Setting, draws: int, seed: int = 0, metrics: tuple[str, ...] = ("qwk",)) -> dict[str, float]:
    """An arm's expected score per metric over seeds and test sets of `setting`'s size (an arm at arm B's
    error: `effect` plays no part): one run, a fresh seed, on each of `draws` fresh test sets, averaged. The
    mean over S seeds on one test set has the same expectation, so this is what seed_mean_test's interval is
    about (of the test-set size simulated: QWK is a ratio, its expectation moves slightly with the number of
    images). Metrics of the confusion matrix only (the matrices of all draws are scored at once)."""
    for m in metrics:
        if METRICS[m].of_confusion is None:
            raise ValueError(f"expected_scores: {m} is not a metric of the confusion matrix")
    rng = np.random.default_rng(seed)
    one = replace(setting, seeds=1)
    cells = NUM_GRADES * NUM_GRADES
    confusion = np.empty((draws, cells))
    for k in range(draws):
        severity, labels, units = test_set(one, rng)
        grades = arm_runs(one, severity, units, 1.0, rng)[0][0]
        confusion[k] = np.bincount(labels * NUM_GRADES + grades, minlength=cells)
    matrices = confusion.reshape(draws, NUM_GRADES, NUM_GRADES)
    return {m: float(METRICS[m].of_confusion(matrices).mean()) for m in metrics}


def coverage(setting: Setting, replications: int, truth: dict[str, float], seed: int = 0,
             level: float = LEVEL) -> dict[str, dict]:
    """Over `replications` fresh experiments (one arm, `setting.seeds` seeds on a fresh test set each), per
    metric of `truth` (expected_scores): the share whose `level` interval (seed_mean_test) covers the
    truth; the same share for a t-interval over the seeds' values alone (the test set taken as fixed; None
    with one seed); the mean estimated seed variance over S and test-set covariance (se^2's two terms,
    which say whether the seeds or the test set dominate; None with one seed); the mean se and width."""
    rng = np.random.default_rng(seed)
    metrics = tuple(truth)
    found = []
    for _ in range(replications):
        severity, labels, units = test_set(setting, rng)
        found.append(seed_mean_test(labels, arm_runs(setting, severity, units, 1.0, rng), units, metrics, level))
    seeds = setting.seeds
    summary = {}
    for m in metrics:
        entries = [e[m] for e in found]
        covered = [e["low"] <= truth[m] <= e["high"] for e in entries]
        alone = seed_terms = test_terms = None
        if seeds > 1:
            values = np.array([e["per_seed"] for e in entries])  # (replications, seeds)
            half = t_quantile(level, seeds - 1) * values.std(axis=1, ddof=1) / np.sqrt(seeds)
            alone = float(np.mean(np.abs(values.mean(axis=1) - truth[m]) <= half))
            seed_terms = float(np.mean([e["seed_variance"] for e in entries])) / seeds
            test_terms = float(np.mean([e["test_set_covariance"] for e in entries]))
        summary[m] = {"covered": float(np.mean(covered)), "seeds_alone_covered": alone,
                      "seed_term": seed_terms, "test_set_term": test_terms,
                      "mean_se": float(np.mean([e["se"] for e in entries])),
                      "mean_width": float(np.mean([e["high"] - e["low"] for e in entries]))}
    return summary
