"""The hand-written statistics against the libraries that define them (the dev extra's torchmetrics,
statsmodels, scikit-learn and torch's own schedulers), minding where the definitions differ; QWK's is in
test_metrics.py. One file, so that what each oracle is, and each known difference, reads in one place;
each test names the project's function it checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from statsmodels.stats.contingency_tables import mcnemar as statsmodels_mcnemar
from statsmodels.stats.multitest import multipletests
from torchmetrics.functional.classification import multiclass_calibration_error

from dr_resnet import NUM_GRADES
from dr_resnet.data.split import holdout_mask
from dr_resnet.results.arms import ALPHA, declare_families
from dr_resnet.results.metrics import CALIBRATION_BINS, expected_calibration_error, roc_auc
from dr_resnet.results.stats import MCNEMAR_CLUSTERED, UnitAuc, mcnemar, t_p_value, weighted_auc
from dr_resnet.training.components import lr_lambda

# -- expected calibration error: torchmetrics ---------------------------------------------------------------


def torchmetrics_ece(probabilities: np.ndarray, targets: np.ndarray) -> float:
    return float(multiclass_calibration_error(torch.from_numpy(probabilities), torch.from_numpy(targets),
                                              num_classes=NUM_GRADES, n_bins=CALIBRATION_BINS, norm="l1"))


@pytest.mark.parametrize("concentration,calibrated", [(0.2, False), (0.5, True), (1.0, False)])
def test_ece_is_torchmetrics_where_the_bin_edges_agree(concentration, calibrated):
    """metrics.expected_calibration_error against torchmetrics' multiclass_calibration_error(n_bins=15,
    norm="l1") on confidences away from the bin edges and below 1 (where the two bin alike): equal to
    float32's precision (torchmetrics averages in float32). Grades drawn at random (far from calibrated) or
    from the probabilities themselves (calibrated: a small ECE, each bin's gap small)."""
    rng = np.random.default_rng(int(concentration * 10))
    probabilities = rng.dirichlet(np.full(NUM_GRADES, concentration), size=600)
    if calibrated:
        targets = (rng.random((600, 1)) > probabilities.cumsum(axis=1)).sum(axis=1).clip(max=NUM_GRADES - 1)
    else:
        targets = rng.integers(0, NUM_GRADES, size=600)
    confidence = probabilities.max(axis=1)
    edges = np.arange(CALIBRATION_BINS + 1) / CALIBRATION_BINS
    assert np.abs(confidence[:, None] - edges).min() > 1e-6 and confidence.max() < 1  # where both bin alike
    ours = expected_calibration_error(probabilities, targets)
    assert len(ours["bins"]) >= 10  # most bins hold images: the comparison is not of one or two bins
    assert ours["ece"] == pytest.approx(torchmetrics_ece(probabilities, targets), abs=1e-6)


def test_ece_differs_from_torchmetrics_where_confidence_is_one_or_on_a_float32_edge():
    """The documented differences (expected_calibration_error's docstring). torchmetrics gives a confidence of
    exactly 1.0 a bin of its own; ours puts it in the last bin, [14/15, 1]. And torchmetrics bins float32
    confidences by float32 edges: 1/3 - 1e-12 rounds up to float32's 1/3, edge 5, while ours, in float64,
    keeps it below 5/15, in bin 4."""
    sure_and_wrong = np.array([[1.0, 0, 0, 0, 0], [0.94, 0.06, 0, 0, 0]])  # wrong, then right
    targets = np.array([1, 0])
    # ours: one bin, accuracy 1/2 at mean confidence 0.97; torchmetrics: |0 - 1| and |1 - 0.94|, half each
    assert expected_calibration_error(sure_and_wrong, targets)["ece"] == pytest.approx(0.47)
    assert torchmetrics_ece(sure_and_wrong, targets) == pytest.approx(0.53, abs=1e-6)

    third = 1 / 3 - 1e-12
    near_edge = np.array([[third, 0.3, 0.3, 1 / 15, 0], [0.3, 0.28, 0.28, 0.14, 0], [0.34, 0.33, 0.33, 0, 0]])
    targets = np.array([0, 1, 1])  # right, wrong, wrong
    assert [int(c * 15) for c in near_edge.max(axis=1)] == [4, 4, 5]
    # ours: bin 4 {right at 1/3, wrong at 0.3}, bin 5 {wrong at 0.34}
    ours = (2 / 3) * abs(0.5 - (third + 0.3) / 2) + (1 / 3) * 0.34
    # torchmetrics: bin 4 {wrong at 0.3}, bin 5 {right at 1/3, wrong at 0.34}
    theirs = (1 / 3) * 0.3 + (2 / 3) * abs(0.5 - (1 / 3 + 0.34) / 2)
    assert expected_calibration_error(near_edge, targets)["ece"] == pytest.approx(ours, abs=1e-12)
    assert torchmetrics_ece(near_edge, targets) == pytest.approx(theirs, abs=1e-6) and abs(ours - theirs) > 0.02


# -- the families' multiple-comparison correction: statsmodels --------------------------------------------


def test_family_verdicts_are_statsmodels_bonferroni_and_a_nan_p_value_is_never_rejected():
    """The project corrects a declared family by Bonferroni (arms.declare_families: simultaneous t-intervals
    at 1 - alpha/m, the verdict read from the interval). There is no Holm step in it (a Holm implementation
    was removed unused): the oracle is statsmodels' multipletests(method="bonferroni"), whose rejections
    must be the members with a verdict of "A better" or "B better", from each member's t p-value (ours).
    A member whose standard error is undefined (NaN p-value) still counts in m and is never rejected; so
    is one planned but not made."""
    rng = np.random.default_rng(3)
    differences = rng.normal(0, 0.05, size=9)
    ses = rng.uniform(0.005, 0.03, size=9)
    dfs = rng.integers(2, 10, size=9).astype(float)
    ses[4] = math.nan  # one test patient: no standard error

    def member(i: int) -> dict:
        entry = {"difference": float(differences[i]), "se": float(ses[i]), "df": float(dfs[i]), "seed_variance": 0.0,
                 "test_set_covariance": float(ses[i]) ** 2}
        return {"comparison": f"c{i}", "epoch": "selected", "factor": "depth", "setting": {}, "status": "compared",
                "a": "A", "b": "B", "seeds": [0, 1, 2], "qwk": entry}

    comparisons = [member(i) for i in range(9)] + [{"comparison": "not made", "epoch": "selected", "factor": "depth",
                                                    "setting": {}, "status": "not compared: no run"}]
    [family] = declare_families(comparisons)
    assert family["m"] == 10
    p_values = [t_p_value(differences[i], ses[i], dfs[i]) for i in range(9)] + [math.nan]
    rejected, adjusted, _, bonferroni_alpha = multipletests(p_values, alpha=ALPHA, method="bonferroni")
    assert bonferroni_alpha == pytest.approx(ALPHA / 10)
    verdicts = [c["qwk"].get("verdict", "") for c in comparisons[:9]] + [""]
    ours = [v in ("A better", "B better") for v in verdicts]
    assert ours == rejected.tolist() and 0 < sum(ours) < 9  # some rejected, some not: the test can tell them apart
    assert not ours[4] and math.isnan(adjusted[4]) and verdicts[4].startswith("cannot be judged")
    for i in range(9):  # and the interval's side is the difference's sign
        if ours[i]:
            assert verdicts[i] == ("A better" if differences[i] > 0 else "B better")
    # the rejections are not a near thing on either side (the seeded draw keeps the test stable)
    finite = np.array([p for p in p_values if not math.isnan(p)])
    assert np.abs(finite * 10 - ALPHA).min() > 1e-4


# -- weighted AUC: scikit-learn ------------------------------------------------------------------------------


def test_weighted_auc_is_scikit_learns_with_sample_weights():
    """stats.weighted_auc (one AUC per row of weights, ties counting half) against scikit-learn's
    roc_auc_score(y, s, sample_weight=w), row by row: scores rounded so that many tie, weights the counts a
    bootstrap draws (zeros included); and the bootstrap's own path, UnitAuc from each patient's counts,
    against the same with each image weighted by its patient's count. metrics.roc_auc: unit weights."""
    rng = np.random.default_rng(5)
    n = 400
    positive = rng.random(n) < 0.3
    scores = np.round(rng.random(n) + 0.3 * positive, 1)  # 14 distinct values: ties across classes
    weights = rng.integers(0, 4, size=(6, n)).astype(float)
    expected = [roc_auc_score(positive, scores, sample_weight=w) for w in weights]
    assert weighted_auc(positive, scores, weights) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(positive, scores) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    units = rng.integers(0, 150, size=n)  # each image's patient
    units = np.unique(units, return_inverse=True)[1]
    counts = rng.multinomial(units.max() + 1, np.full(units.max() + 1, 1 / (units.max() + 1)), size=5).T
    resampled = UnitAuc(positive, scores, units)(counts.astype(float))
    assert resampled == pytest.approx([roc_auc_score(positive, scores, sample_weight=c[units]) for c in counts.T],
                                      abs=1e-12)


def test_weighted_auc_of_one_class_is_one_half_where_scikit_learn_raises():
    """Where a resample (or a test set) holds one class only, scikit-learn's AUC is undefined (NaN with an
    UndefinedMetricWarning in scikit-learn 1.9; a ValueError in older versions); ours is 0.5, chance, so that
    a bootstrap draw without positives does not stop the report or leave a hole in its interval."""
    positive = np.array([True, False, True, False])
    scores = np.array([0.9, 0.2, 0.6, 0.4])
    only_negatives = np.array([[0.0, 1.0, 0.0, 2.0]])  # the positives' weights are 0: one class left
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs = roc_auc_score(positive, scores, sample_weight=only_negatives[0])
        except ValueError:
            theirs = math.nan
    assert math.isnan(theirs)
    assert weighted_auc(positive, scores, only_negatives).tolist() == [0.5]
    assert roc_auc(np.zeros(3, dtype=bool), [0.1, 0.2, 0.3]) == 0.5


# -- McNemar: statsmodels, and Durkalski's clustered form from its formula ----------------------------------


@pytest.mark.parametrize("seed,n,p_a,p_b", [(0, 40, 0.6, 0.5), (1, 200, 0.7, 0.7), (2, 12, 0.5, 0.9),
                                            (3, 3000, 0.75, 0.72), (4, 5, 1.0, 1.0)])
def test_mcnemar_exact_is_statsmodels(seed, n, p_a, p_b):
    """stats.mcnemar without clustering (one image per patient) against statsmodels' mcnemar(table,
    exact=True): the two-sided binomial test on the discordant pairs; from a few to a thousand of them
    (ours sums in log space), and none at all (p = 1)."""
    rng = np.random.default_rng(seed)
    a, b = rng.random(n) < p_a, rng.random(n) < p_b
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    ours = mcnemar(a, b, units=np.arange(n))
    assert ours["test"] == "exact" and (ours["a_only_right"], ours["b_only_right"]) == (table[0][1], table[1][0])
    assert ours["p_value"] == pytest.approx(statsmodels_mcnemar(table, exact=True).pvalue, rel=1e-9, abs=1e-300)


def test_clustered_mcnemar_by_hand_and_as_mcnemars_chi_square_when_no_patient_has_two_discordant_eyes():
    """Durkalski et al. (2003) have no library oracle here. Their statistic, X2 = (sum_k d_k)^2 / sum_k d_k^2
    with d_k = (patient k's images only A got right - those only B got right) / its images (the form R's
    clust.bin.pair and htestClust implement too), computed by hand on four patients; and, where every
    patient has one image but a concordant pair (still clustered), it is McNemar's uncorrected chi-square,
    statsmodels' mcnemar(exact=False, correction=False)."""
    # patient 0: both eyes only A right (d = 1); 1: one eye only A, one both (d = 1/2); 2: one eye only B
    # (d = -1); 3: both eyes both wrong (d = 0). X2 = (1 + 1/2 - 1)^2 / (1 + 1/4 + 1) = 1/9.
    a = np.array([True, True, True, True, False, False, False])
    b = np.array([False, False, False, True, True, False, False])
    units = np.array([0, 0, 1, 1, 2, 3, 3])
    found = mcnemar(a, b, units)
    assert found["test"] == MCNEMAR_CLUSTERED and found["statistic"] == pytest.approx(1 / 9, abs=1e-15)
    assert found["p_value"] == pytest.approx(0.7388826803635273, abs=1e-12)  # P(chi-square(1) > 1/9)
    assert (found["a_only_right"], found["b_only_right"]) == (3, 1)

    rng = np.random.default_rng(9)
    a, b = rng.random(60) < 0.7, rng.random(60) < 0.5
    a[:2], b[:2] = True, True  # images 0 and 1: one patient, both eyes right by both
    units = np.r_[0, np.arange(59)]
    found = mcnemar(a, b, units)
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    reference = statsmodels_mcnemar(table, exact=False, correction=False)
    assert found["test"] == MCNEMAR_CLUSTERED
    assert found["statistic"] == pytest.approx(reference.statistic, rel=1e-12)
    assert found["p_value"] == pytest.approx(reference.pvalue, rel=1e-9)


# -- the patient split: scikit-learn's StratifiedGroupKFold, by properties -------------------------------------


def synthetic_table(seed: int, most_images: int) -> tuple[list[str], np.ndarray]:
    """Patients with 1..most_images images each, grades skewed as in screening data (most 0, few 4); a
    patient's further images differ from its first by up to one grade (eyes are not graded alike)."""
    rng = np.random.default_rng(seed)
    n_patients = int(rng.integers(150, 400))
    grades = rng.choice(NUM_GRADES, p=[0.6, 0.1, 0.15, 0.1, 0.05], size=n_patients)
    patient = np.repeat(np.arange(n_patients), rng.integers(1, most_images + 1, size=n_patients))
    first = np.r_[True, patient[1:] != patient[:-1]]
    labels = np.where(first, grades[patient], np.clip(grades[patient] + rng.integers(-1, 2, len(patient)), 0, 4))
    return [f"p{p}" for p in patient], labels


@pytest.mark.parametrize("seed,most_images", [(0, 2), (1, 2), (2, 4), (3, 4), (4, 4), (5, 3)])
def test_patient_split_keeps_patients_whole_and_grade_shares_as_close_as_scikit_learns(seed, most_images):
    """split.holdout_mask against StratifiedGroupKFold's first fold (n_splits = 1 / fraction), by
    properties, not equality (two heuristics): no patient on both sides; the held-out side's grade shares
    no further from the whole's than scikit-learn's but for one image's worth (both move whole patients, so
    neither is exact; before the swap search of split._refine, ours was up to six images' worth further on
    such tables); and its size no further from fraction x images than scikit-learn's but for one patient."""
    patients, labels = synthetic_table(seed, most_images)
    whole = np.bincount(labels, minlength=NUM_GRADES) / len(labels)

    def worst_share_gap(mask: np.ndarray) -> float:
        return float(np.abs(np.bincount(labels[mask], minlength=NUM_GRADES) / mask.sum() - whole).max())

    for n_splits in (4, 5, 10):
        ours = holdout_mask(patients, labels, 1 / n_splits, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only k members"
            _, held = next(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(
                labels, labels, groups=patients))
        theirs = np.zeros(len(labels), dtype=bool)
        theirs[held] = True
        names = np.array(patients)
        assert not set(names[ours]) & set(names[~ours])
        assert not set(names[theirs]) & set(names[~theirs])  # the oracle's own promise, as a check on the setup
        assert worst_share_gap(ours) <= worst_share_gap(theirs) + 1 / ours.sum(), n_splits
        target = len(labels) / n_splits
        assert abs(ours.sum() - target) <= abs(theirs.sum() - target) + most_images, n_splits


# -- learning-rate schedules: torch's own schedulers ----------------------------------------------------------


def torch_rates(make_scheduler, steps: int, lr: float = 0.1) -> np.ndarray:
    """The learning rate of each of `steps` optimiser steps under torch's scheduler."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler = make_scheduler(optimizer)
        rates = []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    return np.array(rates)


def our_rates(scheduler: str, warmup_steps: int, total_steps: int, lr: float = 0.1) -> np.ndarray:
    """The same from components.lr_lambda, through LambdaLR as training builds it (components.optimisation)."""
    return torch_rates(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(scheduler, warmup_steps, total_steps)),
                       total_steps, lr)


@pytest.mark.parametrize("warmup,total", [(5, 50), (1, 10), (3, 7), (10, 200), (0, 30)])
def test_cosine_schedule_is_torchs_linear_warmup_then_cosine_annealing(warmup, total):
    """train.scheduler=cosine: a linear warm-up from lr/warmup to lr over `warmup` steps, then cosine annealing
    to 0 over the rest: torch's SequentialLR of LinearLR and CosineAnnealingLR (CosineAnnealingLR alone
    without warm-up)."""
    if warmup:
        def reference(o):
            return torch.optim.lr_scheduler.SequentialLR(o, [
                torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total - warmup, eta_min=0.0)], milestones=[warmup])
    else:
        def reference(o):
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=0.0)
    assert our_rates("cosine", warmup, total) == pytest.approx(torch_rates(reference, total), abs=1e-12)


@pytest.mark.parametrize("warmup,total", [(0, 50), (0, 7), (12, 40), (0, 1000), (2, 20)])
def test_onecycle_schedule_is_torchs_onecycle_without_momentum_cycling(warmup, total):
    """train.scheduler=onecycle: torch's OneCycleLR (cosine annealing, div_factor 25, final_div_factor 1e4)
    with cycle_momentum=False, its rise over `warmup` steps (30% of the run when 0), over exactly its
    total_steps (OneCycleLR refuses a step beyond them). A rise of one step or of the whole run has no
    OneCycleLR (a phase of no length: it divides by zero), so those are not compared; ours starts at lr/25
    and stays within [lr/25/1e4, lr] there too (test_onecycle_rises_and_falls_within_its_bounds_at_the_edges)."""
    rise = warmup or round(0.3 * total)

    def reference(o):
        return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=total, pct_start=rise / total,
                                                   anneal_strategy="cos", cycle_momentum=False, div_factor=25.0,
                                                   final_div_factor=1e4)
    assert our_rates("onecycle", warmup, total) == pytest.approx(torch_rates(reference, total), abs=1e-12)


@pytest.mark.parametrize("warmup,total", [(1, 20), (20, 20)])
def test_onecycle_at_the_edges_that_torch_cannot_schedule(warmup, total):
    """Where OneCycleLR has no answer (a rise of one step, or of the whole run), ours starts at lr/25 and
    stays within [lr/25/1e4, lr]: a whole-run rise climbs to lr at its last step; a one-step rise falls
    from its second step on to lr/25/1e4 at the last."""
    rates = our_rates("onecycle", warmup, total)
    assert rates[0] == pytest.approx(0.1 / 25) and 0.1 / 25 / 1e4 - 1e-15 <= rates.min() <= rates.max() <= 0.1 + 1e-15
    if warmup == total:
        assert np.all(np.diff(rates) > 0) and rates[-1] == pytest.approx(0.1)
    else:
        assert np.all(np.diff(rates[1:]) < 0) and rates[-1] == pytest.approx(0.1 / 25 / 1e4)
