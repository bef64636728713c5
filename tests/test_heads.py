import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from dr_resnet.model.heads import ClassificationHead, OrdinalHead, RegressionHead, build_head, optimize_thresholds, qwk_at


def test_thresholds_cut_at_the_boundaries():
    head = RegressionHead()
    values = torch.tensor([-1.0, 0.49, 0.5, 1.2, 2.5, 3.49, 3.5, 9.0])
    assert head.predict(values).tolist() == [0, 0, 1, 1, 3, 3, 4, 4]


def test_optimised_thresholds_raise_qwk_and_never_lower_it():
    rng = np.random.default_rng(0)
    labels = rng.choice(5, size=600, p=[0.7, 0.08, 0.15, 0.04, 0.03])
    values = labels * 0.6 + rng.normal(0, 0.35, 600)  # a model that under-predicts: fixed cuts are off
    start = [0.5, 1.5, 2.5, 3.5]
    fitted = optimize_thresholds(values, labels, start)
    assert fitted == sorted(fitted)
    before, after = qwk_at(values, labels, start), qwk_at(values, labels, fitted)
    predicted = np.searchsorted(fitted, values, side="right")
    assert after == pytest.approx(cohen_kappa_score(labels, predicted, weights="quadratic"))
    assert after > before + 0.05
    assert qwk_at(values, labels, optimize_thresholds(values, labels, fitted)) >= after  # a re-fit never loses


def test_non_finite_outputs_keep_the_thresholds():
    head = RegressionHead()
    assert head.fit_thresholds(np.array([0.1, np.nan, 2.0]), np.array([0, 1, 2])) == [0.5, 1.5, 2.5, 3.5]


def test_losses_and_tta_aggregation():
    outputs, labels = torch.tensor([[0.5], [3.0]]), torch.tensor([1, 3])
    assert RegressionHead("mse").loss(outputs, labels).item() == pytest.approx((0.25 + 0.0) / 2)
    weighted = RegressionHead("mse", class_weight=torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0])).loss(outputs, labels)
    assert weighted.item() == pytest.approx((3 * 0.25 + 0.0) / 4)
    logits = torch.tensor([[2.0, 0, 0, 0, 0], [0, 0, 0, 0, 2.0]])
    probs = ClassificationHead().aggregate([logits, logits.flip(1)])
    assert torch.allclose(probs.sum(dim=1), torch.ones(2)) and torch.allclose(probs[0], probs[1])
    assert ClassificationHead().referable_score(probs).shape == (2,)


def test_ordinal_head_decodes_consistently():
    head = OrdinalHead()
    # Output 2 says "grade > 2" more strongly than output 1 says "grade > 1": the running minimum keeps
    # the cumulative probabilities non-increasing, so grade and class probabilities agree.
    logits = torch.tensor([[3.0, -1.0, 2.0, -4.0], [-3.0, -3.0, -3.0, -3.0], [5.0, 5.0, 5.0, 5.0], [4.0, 3.0, 0.5, -2.0]])
    cumulative = head.aggregate([logits])
    assert torch.all(cumulative[:, 1:] <= cumulative[:, :-1])
    assert head.predict_outputs(logits).tolist() == [1, 0, 4, 3]
    probabilities = OrdinalHead.class_probabilities(cumulative)
    assert torch.all(probabilities >= 0) and torch.allclose(probabilities.sum(dim=1), torch.ones(4))
    assert probabilities.argmax(dim=1).tolist() == [1, 0, 4, 3]
    assert torch.allclose(head.referable_score(cumulative), probabilities[:, 2:].sum(dim=1))
    assert OrdinalHead.targets(torch.tensor([0, 2, 4])).tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_ordinal_loss_is_the_sum_of_four_binary_cross_entropies():
    logits, labels = torch.tensor([[0.3, -0.2, 1.0, -2.0], [2.0, 1.5, 0.0, -1.0]]), torch.tensor([1, 3])
    p = logits.sigmoid()
    t = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])
    manual = -(t * p.log() + (1 - t) * (1 - p).log()).sum(dim=1)
    assert OrdinalHead().loss(logits, labels).item() == pytest.approx(manual.mean().item(), rel=1e-6)
    weighted = OrdinalHead(torch.tensor([1.0, 1.0, 1.0, 3.0, 1.0])).loss(logits, labels)
    assert weighted.item() == pytest.approx(((manual[0] + 3 * manual[1]) / 4).item(), rel=1e-6)
    # The output biases start at the log-odds of "grade > k" in the first epoch's grade shares.
    bias = OrdinalHead().start_bias(np.bincount([0, 0, 0, 0, 1, 2, 2, 4], minlength=5) / 8)
    assert torch.sigmoid(torch.tensor(bias)).tolist() == pytest.approx([0.5, 0.375, 0.125, 0.125])


@pytest.mark.parametrize("shares", [[0.2] * 5, [0.73, 0.07, 0.15, 0.03, 0.02]])
def test_every_head_starts_at_the_prior_of_its_first_epoch(shares):
    """A fresh output layer (zero weights: the bias alone) predicts the grade shares it is trained on first."""
    from dr_resnet.model.resnet import build_resnet

    shares = np.array(shares)
    for kind in ("classification", "regression", "ordinal"):
        head = build_head(kind)
        model = build_resnet(18, head.outputs, head_bias=head.start_bias(shares)).eval()
        torch.nn.init.zeros_(model.fc.weight)
        with torch.no_grad():
            values = head.values(head.aggregate([model(torch.randn(2, 3, 32, 32))]))
        if kind == "regression":  # the mean grade
            assert values.tolist() == pytest.approx([float(np.dot(np.arange(5), shares))] * 2, abs=1e-6)
        else:  # the grade probabilities themselves
            assert values[0].tolist() == pytest.approx(shares.tolist(), abs=1e-6) and torch.equal(values[0], values[1])


def test_every_head_the_config_accepts_is_built_from_its_settings():
    from dr_resnet import config, registry
    from dr_resnet.model.heads import HEAD_TYPES, head_for

    assert tuple(HEAD_TYPES) == registry.HEADS == config.CHOICES["model.head"]
    for kind in registry.HEADS:
        head = head_for(config.load(None, [f"model.head={kind}"]))
        assert isinstance(head, HEAD_TYPES[kind]) and head.outputs == {"classification": 5, "regression": 1, "ordinal": 4}[kind]
    regression = head_for(config.load(None, ["model.head=regression", "regression.loss=smooth_l1",
                                             "regression.fit_thresholds=none"]))
    assert (regression.loss_name, regression.fit_on) == ("smooth_l1", None)
    outputs, labels = torch.tensor([[0.0], [3.0]]), torch.tensor([2, 3])
    assert regression.loss(outputs, labels).item() == pytest.approx((1.5 + 0.0) / 2)  # smooth-L1 of (2, 0)


def test_evaluation_builds_its_parts_without_the_training_module():
    import subprocess
    import sys

    code = "import sys, dr_resnet.evaluate; print(sorted(m for m in sys.modules if m.startswith('dr_resnet.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "dr_resnet.training.components" in loaded and "dr_resnet.training.train'" not in loaded


def test_expected_calibration_error_by_hand():
    from dr_resnet.results.metrics import expected_calibration_error

    p = np.array([[0.95, 0.05, 0, 0, 0], [0.92, 0.08, 0, 0, 0], [0.1, 0.55, 0.35, 0, 0], [0.2, 0.2, 0.6, 0, 0]])
    labels = np.array([0, 1, 1, 1])
    result = expected_calibration_error(p, labels, bins=10)
    # bins: [0.9, 1.0): confidence 0.935, accuracy 0.5; [0.5, 0.6): 0.55, 1.0; [0.6, 0.7): 0.6, 0.0
    expected = 0.5 * abs(0.5 - 0.935) + 0.25 * abs(1 - 0.55) + 0.25 * abs(0 - 0.6)
    assert result["ece"] == pytest.approx(expected)
    assert [b["count"] for b in result["bins"]] == [1, 1, 2]


@pytest.mark.parametrize("kind", ["classification", "ordinal"])
def test_temperature_fit_recovers_a_known_temperature(kind):
    """Outcomes drawn from the probabilities at temperature 2.5 of given logits: fitting on them finds
    2.5, and the fitted probabilities are better calibrated than the raw ones."""
    rng = np.random.default_rng(0)
    n, true_t = 20_000, 2.5
    head = build_head(kind)
    head.fit_on = "val"
    logits = rng.normal(0, 4, size=(n, head.outputs))
    if kind == "ordinal":
        logits = np.sort(logits, axis=1)[:, ::-1] + np.linspace(1, -1, 4)  # ordered, as a trained ordinal head's
    probabilities = head.probabilities_at(logits, true_t)
    labels = np.array([rng.choice(5, p=p / p.sum()) for p in probabilities])
    aggregated = head.aggregate([torch.tensor(logits, dtype=torch.float32)]).numpy()  # what evaluation hands over
    logged = head.end_of_epoch(aggregated, labels)
    assert head.temperature == pytest.approx(true_t, rel=0.05) and logged["temperature"] == head.temperature
    assert logged["val_ece_after"] < logged["val_ece_before"] and logged["val_ece_after"] < 0.02
    # The temperature travels in the state and changes the probabilities, never the grades.
    again = build_head(kind)
    again.load_state(head.state())
    scaled = again.aggregate([torch.tensor(logits, dtype=torch.float32)])
    fresh = build_head(kind)
    assert torch.equal(again.predict(scaled), fresh.predict(fresh.aggregate([torch.tensor(logits, dtype=torch.float32)])))
    assert np.allclose(again.values(scaled).numpy(), head.probabilities_at(logits, head.temperature), atol=1e-5)


def test_calibration_of_non_finite_probabilities_is_not_a_number():
    from dr_resnet.results.metrics import expected_calibration_error

    result = expected_calibration_error(np.full((3, 5), np.nan), [0, 1, 2])
    assert np.isnan(result["ece"]) and result["bins"] == []
