"""Bootstrap intervals, paired comparisons and McNemar's test: against metrics.py, scipy, and simulated
predictions whose truth is known."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.stats import binomtest

from dr_resnet.patients import patients_of
from dr_resnet.results import metrics, stats
from dr_resnet.results.simulation import Setting, coverage, expected_scores


def random_predictions(n: int, seed: int, right: float = 0.8):
    rng = np.random.default_rng(seed)
    labels = rng.choice(5, size=n, p=[0.6, 0.1, 0.15, 0.1, 0.05])
    wrong = rng.random(n) > right
    grades = np.where(wrong, rng.integers(0, 5, size=n), labels)
    scores = np.clip((labels >= 2) * 0.5 + rng.normal(0.25, 0.25, size=n), 0, 1).round(2)  # ties on purpose
    return labels, grades, scores


def test_unit_weights_give_metrics_py_values():
    labels, grades, scores = random_predictions(300, seed=1)
    values = stats.metrics_of(labels, grades, scores, np.ones((1, 300)))
    cm = metrics.confusion_matrix(labels, grades)
    expected = {**metrics.summarize(cm), "referable_auc": metrics.roc_auc(labels >= 2, scores)}
    expected["macro_f1"], expected["accuracy"] = metrics.macro_f1(cm), metrics.accuracy(cm)
    for name in stats.METRICS:
        assert values[name][0] == pytest.approx(expected[name], abs=1e-12), name


def test_weights_equal_an_explicit_resample():
    labels, grades, scores = random_predictions(200, seed=2)
    drawn = np.random.default_rng(0).integers(0, 200, size=200)
    weights = np.bincount(drawn, minlength=200)[None].astype(float)
    values = stats.metrics_of(labels, grades, scores, weights)
    cm = metrics.confusion_matrix(labels[drawn], grades[drawn])
    assert values["qwk"][0] == pytest.approx(metrics.quadratic_weighted_kappa(cm), abs=1e-12)
    assert values["referable_auc"][0] == pytest.approx(metrics.roc_auc(labels[drawn] >= 2, scores[drawn]), abs=1e-12)
    assert values["referable_sensitivity"][0] == pytest.approx(metrics.referable(cm)["referable_sensitivity"])


def test_patients_are_resampled_together():
    names = [f"{10 + i // 2}_{'left' if i % 2 == 0 else 'right'}" for i in range(40)]
    units, unit = stats.resampling_units(patients_of(names))
    assert unit == "patients" and units.max() == 19 and np.array_equal(units[0::2], units[1::2])
    weights = np.concatenate(list(stats.bootstrap_weights(units, 500, seed=0)))
    assert weights.shape == (500, 40) and np.array_equal(weights[:, 0::2], weights[:, 1::2])
    assert np.all(weights.sum(axis=1) == 40)  # 20 patients drawn, two eyes each
    # The units are the patient ids as given (dr_resnet.patients decides them, for the split too).
    units, unit = stats.resampling_units(patients_of(["7_left", "c4f2", "7_right.jpeg", "b_left"]))
    assert unit == "patients" and units.tolist() == [0, 2, 0, 1]
    assert stats.resampling_units(patients_of(["a.jpeg", "b_left"]))[1] == "images"  # no two images share a patient


def test_intervals_cover_the_truth_at_the_nominal_rate_and_match_the_normal_width():
    """Predictions right with probability 0.8 on 400 images, 200 times: the 95% interval for accuracy
    covers 0.8 about 95% of the time (binomial spread of the rate over 200 trials: 0.015), and is as
    wide as the normal approximation's."""
    truth, n, covered, widths = 0.8, 400, 0, []
    for repetition in range(200):
        rng = np.random.default_rng(repetition)
        labels = rng.integers(0, 5, size=n)
        grades = np.where(rng.random(n) < truth, labels, (labels + 1) % 5)
        result = stats.bootstrap_intervals(labels, grades, rng.random(n), resamples=500, seed=repetition)
        a = result["accuracy"]
        covered += a["low"] <= truth <= a["high"]
        widths.append(a["high"] - a["low"])
    assert 0.91 <= covered / 200 <= 0.985
    normal = 2 * 1.96 * np.sqrt(truth * (1 - truth) / n)
    assert np.mean(widths) == pytest.approx(normal, rel=0.05)


def test_paired_comparison_and_mcnemar():
    labels, better, scores = random_predictions(500, seed=3, right=0.9)
    rng = np.random.default_rng(4)
    worse = np.where(rng.random(500) < 0.15, (labels + 2) % 5, better)
    result = stats.paired_comparison(labels, (better, scores), (worse, scores))
    acc = result["accuracy"]
    assert acc["difference"] == pytest.approx(np.mean(better == labels) - np.mean(worse == labels))
    assert 0 < acc["low"] < acc["difference"] < acc["high"]
    assert result["referable_auc"]["difference"] == 0.0 and result["referable_auc"]["low"] == 0.0
    m = result["mcnemar"]
    assert m["a_only_right"] == int(((better == labels) & (worse != labels)).sum()) and m["b_only_right"] == 0
    assert m["p_value"] < 1e-6
    # The same model against itself: no difference, no spread, p = 1.
    same = stats.paired_comparison(labels, (better, scores), (better, scores))
    q = same["qwk"]
    assert (q["difference"], q["se"], q["low"], q["high"], q["p_value"]) == (0.0, 0.0, 0.0, 0.0, 1.0)
    assert q["over"] == stats.ONE_SEED and q["df"] is None
    assert same["mcnemar"]["p_value"] == 1.0


@pytest.mark.parametrize("only_a,only_b", [(3, 9), (40, 25), (0, 5), (120, 80)])
def test_mcnemar_is_the_exact_binomial_test(only_a, only_b):
    a = np.array([True] * only_a + [False] * only_b + [True] * 7)
    b = np.array([False] * only_a + [True] * only_b + [True] * 7)
    assert stats.mcnemar(a, b)["p_value"] == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-9)


def test_seeds_pool_into_one_comparison():
    """Two seeds a side: the difference is that of the seed means, and a single seed pair gives the
    unpooled comparison."""
    labels, grades, scores = random_predictions(300, seed=6)
    rng = np.random.default_rng(7)
    a = [(np.where(rng.random(300) < 0.1, (labels + 1) % 5, labels), scores) for _ in range(2)]
    b = [(np.where(rng.random(300) < 0.3, (labels + 1) % 5, labels), scores) for _ in range(2)]
    pooled = stats.paired_comparison(labels, a, b)
    mean_acc = np.mean([np.mean(g == labels) for g, _ in a]) - np.mean([np.mean(g == labels) for g, _ in b])
    assert pooled["accuracy"]["difference"] == pytest.approx(mean_acc) and pooled["runs_per_side"] == 2
    assert pooled["accuracy"]["low"] < mean_acc < pooled["accuracy"]["high"] and len(pooled["mcnemar"]) == 2
    single = stats.paired_comparison(labels, [a[0]], [b[0]])
    assert single == stats.paired_comparison(labels, a[0], b[0])
    with pytest.raises(ValueError, match="2 on one side, 1 on the other"):
        stats.paired_comparison(labels, a, [b[0]])


def test_mcnemar_clustered_by_patient_holds_its_level_where_the_per_image_test_does_not():
    """Two eyes of a patient share their discordance (no difference between the models): the per-image
    test counts each patient twice and rejects far more often than 5%; the clustered one holds 5%."""
    units = np.repeat(np.arange(200), 2)
    per_image, clustered = [], []
    for repetition in range(400):
        rng = np.random.default_rng(repetition)
        discordant = rng.random(200) < 0.2
        a_wins = rng.random(200) < 0.5
        a = np.repeat(~discordant | a_wins, 2)
        b = np.repeat(~discordant | ~a_wins, 2)
        per_image.append(stats.mcnemar(a, b)["p_value"] < 0.05)
        found = stats.mcnemar(a, b, units)
        assert found["test"] == stats.MCNEMAR_CLUSTERED
        clustered.append(found["p_value"] < 0.05)
    assert np.mean(per_image) > 0.12 and 0.02 <= np.mean(clustered) <= 0.085
    # One image a patient: the exact test.
    a, b = np.array([1, 1, 1, 0, 0, 1], dtype=bool), np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    two = stats.mcnemar(np.r_[a, a], np.r_[b, b], np.r_[np.arange(6), np.arange(6) + 6])
    assert two["test"] == "exact"
    pairs = stats.mcnemar(np.r_[a, True], np.r_[b, True], np.r_[np.arange(6), 0])
    # Patients' d (Durkalski: per image of the patient): 1/2 (patient 0: +1 and its 7th image, both right), +1,
    # 0, -1, 0, 0: X2 = 0.5^2 / (0.25 + 1 + 1) = 1/9.
    assert pairs["statistic"] == pytest.approx(1 / 9)
    assert pairs["p_value"] == pytest.approx(math.erfc(math.sqrt(1 / 9 / 2)))


def test_clustered_mcnemar_is_durkalskis_form_on_a_worked_example():
    """4 two-image and 6 one-image patients. Only-A-right minus only-B-right per patient: (2, 1, 0, -1) for the
    two-image ones, (1, 1, 1, -1, 0, 0) for the others. Durkalski et al. (2003) divide each by the patient's
    images: d = 1, 0.5, 0, -0.5, 1, 1, 1, -1, 0, 0; X2 = 3^2 / 5.5 = 1.636 (the image-weighted form, without
    the division, gives 4^2 / 10 = 1.6)."""
    a, b, units = [], [], []
    for patient, (only_a, only_b, images) in enumerate([(2, 0, 2), (1, 0, 2), (1, 1, 2), (0, 1, 2), (1, 0, 1), (1, 0, 1),
                                                        (1, 0, 1), (0, 1, 1), (0, 0, 1), (0, 0, 1)]):
        kinds = [(True, False)] * only_a + [(False, True)] * only_b
        kinds += [(True, True)] * (images - len(kinds))
        a += [x for x, _ in kinds]
        b += [y for _, y in kinds]
        units += [patient] * images
    found = stats.mcnemar(np.array(a), np.array(b), np.array(units))
    assert found["statistic"] == pytest.approx(9 / 5.5) and found["test"] == stats.MCNEMAR_CLUSTERED
    assert found["p_value"] == pytest.approx(math.erfc(math.sqrt(9 / 5.5 / 2)))


def test_leaving_one_patient_out_equals_recomputing_without_them():
    """The jackknife's leave-one-patient-out values (subtracted confusion counts; the AUC's pair counts, ties
    half, a patient with a positive and a negative eye) equal the metrics recomputed without that patient."""
    labels, grades, scores = random_predictions(120, seed=11)
    names = [f"{i // 2}_{'left' if i % 2 else 'right'}" if i < 80 else f"solo{i}" for i in range(120)]
    units, unit = stats.resampling_units(patients_of(names))
    found = stats.leave_one_out(labels, grades, scores, units, ("accuracy", "qwk", "referable_auc"))
    assert unit == "patients" and len(found["qwk"]) == 40 + 40
    for u in range(units.max() + 1):
        keep = units != u
        cm = metrics.confusion_matrix(labels[keep], grades[keep])
        assert found["qwk"][u] == pytest.approx(metrics.quadratic_weighted_kappa(cm))
        assert found["accuracy"][u] == pytest.approx(metrics.accuracy(cm))
        assert found["referable_auc"][u] == pytest.approx(metrics.roc_auc(labels[keep] >= 2, scores[keep]))


def test_the_seed_level_error_counts_the_seeds_and_the_shared_test_set():
    """se^2 = s^2/S + C: seed pairs whose differences disagree widen the interval beyond the test set's alone;
    the pairs' own differences are reported and their signs counted; t with S - 1 degrees of freedom."""
    labels, _, scores = random_predictions(400, seed=8, right=0.85)
    rng = np.random.default_rng(9)
    noise = [0.02, 0.30, 0.05, 0.25]  # B's error rate per seed: A wins by a lot, then barely
    a = [(np.where(rng.random(400) < 0.12, (labels + 1) % 5, labels), scores) for _ in noise]
    b = [(np.where(rng.random(400) < r, (labels + 1) % 5, labels), scores) for r in noise]
    names = [f"{i // 2}_{'left' if i % 2 else 'right'}" for i in range(400)]
    found = stats.paired_comparison(labels, a, b, patients_of(names))
    acc = found["accuracy"]
    singles = [stats.paired_comparison(labels, x, y, patients_of(names))["accuracy"] for x, y in zip(a, b)]
    d = np.array([s["difference"] for s in singles])
    assert acc["per_seed"] == pytest.approx(d) and acc["difference"] == pytest.approx(d.mean())
    assert acc["seeds_agree"] == int(np.sum(np.sign(d) == np.sign(d.mean())))
    assert acc["seed_variance"] == pytest.approx(d.var(ddof=1)) and acc["df"] == 3
    assert acc["se"] ** 2 == pytest.approx(d.var(ddof=1) / 4 + max(acc["test_set_covariance"], 0))
    assert acc["over"] == stats.OVER_SEEDS
    half = stats.t_quantile(0.95, 3) * acc["se"]
    assert (acc["low"], acc["high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert acc["high"] - acc["low"] > 1.5 * (singles[0]["high"] - singles[0]["low"])  # one seed: the test set alone
    assert found["mcnemar"][0]["test"] == stats.MCNEMAR_CLUSTERED and len(found["mcnemar"]) == 4
    t = abs(d.mean()) / acc["se"]
    assert acc["p_value"] == pytest.approx(2 * scipy_stats.t.sf(t, 3))


def test_power_and_detectable_differences_follow_the_noncentral_t():
    """At 5 seed pairs a difference of 1.7 standard deviations of one pair's difference (se * sqrt(5)) is found
    in about 80% of tests at alpha 0.05; a family of 4 needs about 2.5. The power integral equals scipy's
    non-central t where that is stable; more seeds never need a larger difference; the test set's own term
    bounds what seeds can do."""
    assert stats.detectable(4, 0.95) / math.sqrt(5) == pytest.approx(1.68, abs=0.01)
    assert stats.detectable(4, 1 - 0.05 / 4) / math.sqrt(5) == pytest.approx(2.48, abs=0.01)
    for df, nc in ((1, 3.0), (4, 3.8), (9, 2.0)):
        crit = scipy_stats.t.ppf(0.975, df)
        exact = scipy_stats.nct.sf(crit, df, nc) + scipy_stats.nct.cdf(-crit, df, nc)
        assert stats.power(nc, df, 0.95) == pytest.approx(exact, abs=1e-6)
    sizes = [stats.detectable(s - 1, 0.95) / math.sqrt(s) for s in (2, 3, 5, 10, 20)]
    assert sizes == sorted(sizes, reverse=True)
    def nct_power(seeds: int) -> float:
        crit, nc = scipy_stats.t.ppf(0.975, seeds - 1), 0.05 / math.sqrt(0.004 / seeds)
        return scipy_stats.nct.sf(crit, seeds - 1, nc) + scipy_stats.nct.cdf(-crit, seeds - 1, nc)
    needed = stats.seeds_needed(0.05, seed_variance=0.004, covariance=0.0, level=0.95)
    assert nct_power(needed) >= 0.8 > nct_power(needed - 1) and needed == 15
    assert stats.seeds_needed(0.05, seed_variance=0.004, covariance=0.0009, level=0.95) is None  # C alone: 0.03 se
    assert stats.t_quantile(0.95, 10) == pytest.approx(2.228, abs=1e-3)  # 11 seeds: not the normal's 1.96
    # A t-interval at 1 degree of freedom can reach past what a difference can be: kept within it.
    assert stats.clipped("accuracy", (-4.5, 4.3)) == (-1.0, 1.0) and stats.clipped("qwk", (-2.5, 0.1)) == (-2.0, 0.1)
    assert math.isnan(stats.t_p_value(0.1, 0.0, 3)) and stats.t_p_value(0.0, 0.0, 3) == 1.0  # no spread: no test


def test_operating_points_fit_the_threshold_on_held_out_and_measure_on_test():
    val_labels = np.array([0] * 50 + [3] * 10)
    val_scores = np.r_[np.arange(50) / 50, np.full(10, 0.99)]  # negatives 0.00 .. 0.98
    threshold = stats.specificity_threshold(val_labels >= 2, val_scores, 0.90)
    assert np.mean(val_scores[:50] < threshold) >= 0.90 and np.mean(val_scores[:50] < np.nextafter(threshold, 0)) < 0.9 + 1e-9
    assert threshold == pytest.approx(0.88)  # 45 of 50 negatives (0.00 .. 0.88) must lie below it
    labels, _, scores = random_predictions(300, seed=11)
    names = [f"{i // 2}_{'left' if i % 2 else 'right'}" for i in range(300)]
    points = stats.operating_points((val_labels, val_scores), (labels, scores), patients_of(names), resamples=300)
    assert [p["target_specificity"] for p in points] == [0.90, 0.98]
    for p in points:
        refer, positive = scores >= p["threshold"], labels >= 2
        assert p["sensitivity"]["value"] == pytest.approx(refer[positive].mean())
        assert p["specificity"]["value"] == pytest.approx((~refer[~positive]).mean())
        assert p["sensitivity"]["low"] <= p["sensitivity"]["value"] <= p["sensitivity"]["high"] and p["unit"] == "patients"
        assert p["held_out_specificity"] >= p["target_specificity"]
    # 50 held-out negatives: too few for either target (100 for 90%, 500 for 98%); 98% rests on one above it.
    assert [p["held_out_negatives"] for p in points] == [50, 50]
    assert points[1]["warning"] == ("50 held-out negatives: the threshold rests on the 1 scoring above it (about 500 "
                                    "are needed for a 98% specificity)")
    enough = stats.operating_points((np.r_[np.zeros(100, int), [3] * 5], np.r_[np.arange(100) / 100, [0.99] * 5]),
                                    (labels, scores), patients_of(names), specificities=(0.9,), resamples=50)
    assert "warning" not in enough[0] and stats.enough_negatives(0.98) == 500
    with pytest.raises(ValueError, match="no negative"):
        stats.specificity_threshold(np.ones(3, dtype=bool), np.zeros(3), 0.9)


def _per_image_intervals(labels, grades, scores, units, resamples: int, seed: int, level: float = 0.95) -> dict:
    """The bootstrap as it was computed before (a weight per image and resample, every metric from those
    weights): what bootstrap_intervals must still give, bit for bit."""
    weights = np.concatenate(list(stats.bootstrap_weights(units, resamples, seed)))
    values = stats.metrics_of(labels, grades, scores, weights)
    tail = 100 * (1 - level) / 2
    return {m: [float(x) for x in np.nanpercentile(values[m], [tail, 100 - tail])] for m in stats.METRICS}


def test_the_bootstrap_holds_its_memory_bound_and_gives_the_intervals_of_per_image_weights():
    """50,000 images of 25,000 patients, 2,000 resamples: the bootstrap computes every resample from the
    patients' counts, in chunks of at most stats.CHUNK_BYTES, instead of a (resamples x images) weight array
    and the AUC's several copies of it (1.15 GB at its peak before); the intervals are those of per-image
    weights exactly (every sum is of whole numbers or halves), with ties, one class or one image."""
    import tracemalloc

    n = 50_000
    rng = np.random.default_rng(7)
    labels = rng.choice(5, size=n, p=[0.73, 0.07, 0.15, 0.025, 0.025])
    grades = np.where(rng.random(n) < 0.8, labels, rng.integers(0, 5, size=n))
    scores = np.round(rng.random(n), 4)
    patients = [str(i // 2) for i in range(n)]
    tracemalloc.start()
    try:
        found = stats.bootstrap_intervals(labels, grades, scores, patients)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the draws (25,000 patients x 2,000 resamples, a byte each: 48 MB) and a chunk's arrays (CHUNK_BYTES, 64 MB)
    assert peak < 150 * 2**20, f"{peak / 2**20:.0f} MB"
    assert found["unit"] == "patients" and found["qwk"]["low"] < found["qwk"]["value"] < found["qwk"]["high"]
    for n, kind, grouped in ((3000, "ties", True), (401, "ties", False), (57, "positives", True), (40, "negatives", True),
                             (33, "one score", True), (1, "ties", False)):
        labels = {"positives": rng.integers(2, 5, size=n), "negatives": rng.integers(0, 2, size=n)}.get(
            kind, rng.integers(0, 5, size=n))
        grades = rng.integers(0, 5, size=n)
        scores = np.full(n, 0.3) if kind == "one score" else np.round(rng.random(n), 2)
        patients = [str(i // 3 if grouped else i) for i in range(n)]
        units, _ = stats.resampling_units(patients)
        got = stats.bootstrap_intervals(labels, grades, scores, patients, resamples=300, seed=n)
        expected = _per_image_intervals(labels, grades, scores, units, 300, n)
        assert {m: [got[m]["low"], got[m]["high"]] for m in stats.METRICS} == expected, (n, kind)


def test_one_draw_of_resamples_serves_every_statistic_on_a_test_set():
    """The patients' resamples are drawn once (Resamples) and given to each run's intervals and operating
    points on that test set: the same intervals as drawing them again, in any chunk size; draws of another
    seed or other patients are refused."""
    labels, grades, scores = random_predictions(600, seed=21)
    _, other_grades, other_scores = random_predictions(600, seed=22)
    patients = [str(i // 2) for i in range(600)]
    units, _ = stats.resampling_units(patients)
    drawn = stats.draw_resamples(units, 400, seed=0)
    assert drawn.counts.shape == (300, 400) and np.all(drawn.counts.sum(axis=0) == 300)
    for g, s in ((grades, scores), (other_grades, other_scores)):
        assert stats.bootstrap_intervals(labels, g, s, patients, resamples=400, drawn=drawn) == \
            stats.bootstrap_intervals(labels, g, s, patients, resamples=400)
    held_out = (labels[:200], scores[:200])
    assert stats.operating_points(held_out, (labels, scores), patients, resamples=400, drawn=drawn) == \
        stats.operating_points(held_out, (labels, scores), patients, resamples=400)
    chunked = np.concatenate(list(drawn.chunks(stats.CHUNK_BYTES - 2 * 8 * 300 * 7)), axis=1)  # 7 a chunk
    assert np.array_equal(chunked, drawn.counts)
    with pytest.raises(ValueError, match="resamples drawn for 600 images"):
        stats.bootstrap_intervals(labels, grades, scores, patients, resamples=400, seed=1, drawn=drawn)
    with pytest.raises(ValueError, match="other patients"):
        stats.bootstrap_intervals(labels, grades, scores, [str(i) for i in range(600)], resamples=400, drawn=drawn)


def test_power_and_the_seeds_needed_hold_at_many_seeds_and_a_familys_level():
    """Where a difference needs many seeds (over 150) or a family's level meets one degree of freedom, the
    power integral still equals scipy's non-central t (over the chi-square in one piece it answered 0 there),
    and seeds_needed (halving) finds the fewest seed pairs that the non-central t says are enough."""
    for df, level, nc in ((199, 0.95, 2.8), (1000, 0.95, 1.0), (1, 1 - 0.05 / 40, 5.0), (2, 1 - 0.05 / 40, 6.0)):
        crit = scipy_stats.t.ppf(1 - (1 - level) / 2, df)
        exact = scipy_stats.nct.sf(crit, df, nc) + scipy_stats.nct.cdf(-crit, df, nc)
        assert stats.power(nc, df, level) == pytest.approx(exact, abs=1e-9), (df, level, nc)

    def nct_power(seeds: int, variance: float, covariance: float) -> float:
        crit, nc = scipy_stats.t.ppf(0.975, seeds - 1), 0.05 / math.sqrt(variance / seeds + covariance)
        return scipy_stats.nct.sf(crit, seeds - 1, nc) + scipy_stats.nct.cdf(-crit, seeds - 1, nc)
    for variance, covariance in ((0.0063, 0.000278), (0.004, 0.0), (0.05, 0.0)):
        needed = stats.seeds_needed(0.05, variance, covariance, level=0.95)
        assert nct_power(needed, variance, covariance) >= 0.8 > nct_power(needed - 1, variance, covariance)
    assert stats.seeds_needed(0.05, 0.0063, 0.000278, level=0.95) > 150


def test_an_arms_mean_over_seeds_counts_the_seeds_and_the_shared_test_set():
    """seed_mean_test_of, recomputed from its definition with scikit-learn's QWK: the mean of the seeds' QWK,
    se^2 = their variance / S + the mean covariance between different seeds' leave-one-patient-out values
    (jackknife, (n - 1)/n), t with S - 1 degrees of freedom; one seed: the jackknife alone, normal."""
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(5)
    patients = np.repeat(np.arange(30), 2)
    labels = rng.integers(0, 5, size=60)
    runs = [np.where(rng.random(60) < 0.7, labels, rng.integers(0, 5, size=60)) for _ in range(3)]
    units, _ = stats.resampling_units([str(p) for p in patients])
    scored = [stats.run_scores(labels, g, np.zeros(60), units, ("qwk",)) for g in runs]
    found = stats.seed_mean_test_of(scored, ("qwk",))["qwk"]

    def qwk(keep, grades):
        return cohen_kappa_score(labels[keep], grades[keep], weights="quadratic")
    values = np.array([qwk(slice(None), g) for g in runs])
    left = np.array([[qwk(patients != p, g) for g in runs] for p in range(30)])  # (patients, seeds)
    centred = left - left.mean(axis=0)
    cov = 29 / 30 * centred.T @ centred
    shared = (cov.sum() - np.trace(cov)) / 6
    se = math.sqrt(values.var(ddof=1) / 3 + max(shared, 0.0))
    assert found["mean"] == pytest.approx(values.mean()) and found["se"] == pytest.approx(se) and found["df"] == 2
    half = scipy_stats.t.ppf(0.975, 2) * se
    assert (found["low"], found["high"]) == pytest.approx((values.mean() - half, values.mean() + half))
    assert found["sd"] == pytest.approx(values.std(ddof=1))
    one = stats.seed_mean_test_of(scored[:1], ("qwk",))["qwk"]
    assert one["df"] is None and one["se"] == pytest.approx(math.sqrt(cov[0, 0]))
    assert one["low"] == pytest.approx(values[0] - scipy_stats.norm.ppf(0.975) * math.sqrt(cov[0, 0]))


# An arm's interval over seeds and test patients (seed_mean_test, the answer table's) against the arm's
# expected score, simulated (dr_resnet.results.simulation): one arm, S seeds on a fresh test set of two-eyed
# patients each replication. Three regimes of its two error terms (se^2 = seed variance / S + the test set's
# covariance), named for QWK: the test set dominates (seeds differ only by their per-image errors and share
# a per-patient error: 125 patients), both (a fifth to five times each other), the seeds dominate (log-skill
# sd 0.3, 1,000 patients: the seeds' QWK sd 0.08).
TEST_SET_DOMINATES = Setting(1, seed_sd=0.0, patient_effect=0.8)
BOTH = Setting(1, seed_sd=0.12, patient_effect=0.4)
SEEDS_DOMINATE = Setting(1, seed_sd=0.3, patient_effect=0.0, patients=1000)
REGIMES = {"test-set-dominates": TEST_SET_DOMINATES, "both": BOTH, "seeds-dominate": SEEDS_DOMINATE}
TRUTH_DRAWS = 10_000  # the expected score's Monte-Carlo error: about 0.0005 QWK, against half-widths of 0.1-0.3


def coverage_tolerance(replications: int) -> float:
    """How far a coverage may sit from 95%: one point (what the jackknife's and the t's approximations give
    at 125-1,000 patients: 94.1% with one seed whose runs differ only image by image, 4,000 replications) plus
    two Monte-Carlo errors of 95% at `replications` (1,000: 2.4 points, a 95% interval passes between 92.6%
    and 97.4%, a 90% or 99% one fails; 4,000: 1.7 points)."""
    return 0.01 + 2 * math.sqrt(0.95 * 0.05 / replications)


@functools.lru_cache(maxsize=None)
def expected(setting: Setting) -> dict[str, float]:
    return expected_scores(setting, TRUTH_DRAWS, seed=1, metrics=("qwk", "accuracy"))


FAST_COVERAGE = [("test-set-dominates", 1), ("test-set-dominates", 3), ("seeds-dominate", 1), ("seeds-dominate", 3)]
SLOW_COVERAGE = [(regime, seeds) for regime in REGIMES for seeds in (1, 3, 5)]


@pytest.mark.parametrize("regime, seeds, replications",
                         [(r, s, 1000) for r, s in FAST_COVERAGE]
                         + [pytest.param(r, s, 4000, marks=pytest.mark.slow) for r, s in SLOW_COVERAGE],
                         ids=lambda x: str(x))
def test_an_arms_interval_covers_its_expected_score_over_seeds_and_test_sets(regime, seeds, replications):
    """The 95% interval of an arm's QWK and accuracy over S seeds on one test set covers the arm's expected
    score (over seeds and test sets: expected_scores) in at least 95% of replications, less coverage_tolerance.
    Measured at 4,000 replications (QWK / accuracy):
    - one seed whose runs differ only image by image: 94.1% / 94.8%, checked within the tolerance both ways;
    - the seeds dominate: 95.5% / 97.4% at 3 seeds, 94.8% / 96.1% at 5; QWK's checked at most 95% plus the
      tolerance too (the interval is not needlessly wide where its t is the right one);
    - elsewhere the t with S - 1 degrees of freedom is conservative, the test set's term being known far better
      than S - 1 degrees of freedom say: QWK 100% / 98.6% at 3 / 5 seeds where the test set dominates, 99.8% /
      98.5% with both (Satterthwaite's degrees of freedom, which would narrow it, over-claimed at 2-3 seeds in
      the comparisons' calibration: docs/benchmarks.md);
    - the seeds alone (a t over the seeds' values, the test set taken as fixed) under-cover wherever the test
      set's share is sizeable, the reason its term is there: QWK 68% / 45% at 3 / 5 seeds where it dominates,
      88% / 76% with both;
    - one seed where seeds vary: its interval knows the test set alone and under-covers (the report says so:
      stats.ONE_SEED): QWK 86% with both, 26% where the seeds dominate.
    Not checked: a wider, skewed spread of seeds (log-skill sd 0.5, the seeds' QWK sd 0.14, 250 patients) covered
    QWK in 93.0% of 4,000 at 5 seeds, below the tolerance (94.7% at 3)."""
    setting = replace(REGIMES[regime], seeds=seeds)
    truth = expected(REGIMES[regime])
    found = coverage(setting, replications, truth, seed=seeds)
    tolerance = coverage_tolerance(replications)
    for m in truth:
        covered = found[m]["covered"]
        if seeds == 1 and setting.seed_sd > 0:
            assert covered < 0.95 - tolerance, (m, found[m])
            continue
        assert covered >= 0.95 - tolerance, (m, found[m])
        if seeds == 1 or (regime == "seeds-dominate" and m == "qwk"):
            assert covered <= 0.95 + tolerance, (m, found[m])
        if seeds > 1 and regime != "seeds-dominate":
            assert found[m]["seeds_alone_covered"] < 0.95 - tolerance, (m, found[m])
    if seeds > 1:  # the regime is what it is named for (QWK's two terms, their means over replications)
        seed_term, test_term = found["qwk"]["seed_term"], found["qwk"]["test_set_term"]
        ratio = {"test-set-dominates": test_term / seed_term, "seeds-dominate": seed_term / test_term}.get(regime)
        if ratio is None:
            assert 1 / 5 < seed_term / test_term < 5, found["qwk"]
        else:
            assert ratio > 5, found["qwk"]
