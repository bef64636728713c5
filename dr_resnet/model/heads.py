"""What the network's output means: five class scores (classification), one number on the grade
scale cut by thresholds (regression, as in the 2015 Kaggle winners' solutions), or four "grade > k"
scores (ordinal). The loops in training/loop.py ask the head for the loss, the predicted grades and the
referable-DR score, whatever the head.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dr_resnet import NUM_GRADES
from dr_resnet.config import Config
from dr_resnet.registry import HEAD_SPECS, HeadSpec
from dr_resnet.results.metrics import REFERABLE_GRADE, confusion_matrix, expected_calibration_error, quadratic_weighted_kappa

INITIAL_THRESHOLDS = (0.5, 1.5, 2.5, 3.5)
log = logging.getLogger(__name__)


class Head(Protocol):
    """What every head is to the rest of the code: the loops, the model builder, evaluation, grading and
    the checkpoint ask it, never its kind. `aggregated` is the head's own form of the (TTA-averaged)
    outputs; `values` what a prediction reports (registry.HeadSpec.value_columns)."""

    spec: HeadSpec  # what the outputs mean, torch-free (registry.HEAD_SPECS)
    outputs: int  # the output layer's width
    fit_on: str | None  # the outputs end_of_epoch wants (FIT_SOURCES); None: nothing to fit

    def start_bias(self, shares: np.ndarray) -> float | list[float]: ...
    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor: ...
    def aggregate(self, views: Sequence[Tensor]) -> Tensor: ...
    def predict(self, aggregated: Tensor) -> Tensor: ...
    def predict_outputs(self, outputs: Tensor) -> Tensor: ...
    def eval_loss_sum(self, aggregated: Tensor, labels: Tensor) -> Tensor: ...
    def referable_score(self, aggregated: Tensor) -> Tensor: ...
    def values(self, aggregated: Tensor) -> Tensor: ...
    def aggregated_of(self, values: Tensor) -> Tensor: ...
    def state(self) -> dict: ...
    def load_state(self, state: dict) -> None: ...
    def end_of_epoch(self, values: np.ndarray, labels: np.ndarray) -> dict: ...


class TemperatureScaled:
    """A probability head whose logits are divided by a temperature before the probabilities (1: as
    trained). With train.calibration=temperature it is fitted after each epoch on the held-out split
    (fit_on="val") by minimising the negative log-likelihood, and travels in the checkpoint. Grades do
    not change (a temperature keeps every logit's sign and order); probabilities and referable scores do."""

    temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg: Config, class_weight: Tensor | None, device: torch.device):
        return cls(class_weight, calibrate=cfg.train.calibration == "temperature")

    def _calibrating(self, calibrate: bool) -> None:
        self.temperature = 1.0
        self.fit_on = "val" if calibrate else None  # the outputs end_of_epoch wants (see FIT_SOURCES)

    def state(self) -> dict:
        return {"temperature": self.temperature} if self.fit_on or self.temperature != 1.0 else {}

    def load_state(self, state: dict) -> None:
        self.temperature = float(state.get("temperature", 1.0))

    def end_of_epoch(self, values: np.ndarray, labels: np.ndarray) -> dict:
        """Fit the temperature on these (aggregated) held-out outputs; the ECE before and after."""
        if self.fit_on is None:
            return {}
        logits = self.logits_of(np.asarray(values, dtype=np.float64)) * self.temperature  # back to the raw logits
        if not np.isfinite(logits).all():
            log.warning("held-out outputs are not finite: the temperature stays %.3f", self.temperature)
            return {"temperature": self.temperature}
        before = expected_calibration_error(self.probabilities_at(logits, 1.0), labels)["ece"]
        self.temperature = fit_temperature(lambda t: self.nll_at(logits, labels, t))
        after = expected_calibration_error(self.probabilities_at(logits, self.temperature), labels)["ece"]
        return {"temperature": self.temperature, "val_ece_before": before, "val_ece_after": after}


def fit_temperature(nll, low: float = 0.05, high: float = 20.0, steps: int = 60) -> float:
    """The temperature minimising nll(t), by golden-section search on log t in [low, high]."""
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(np.exp(c)), nll(np.exp(d))
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(np.exp(d))
    return float(np.exp((a + b) / 2))


class ClassificationHead(TemperatureScaled):
    """Cross-entropy over five grades; TTA averages the softmax probabilities (of the logits divided by
    the temperature: see TemperatureScaled)."""

    spec = HEAD_SPECS["classification"]
    outputs = spec.outputs

    def __init__(self, class_weight: Tensor | None = None, calibrate: bool = False) -> None:
        self.criterion = nn.CrossEntropyLoss(weight=class_weight)
        self._calibrating(calibrate)

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return self.criterion(outputs.float(), labels)

    def aggregate(self, views: Sequence[Tensor]) -> Tensor:
        return torch.stack([(v.float() / self.temperature).softmax(dim=1) for v in views]).mean(dim=0)

    def predict(self, aggregated: Tensor) -> Tensor:
        return aggregated.argmax(dim=1)

    @staticmethod
    def logits_of(probabilities: np.ndarray) -> np.ndarray:
        """Logits (up to a constant per image) of softmax probabilities divided by the temperature."""
        return np.log(np.clip(probabilities, 1e-12, 1))

    @staticmethod
    def probabilities_at(logits: np.ndarray, temperature: float) -> np.ndarray:
        z = logits / temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    @staticmethod
    def nll_at(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
        p = ClassificationHead.probabilities_at(logits, temperature)
        return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1))))

    def predict_outputs(self, outputs: Tensor) -> Tensor:
        return outputs.argmax(dim=1)

    def eval_loss_sum(self, aggregated: Tensor, labels: Tensor) -> Tensor:
        """Plain (unweighted) cross-entropy of the aggregated probabilities."""
        return nn.functional.nll_loss(aggregated.clamp_min(1e-12).log(), labels, reduction="sum")

    def referable_score(self, aggregated: Tensor) -> Tensor:
        return aggregated[:, REFERABLE_GRADE:].sum(dim=1)

    def values(self, aggregated: Tensor) -> Tensor:
        """What a prediction reports: P(grade = k), (N, 5)."""
        return aggregated

    def aggregated_of(self, values: Tensor) -> Tensor:
        return values

    def start_bias(self, shares: np.ndarray) -> list[float]:
        """Each grade's output starts at the log of its share of what the run trains on first: the
        untrained network then predicts that prior, instead of a uniform guess that the first steps
        must first unlearn (a zero bias costs ~0.8 nats more on the natural EyePACS balance)."""
        return np.log(np.clip(np.asarray(shares, dtype=np.float64), 1e-3, 1)).tolist()


class RegressionHead:
    """One output regressed on the grade (MSE or smooth-L1); grades are the output cut at thresholds,
    which start at 0.5, 1.5, 2.5, 3.5 and can be re-fitted for QWK after each epoch."""

    spec = HEAD_SPECS["regression"]
    outputs = spec.outputs

    @classmethod
    def from_config(cls, cfg: Config, class_weight: Tensor | None, device: torch.device) -> "RegressionHead":
        """With the config's regression section: its loss, and where the thresholds are fitted."""
        r = cfg.regression
        return cls(r.loss, class_weight, None if r.fit_thresholds == "none" else r.fit_thresholds, device=device)

    def __init__(self, loss: str = "mse", class_weight: Tensor | None = None, fit_on: str | None = "train",
                 thresholds: Sequence[float] = INITIAL_THRESHOLDS, device: torch.device | str = "cpu") -> None:
        if loss not in ("mse", "smooth_l1"):
            raise ValueError(f"regression loss must be mse or smooth_l1, got {loss!r}")
        if fit_on not in FIT_SOURCES:
            raise ValueError(f"thresholds are fitted on one of {', '.join(map(str, FIT_SOURCES))}, got {fit_on!r}")
        # fit_on: which outputs end_of_epoch wants (regression.fit_thresholds): an eval-mode pass over the
        # training images, the held-out images, the epoch's own training batches, or none (None).
        self.loss_name, self.class_weight, self.fit_on = loss, class_weight, fit_on
        self.thresholds = thresholds  # host numbers: no device to keep (see the property)

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        values, targets = outputs.float().squeeze(1), labels.float()
        if self.loss_name == "mse":
            per_sample = (values - targets) ** 2
        else:
            per_sample = nn.functional.smooth_l1_loss(values, targets, reduction="none")
        return weighted_mean(per_sample, labels, self.class_weight)

    def aggregate(self, views: Sequence[Tensor]) -> Tensor:
        return torch.stack([v.float().squeeze(1) for v in views]).mean(dim=0)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The cut points, float32 values held as Python numbers: compared with an output as scalars, so the
        training step copies nothing to the device and an exported graph holds no device (a tensor of them
        would be traced with the device of the export, and a TorchScript made on the CPU fail on a GPU)."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, values: Sequence[float]) -> None:
        self._thresholds = tuple(float(x) for x in np.asarray(values, dtype=np.float32))

    def predict(self, aggregated: Tensor) -> Tensor:
        """The number of thresholds at or below each output (torch.bucketize(right=True), in operations
        that ONNX and TorchScript export)."""
        return torch.stack([aggregated >= cut for cut in self.thresholds], dim=1).sum(dim=1)

    def predict_outputs(self, outputs: Tensor) -> Tensor:
        return self.predict(outputs.float().squeeze(1))

    def eval_loss_sum(self, aggregated: Tensor, labels: Tensor) -> Tensor:
        return ((aggregated - labels.float()) ** 2).sum()

    def referable_score(self, aggregated: Tensor) -> Tensor:
        return aggregated  # monotone in the predicted grade: what a ROC curve needs

    def values(self, aggregated: Tensor) -> Tensor:
        """What a prediction reports: the continuous score on the grade scale, (N,)."""
        return aggregated

    def aggregated_of(self, values: Tensor) -> Tensor:
        return values

    def start_bias(self, shares: np.ndarray) -> float:
        """A fresh output starts at the mean grade of what the run trains on first, not 0: by principle ("init
        well", as the classification head starts at its log-prior), not on a measured figure."""
        return float(np.dot(np.arange(NUM_GRADES), shares))

    def state(self) -> dict:
        return {"thresholds": list(self.thresholds)}

    def load_state(self, state: dict) -> None:
        if "thresholds" in state:
            self.thresholds = state["thresholds"]

    def end_of_epoch(self, values: np.ndarray, labels: np.ndarray) -> dict:
        """Re-fit the thresholds on the outputs fit_on names; what to log for the epoch."""
        thresholds = self.fit_thresholds(values, labels)
        return {"thresholds": thresholds, "thresholds_fit_qwk": qwk_at(values, labels, thresholds)}

    def fit_thresholds(self, values: np.ndarray, labels: np.ndarray) -> list[float]:
        """Re-fit for QWK on these outputs; non-finite outputs (a diverging run) keep the thresholds."""
        if np.isfinite(values).all() and len(values):
            self.thresholds = optimize_thresholds(values, labels, list(self.thresholds))
        else:
            log.warning("regression outputs are not finite (training diverged? lower train.lr): thresholds kept")
        return list(self.thresholds)


class OrdinalHead(TemperatureScaled):
    """Cumulative-link outputs (as in CORAL / CORN): output k scores "grade > k" for k = 0..3, each a
    binary cross-entropy against the ordered targets. Decoding is consistent: the cumulative
    probabilities are made non-increasing (a running minimum), so the predicted grade, the number of
    them above 0.5, always agrees with the class probabilities P(grade = k) = P(> k-1) - P(> k) they
    imply. Aggregated outputs are those cumulative probabilities; TTA averages them."""

    spec = HEAD_SPECS["ordinal"]
    outputs = spec.outputs

    def __init__(self, class_weight: Tensor | None = None, calibrate: bool = False) -> None:
        self.class_weight = class_weight
        self._calibrating(calibrate)

    @staticmethod
    def targets(labels: Tensor) -> Tensor:
        """(N,) grades -> (N, 4) floats: [grade > 0, grade > 1, grade > 2, grade > 3]."""
        ranks = torch.arange(NUM_GRADES - 1, device=labels.device)
        return (labels.unsqueeze(1) > ranks).float()

    @staticmethod
    def cumulative(outputs: Tensor) -> Tensor:
        """Logits -> non-increasing P(grade > k): the running minimum over k (written as minima of
        prefixes, equal to torch.cummin, because ONNX has no cummin)."""
        p = outputs.float().sigmoid()
        return torch.stack([p[:, :k + 1].amin(dim=1) for k in range(p.shape[1])], dim=1)

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        per_sample = nn.functional.binary_cross_entropy_with_logits(outputs.float(), self.targets(labels),
                                                                    reduction="none").sum(dim=1)
        return weighted_mean(per_sample, labels, self.class_weight)

    def aggregate(self, views: Sequence[Tensor]) -> Tensor:
        return torch.stack([self.cumulative(v.float() / self.temperature) for v in views]).mean(dim=0)

    def predict(self, aggregated: Tensor) -> Tensor:
        return (aggregated > 0.5).sum(dim=1)

    @staticmethod
    def logits_of(cumulative: np.ndarray) -> np.ndarray:
        """The logits of cumulative probabilities (divided by the temperature)."""
        c = np.clip(cumulative, 1e-7, 1 - 1e-7)
        return np.log(c / (1 - c))

    @staticmethod
    def probabilities_at(logits: np.ndarray, temperature: float) -> np.ndarray:
        """P(grade = k), (N, 5), at this temperature (cumulative made non-increasing, as in decoding)."""
        c = np.minimum.accumulate(1 / (1 + np.exp(-logits / temperature)), axis=1)
        above = np.concatenate([np.ones((len(c), 1)), c, np.zeros((len(c), 1))], axis=1)
        return above[:, :-1] - above[:, 1:]

    @staticmethod
    def nll_at(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
        c = np.clip(1 / (1 + np.exp(-logits / temperature)), 1e-12, 1 - 1e-12)
        targets = np.asarray(labels)[:, None] > np.arange(NUM_GRADES - 1)
        return float(-np.mean(np.sum(np.where(targets, np.log(c), np.log(1 - c)), axis=1)))

    def predict_outputs(self, outputs: Tensor) -> Tensor:
        return self.predict(self.cumulative(outputs))

    @staticmethod
    def class_probabilities(aggregated: Tensor) -> Tensor:
        """(N, 4) cumulative -> (N, 5) P(grade = k), non-negative and summing to 1."""
        ones = torch.ones_like(aggregated[:, :1])  # not new_ones(len(...)): a traced batch size stays dynamic
        above = torch.cat([ones, aggregated, ones - 1], dim=1)
        return above[:, :-1] - above[:, 1:]

    def values(self, aggregated: Tensor) -> Tensor:
        """What a prediction reports: P(grade = k), (N, 5), implied by the cumulative probabilities."""
        return self.class_probabilities(aggregated)

    @staticmethod
    def aggregated_of(values: Tensor) -> Tensor:
        """(N, 5) P(grade = k) -> (N, 4) P(grade > k): the inverse of values (to rounding)."""
        return values.flip(1).cumsum(dim=1).flip(1)[:, 1:]

    def eval_loss_sum(self, aggregated: Tensor, labels: Tensor) -> Tensor:
        """The binary cross-entropies of the (aggregated) cumulative probabilities, summed."""
        p = aggregated.clamp(1e-12, 1 - 1e-12)
        return nn.functional.binary_cross_entropy(p, self.targets(labels).to(p.dtype), reduction="sum")

    def referable_score(self, aggregated: Tensor) -> Tensor:
        return aggregated[:, REFERABLE_GRADE - 1]  # P(grade > 1) = P(grade >= 2)

    def start_bias(self, shares: np.ndarray) -> list[float]:
        """Each output starts at the log-odds of "grade > k" in what the run trains on first (a calibrated prior)."""
        above = np.clip(np.cumsum(np.asarray(shares, dtype=np.float64)[::-1])[::-1][1:], 1e-3, 1 - 1e-3)
        return np.log(above / (1 - above)).tolist()


def qwk_at(values: np.ndarray, labels: np.ndarray, thresholds: Sequence[float]) -> float:
    predictions = np.searchsorted(np.asarray(thresholds), values, side="right")
    return quadratic_weighted_kappa(confusion_matrix(labels, predictions))


def optimize_thresholds(values: np.ndarray, labels: np.ndarray, start: Sequence[float] = INITIAL_THRESHOLDS,
                        passes: int = 3, steps: int = 41) -> list[float]:
    """Coordinate ascent on QWK: each threshold in turn moves to the best of `steps` points between its
    neighbours (kept in order), for `passes` rounds. Deterministic; never worse than `start`."""
    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels)
    best = list(map(float, start))
    best_score = qwk_at(values, labels, best)
    for _ in range(passes):
        for i in range(len(best)):
            low = best[i - 1] if i > 0 else min(values.min(), best[0]) - 0.5
            high = best[i + 1] if i + 1 < len(best) else max(values.max(), best[-1]) + 0.5
            for candidate in np.linspace(low, high, steps)[1:-1]:
                trial = best[:i] + [float(candidate)] + best[i + 1:]
                score = qwk_at(values, labels, trial)
                if score > best_score + 1e-12:
                    best, best_score = trial, score
    return best


FIT_SOURCES = ("train", "val", "batches", None)  # the outputs a head's end_of_epoch can ask for (fit_on)


HEAD_TYPES = {"classification": ClassificationHead, "regression": RegressionHead, "ordinal": OrdinalHead}
# registry.HEADS names them for the config (torch-free); a new head is a class here and a name there.


def weighted_mean(per_sample: Tensor, labels: Tensor, class_weight: Tensor | None) -> Tensor:
    """The batch's loss from per-image losses: their mean, or with per-grade weights (train.class_weights)
    the weighted mean (each image counts its grade's weight), as CrossEntropyLoss(weight=...) reduces."""
    if class_weight is None:
        return per_sample.mean()
    weights = class_weight[labels]
    return (per_sample * weights).sum() / weights.sum()


def head_for(cfg: Config, class_weight: Tensor | None = None, device: torch.device | str = "cpu") -> Head:
    """The head cfg.model.head names, with its settings from cfg (the regression section for regression);
    class_weight: per-grade loss weights (train.class_weights); device: where the training step runs.

    Every head has: outputs (the output layer's width), start_bias(grade shares), loss, aggregate (TTA views),
    predict / predict_outputs (grades), eval_loss_sum, referable_score, values / aggregated_of (what a
    prediction reports: grade probabilities, or the regression score), state / load_state (for the
    checkpoint), fit_on and end_of_epoch(values, labels) (what it wants to see after each epoch, and
    what it logs)."""
    kind = cfg.model.head
    if kind not in HEAD_TYPES:
        raise ValueError(f"model.head must be one of {', '.join(HEAD_TYPES)}, got {kind!r}")
    return HEAD_TYPES[kind].from_config(cfg, class_weight, torch.device(device))


def build_head(kind: str, class_weight: Tensor | None = None, device: torch.device | str = "cpu") -> Head:
    """The head `kind` with its default settings (head_for with a default config)."""
    cfg = Config()
    cfg.model.head = kind
    return head_for(cfg, class_weight, device)
