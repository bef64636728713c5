"""train.ema: an exponential moving average of the weights, evaluated and selected in place of the raw
weights, kept in the checkpoint beside them, resumed bit for bit, and what every reader of a checkpoint
(evaluate, predict, export, model.weights=PATH) loads; checkpoints that torch's AveragedModel wrote
(train.ema's average before training.average) evaluate and resume too."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dr_resnet.model.resnet import load_state_dict_file
from dr_resnet.training import checkpoint, components, train
from dr_resnet.training.train import main

from helpers import assert_same_training_state, demo_args, metrics_rows, preprocessed_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return preprocessed_dataset(tmp_path_factory.mktemp("ema"), 40, 13, seed=5, size=48)


def ema_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return demo_args(data, run_dir, "train.ema=0.9", "train.checkpoint_every_minutes=0", "data.val_fraction=0",
                     *extra, workers=0)


def trained_keeping_epoch_one(args: list[str], run_dir: Path) -> Path:
    """Train a two-epoch run, keeping a copy of its checkpoint after epoch 1 (a finished run drops its
    checkpoint_prev.pt) beside the run folder; returns the run folder."""
    real = train.finish

    def finish(run, tracker):
        shutil.copyfile(run.run_dir / "checkpoint_prev.pt", epoch_one(run_dir))
        return real(run, tracker)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "finish", finish)
        assert main(args) == 0
    return run_dir


def epoch_one(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}-epoch1.pt"


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    return trained_keeping_epoch_one(ema_args(data, run_dir), run_dir)


def evaluated_test_metrics(path: Path, data: Path, out: Path) -> dict:
    from dr_resnet.evaluate import main as evaluate

    assert evaluate(["--checkpoint", str(path), "--data-root", str(data), "--split", "test", "--out", str(out),
                     "--workers", "0", "--device", "cpu", "--resamples", "0"]) == 0
    return json.loads((out / "metrics.json").read_text())


def resumed_from_epoch_one(run_dir: Path, to: Path) -> Path:
    """A copy of a two-epoch run as it was after its first epoch (trained_keeping_epoch_one's copy)."""
    shutil.copytree(run_dir, to)
    shutil.copyfile(epoch_one(run_dir), to / "checkpoint_last.pt")
    (to / "checkpoint_best.pt").unlink()
    return to


@pytest.mark.slow
def test_the_weight_average_is_evaluated_saved_and_resumed_bitwise(data, straight, tmp_path):
    state = checkpoint.TrainingState.load(straight / "checkpoint_last.pt")
    assert int(state.ema["n_averaged"]) == 2 * (40 // 8)  # updated after every step of both epochs
    average = state.weights()
    assert average.keys() == state.model.keys()
    assert any(not torch.equal(average[k], state.model[k]) for k in average if average[k].is_floating_point())
    # BatchNorm's count of batches is copied, not averaged (AveragedModel averaged it in floats and truncated it)
    assert all(torch.equal(average[k], state.model[k]) for k in average if not average[k].is_floating_point())
    assert load_state_dict_file(straight / "checkpoint_last.pt").keys() == average.keys()
    assert all(torch.equal(load_state_dict_file(straight / "checkpoint_last.pt")[k], average[k]) for k in average)

    # What was evaluated each epoch is the average: evaluate, which loads state.weights(), agrees to the bit.
    scored = evaluated_test_metrics(straight / "checkpoint_last.pt", data, tmp_path / "eval")
    last = metrics_rows(straight)[-1]
    assert scored["loss"] == pytest.approx(last["test_loss"], abs=1e-6) and scored["qwk"] == last["test_qwk"]

    # Resumed from the end of epoch 1, the run ends as the straight one, average included.
    resumed = resumed_from_epoch_one(straight, tmp_path / "resumed")
    assert main(ema_args(data, resumed)) == 0
    assert "resumed" in (resumed / "train.log").read_text()
    assert_same_training_state(straight, resumed)
    again = checkpoint.TrainingState.load(resumed / "checkpoint_last.pt")
    assert again.ema.keys() == state.ema.keys()
    assert all(torch.equal(again.ema[k], state.ema[k]) for k in state.ema)


class TrainEmaBefore(AveragedModel):
    """train.ema's average before training.average: torch's AveragedModel (its EMA update, buffers
    averaged too), under the name the training step now calls."""

    def update(self, network: torch.nn.Module) -> None:
        self.update_parameters(network)


def weight_average_before(network: torch.nn.Module, decay: float) -> TrainEmaBefore | None:
    return TrainEmaBefore(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay > 0 else None


@pytest.mark.slow
def test_a_checkpoint_averaged_model_wrote_evaluates_and_resumes(data, straight, tmp_path, monkeypatch):
    old = tmp_path / "old"
    with monkeypatch.context() as patch:  # the run as the version before trained it
        patch.setattr(components, "weight_average", weight_average_before)
        trained_keeping_epoch_one(ema_args(data, old), old)
    state = checkpoint.TrainingState.load(old / "checkpoint_last.pt")
    assert list(state.ema) == ["n_averaged", *(f"module.{k}" for k in state.model)]  # the layout readers know
    count = "bn1.num_batches_tracked"
    assert int(state.ema[f"module.{count}"]) < int(state.model[count]) == 10  # averaged and truncated, as it was

    # Its average is what it evaluated each epoch, and what evaluate loads.
    scored = evaluated_test_metrics(old / "checkpoint_last.pt", data, tmp_path / "eval")
    last = metrics_rows(old)[-1]
    assert scored["loss"] == pytest.approx(last["test_loss"], abs=1e-6) and scored["qwk"] == last["test_qwk"]

    # Resumed from its first epoch by this version: the same floating numbers, and the counts copied at the
    # first step, so it ends as a run that used training.average throughout, bit for bit.
    resumed = resumed_from_epoch_one(old, tmp_path / "resumed")
    assert main(ema_args(data, resumed)) == 0
    assert "resumed" in (resumed / "train.log").read_text()
    assert_same_training_state(straight, resumed)
