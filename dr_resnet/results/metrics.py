"""Grading metrics from a confusion matrix: accuracy, quadratic weighted kappa, per-class precision and
recall, macro-F1, the majority-class baseline. numpy only (no torch), so reports can use it anywhere.

Each reported metric is declared once, in METRICS: its name (the key of metrics.jsonl's test_<name>,
the summary, the intervals), its label, its format and one vectorised function over a stack of
confusion matrices (R, 5, 5) -> (R,), which the one-matrix functions below and the bootstrap in
stats.py (one matrix per resample) both call. The referable-DR AUC needs each image's score instead
(roc_auc here; stats.weighted_auc per resample).

Everything but the ROC AUC derives from the confusion matrix of counts (rows = true grade, columns =
predicted), which is also what distributed evaluation sums across ranks: exact, whatever the world size.
The referable-DR AUC needs each image's score; evaluation gathers those from every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dr_resnet import NUM_GRADES

REFERABLE_GRADE = 2  # moderate or worse: the screening question is "refer to an ophthalmologist?"


def confusion_matrix(targets: Sequence[int], predictions: Sequence[int], num_classes: int = NUM_GRADES) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    targets, predictions = np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    if targets.shape != predictions.shape:
        raise ValueError(f"{targets.shape[0]} targets but {predictions.shape[0]} predictions")
    for name, values in (("target", targets), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} outside 0..{num_classes - 1}: {values[(values < 0) | (values >= num_classes)][:5]}")
    return np.bincount(targets * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def row_normalised(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its total (recall on the diagonal); rows with no samples stay zero."""
    totals = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)


def _safe(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0."""
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


# -- the metrics of stacks of confusion matrices, (R, n, n) counts or weights -> (R,) ---------------------

def batch_accuracy(cm: np.ndarray) -> np.ndarray:
    return _safe(np.diagonal(cm, axis1=1, axis2=2).sum(axis=1), cm.sum(axis=(1, 2)))


def batch_qwk(cm: np.ndarray) -> np.ndarray:
    """Cohen's kappa with quadratic weights (the Kaggle DR metric): 1 perfect, 0 chance level. All
    samples and predictions in one class leave kappa undefined; sklearn answers 0 (nan for a perfect
    single-class match); 0 here keeps "best by QWK" comparisons well defined."""
    n = cm.shape[1]
    total, rows, cols = cm.sum(axis=(1, 2)), cm.sum(axis=2), cm.sum(axis=1)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    w = (i - j) ** 2 / (n - 1) ** 2
    expected = _safe(rows[:, :, None] * cols[:, None, :], total[:, None, None])
    denominator = (w * expected).sum(axis=(1, 2))
    return np.where(denominator > 0, 1 - _safe((w * cm).sum(axis=(1, 2)), denominator), 0.0)


def batch_macro_f1(cm: np.ndarray) -> np.ndarray:
    """Mean F1 over the classes present in targets or predictions (as scikit-learn's 'macro')."""
    diagonal, rows, cols = np.diagonal(cm, axis1=1, axis2=2), cm.sum(axis=2), cm.sum(axis=1)
    precision, recall = _safe(diagonal, cols), _safe(diagonal, rows)
    f1 = _safe(2 * precision * recall, precision + recall)
    present = (rows + cols) > 0
    return _safe((f1 * present).sum(axis=1), present.sum(axis=1))


def batch_referable_sensitivity(cm: np.ndarray) -> np.ndarray:
    k = REFERABLE_GRADE
    return _safe(cm[:, k:, k:].sum(axis=(1, 2)), cm[:, k:].sum(axis=(1, 2)))


def batch_referable_specificity(cm: np.ndarray) -> np.ndarray:
    k = REFERABLE_GRADE
    return _safe(cm[:, :k, :k].sum(axis=(1, 2)), cm[:, :k].sum(axis=(1, 2)))


@dataclass(frozen=True)
class Metric:
    name: str  # test_<name> in metrics.jsonl and the summary; the key of intervals and comparisons
    label: str  # what tables, figures and W&B panels call it
    fmt: str  # how a value is printed
    of_confusion: Callable[[np.ndarray], np.ndarray] | None  # (R, 5, 5) -> (R,); None: from per-image scores
    short: str = ""  # its key in an epoch row, after the split: test_<short>, val_<short> ('' = its name)
    headline: bool = False  # in the W&B run summary (selected/ and final/) besides the epoch rows
    about: str = ""  # what it measures, for the people who read it (docs/reference/metrics.md)
    bounds: tuple[float, float] = (0.0, 1.0)  # the lowest and highest value it can take
    higher_is_better: bool = True

    @property
    def column(self) -> str:
        return self.short or self.name

    def key(self, split: str) -> str:
        """Its key in metrics.jsonl's epoch rows and the summary: test_acc, val_qwk, ..."""
        return f"{split}_{self.column}"


_REFERABLE = f"grade >= {REFERABLE_GRADE}"
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", "accuracy", ".1%", batch_accuracy, short="acc", headline=True,
           about="the share of images graded right"),
    Metric("qwk", "QWK", ".3f", batch_qwk, headline=True, bounds=(-1.0, 1.0),
           about="Cohen's kappa with quadratic weights (the Kaggle DR metric): agreement with the true grades beyond "
                 "chance, each error charged by its squared grade distance; 1 perfect, 0 chance level"),
    Metric("macro_f1", "macro-F1", ".3f", batch_macro_f1,
           about="the mean F1 over the grades present in the true grades or the predictions (scikit-learn's 'macro')"),
    Metric("referable_sensitivity", "referable sensitivity", ".3f", batch_referable_sensitivity,
           about=f"the share of referable images ({_REFERABLE}: moderate or worse, refer to an ophthalmologist) "
                 f"predicted {_REFERABLE}"),
    Metric("referable_specificity", "referable specificity", ".3f", batch_referable_specificity,
           about=f"the share of non-referable images (grade < {REFERABLE_GRADE}) predicted grade < {REFERABLE_GRADE}"),
    Metric("referable_auc", "referable AUC", ".3f", None,  # roc_auc; stats.weighted_auc per resample
           about=f"the area under the ROC curve of {_REFERABLE} from each image's referable score: the chance that a "
                 "referable image scores above a non-referable one (ties count half)"),
)}


def epoch_entries(split: str, scores: dict, loss: float) -> dict:
    """One split's entries of an epoch row: its loss, every METRICS entry (Metric.key) and the recall per
    grade, from `scores` (summarize's, with the referable AUC)."""
    return {f"{split}_loss": loss, **{m.key(split): scores[m.name] for m in METRICS.values()},
            f"{split}_recall": scores["per_class_recall"]}


def of_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Every METRICS entry that a confusion matrix gives, per matrix of a stack (R, 5, 5)."""
    cm = cm.astype(np.float64)
    return {m.name: m.of_confusion(cm) for m in METRICS.values() if m.of_confusion is not None}


def _one(metric, cm: np.ndarray) -> float:
    return float(metric(np.asarray(cm, dtype=np.float64)[None])[0])


def accuracy(cm: np.ndarray) -> float:
    return _one(batch_accuracy, cm)


def quadratic_weighted_kappa(cm: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights of one confusion matrix (batch_qwk)."""
    return _one(batch_qwk, cm)


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    return np.diag(row_normalised(cm))


def per_class_precision(cm: np.ndarray) -> np.ndarray:
    totals = cm.sum(axis=0)
    return np.divide(np.diag(cm), totals, out=np.zeros(cm.shape[0]), where=totals > 0)


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes present in targets or predictions (as scikit-learn's 'macro')."""
    return _one(batch_macro_f1, cm)


def majority_baseline(cm: np.ndarray) -> float:
    """Accuracy of always predicting the most common true class."""
    total = cm.sum()
    return float(cm.sum(axis=1).max() / total) if total else 0.0


COLLAPSE_SHARE = 0.95  # a run predicting one grade for this share of the images or more has collapsed


def collapse(cm: np.ndarray) -> str:
    """Why an evaluation looks like a collapsed run ('' when it does not): one grade predicted for at
    least COLLAPSE_SHARE of the images, or an accuracy below the majority-class baseline, the failure a
    from-scratch run on EyePACS's 73% of grade 0 falls into."""
    total = cm.sum()
    if not total:
        return ""
    predicted = cm.sum(axis=0)
    top = int(predicted.argmax())
    reasons = []
    if predicted[top] >= COLLAPSE_SHARE * total:
        reasons.append(f"grade {top} predicted for {predicted[top] / total:.1%} of the images")
    if accuracy(cm) < majority_baseline(cm):
        reasons.append(f"accuracy {accuracy(cm):.1%} below the majority baseline {majority_baseline(cm):.1%}")
    return "; ".join(reasons)


def referable(cm: np.ndarray) -> dict:
    """Sensitivity and specificity of "grade >= REFERABLE_GRADE" read off the confusion matrix."""
    return {"referable_sensitivity": _one(batch_referable_sensitivity, cm),
            "referable_specificity": _one(batch_referable_specificity, cm)}


def roc_auc(positive: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative
    (ties count half), from average ranks (Mann-Whitney U). 0.5 when a class is missing."""
    positive, scores = np.asarray(positive, dtype=bool), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summarize(cm: np.ndarray) -> dict:
    """Every metric of a confusion matrix, as plain Python values (JSON-ready)."""
    return {
        "num_samples": int(cm.sum()),
        **{name: float(values[0]) for name, values in of_confusion(np.asarray(cm)[None]).items()},  # METRICS
        "per_class_recall": per_class_recall(cm).tolist(),
        "per_class_precision": per_class_precision(cm).tolist(),
        "majority_baseline": majority_baseline(cm),
        "confusion_matrix": cm.astype(int).tolist(),
    }


CALIBRATION_BINS = 15


def expected_calibration_error(probabilities: np.ndarray, targets: Sequence[int], bins: int = CALIBRATION_BINS) -> dict:
    """Top-label calibration of (N, 5) grade probabilities: images binned by their highest probability
    (equal-width bins); ECE = the bins' |accuracy - mean confidence| weighted by their share of images.
    Also each non-empty bin's confidence, accuracy and count (a reliability diagram's points).

    Bin edges: an image of confidence c is in bin min(floor(c * bins), bins - 1), c in float64: bin b holds
    [b/bins, (b+1)/bins), and the last bin is closed, so a confidence of exactly 1.0 shares it. This is
    torchmetrics' multiclass_calibration_error(n_bins=15, norm="l1") except where that differs by design:
    it gives c == 1.0 a 16th bin of its own, and compares float32 confidences with float32 edges, so a
    confidence within float32 rounding of an edge can land in the neighbouring bin (tests/test_oracles.py)."""
    probabilities, targets = np.asarray(probabilities, dtype=np.float64), np.asarray(targets)
    if len(targets) == 0:
        return {"ece": 0.0, "bins": []}
    if not np.isfinite(probabilities).all():  # a diverged model: no calibration to speak of
        return {"ece": float("nan"), "bins": []}
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == targets
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece, points = 0.0, []
    for b in range(bins):
        inside = which == b
        if inside.any():
            conf, acc = float(confidence[inside].mean()), float(right[inside].mean())
            ece += inside.mean() * abs(acc - conf)
            points.append({"confidence": conf, "accuracy": acc, "count": int(inside.sum())})
    return {"ece": float(ece), "bins": points}


def pooled_calibration(found: Sequence[dict], bins: int = CALIBRATION_BINS) -> dict:
    """expected_calibration_error of several runs' images taken together, from each run's own result (its
    bins' counts, mean confidences and accuracies: the same equal-width bins, so the sums are exact): what
    concatenating their predictions would give, without reading them again."""
    count, confidence, right = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for calibration in found:
        for point in calibration["bins"]:
            b = min(int(point["confidence"] * bins), bins - 1)
            count[b] += point["count"]
            confidence[b] += point["count"] * point["confidence"]
            right[b] += point["count"] * point["accuracy"]
    total = count.sum()
    if total == 0:
        return {"ece": float("nan"), "bins": []}
    kept = count > 0
    conf, acc = confidence[kept] / count[kept], right[kept] / count[kept]
    return {"ece": float(np.sum(count[kept] / total * np.abs(acc - conf))),
            "bins": [{"confidence": float(c), "accuracy": float(a), "count": int(n)}
                     for c, a, n in zip(conf, acc, count[kept])]}
