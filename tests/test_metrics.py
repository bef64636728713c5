import numpy as np
import pytest
from sklearn import metrics as skm

from dr_resnet.results.metrics import (
    accuracy,
    collapse,
    confusion_matrix,
    macro_f1,
    majority_baseline,
    per_class_precision,
    per_class_recall,
    quadratic_weighted_kappa,
    row_normalised,
    summarize,
)


def cases():
    rng = np.random.default_rng(0)
    for n in (1, 7, 50, 1000):
        t = rng.choice(5, size=n, p=[0.73, 0.07, 0.15, 0.03, 0.02])
        noisy = np.where(rng.random(n) < 0.6, t, rng.integers(0, 5, n))
        yield t, noisy
    t = rng.integers(0, 5, 40)
    yield t, t  # perfect
    yield t, np.zeros(40, dtype=int)  # the majority-class collapse
    yield np.array([0, 0, 1, 3]), np.array([0, 4, 1, 3])  # class 2 absent everywhere


@pytest.mark.parametrize("targets,predictions", list(cases()))
def test_against_scikit_learn(targets, predictions):
    cm = confusion_matrix(targets, predictions)
    labels = list(range(5))
    np.testing.assert_array_equal(cm, skm.confusion_matrix(targets, predictions, labels=labels))
    assert accuracy(cm) == pytest.approx(skm.accuracy_score(targets, predictions))
    expected_kappa = skm.cohen_kappa_score(targets, predictions, labels=labels, weights="quadratic")
    assert quadratic_weighted_kappa(cm) == pytest.approx(0.0 if np.isnan(expected_kappa) else expected_kappa)
    np.testing.assert_allclose(per_class_recall(cm), skm.recall_score(targets, predictions, labels=labels,
                                                                       average=None, zero_division=0))
    np.testing.assert_allclose(per_class_precision(cm), skm.precision_score(targets, predictions, labels=labels,
                                                                             average=None, zero_division=0))
    assert macro_f1(cm) == pytest.approx(skm.f1_score(targets, predictions, average="macro", zero_division=0))
    np.testing.assert_allclose(row_normalised(cm), np.nan_to_num(
        skm.confusion_matrix(targets, predictions, labels=labels, normalize="true")))


def test_majority_collapse_scores_baseline_accuracy_and_zero_kappa():
    targets = np.array([0] * 73 + [1] * 7 + [2] * 15 + [3] * 3 + [4] * 2)
    cm = confusion_matrix(targets, np.zeros(100, dtype=int))
    assert accuracy(cm) == majority_baseline(cm) == 0.73
    assert quadratic_weighted_kappa(cm) == 0.0
    assert per_class_recall(cm).tolist() == [1, 0, 0, 0, 0]
    assert collapse(cm) == "grade 0 predicted for 100.0% of the images"


def test_collapse_is_one_grade_for_95_percent_of_the_images_or_accuracy_below_the_majority():
    targets = np.array([0] * 73 + [1] * 7 + [2] * 15 + [3] * 3 + [4] * 2)
    right = targets.copy()
    assert collapse(confusion_matrix(targets, right)) == ""
    # 95 of 100 graded 0 (the rest right): collapsed, though accuracy is above the majority's 73%.
    mostly_zero = np.where(np.arange(100) < 95, 0, targets)
    assert collapse(confusion_matrix(targets, mostly_zero)) == "grade 0 predicted for 95.0% of the images"
    almost = np.where(np.arange(100) < 94, 0, targets)  # 94%: not collapsed
    assert collapse(confusion_matrix(targets, almost)) == ""
    # Spread over the grades but below the majority baseline (seed 2's selected epoch: 61.6% < 72.4%).
    wrong = np.where(np.arange(100) % 3 == 0, (targets + 2) % 5, targets)
    cm = confusion_matrix(targets, wrong)
    assert collapse(cm) == f"accuracy {accuracy(cm):.1%} below the majority baseline 73.0%"
    assert collapse(np.zeros((5, 5), dtype=int)) == ""


def test_summary_is_json_ready_and_rejects_bad_input():
    import json
    summary = summarize(confusion_matrix([0, 1, 2], [0, 1, 1]))
    assert json.loads(json.dumps(summary))["confusion_matrix"][2] == [0, 1, 0, 0, 0]
    assert summary["num_samples"] == 3
    with pytest.raises(ValueError, match="prediction outside 0..4"):
        confusion_matrix([0, 1], [0, 5])
    with pytest.raises(ValueError, match="2 targets but 3 predictions"):
        confusion_matrix([0, 1], [0, 1, 1])


@pytest.mark.parametrize("targets,predictions", list(cases()))
def test_referable_sensitivity_and_specificity(targets, predictions):
    cm = confusion_matrix(targets, predictions)
    from dr_resnet.results.metrics import referable
    values = referable(cm)
    truth, guess = np.asarray(targets) >= 2, np.asarray(predictions) >= 2
    if truth.any():
        assert values["referable_sensitivity"] == pytest.approx(skm.recall_score(truth, guess))
    if (~truth).any():
        assert values["referable_specificity"] == pytest.approx(skm.recall_score(~truth, ~guess))


def test_roc_auc_against_scikit_learn():
    from dr_resnet.results.metrics import roc_auc
    rng = np.random.default_rng(4)
    for n in (5, 40, 500):
        positive = rng.random(n) < 0.3
        positive[:2] = [True, False]
        scores = np.round(rng.random(n) + positive * 0.4, 1)  # rounding makes ties
        assert roc_auc(positive, scores) == pytest.approx(skm.roc_auc_score(positive, scores))
    assert roc_auc([True, True], [0.1, 0.2]) == 0.5


def test_a_metric_declared_once_reaches_the_epoch_rows_and_the_bootstrap(monkeypatch):
    """Adding a metric is its METRICS entry: the epoch row (test_<name>) and the intervals' batched
    computation pick it up with nothing else changed."""
    import numpy as np

    from dr_resnet.results import metrics
    from dr_resnet.results.stats import bootstrap_intervals

    def grade4_recall(cm):
        return cm[:, 4, 4] / np.maximum(cm[:, 4].sum(axis=1), 1)

    monkeypatch.setitem(metrics.METRICS, "grade4_recall", metrics.Metric("grade4_recall", "grade-4 recall", ".3f", grade4_recall))
    labels = np.array([0, 0, 1, 2, 3, 4, 4, 4, 4, 0])
    grades = np.array([0, 1, 1, 2, 3, 4, 4, 2, 0, 0])
    cm = metrics.confusion_matrix(labels, grades)
    row = metrics.epoch_entries("test", {**metrics.summarize(cm), "referable_auc": 0.5}, loss=0.25)
    assert row["test_grade4_recall"] == 0.5 and row["test_acc"] == 0.7 and row["test_loss"] == 0.25
    intervals = bootstrap_intervals(labels, grades, (grades >= 2).astype(float), [f"p{i}" for i in range(10)], resamples=200)
    found = intervals["grade4_recall"]
    assert found["value"] == 0.5 and found["low"] <= 0.5 <= found["high"] and found["low"] < found["high"]
