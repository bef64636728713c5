"""train.ema: an exponential moving average of the weights, evaluated and selected in place of the raw
weights, kept in the checkpoint beside them, resumed bit for bit, and what every reader of a checkpoint
(evaluate, predict, export, model.weights=PATH) loads."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dr_resnet.model.resnet import load_state_dict_file
from dr_resnet.training import checkpoint, train
from dr_resnet.training.train import main

from helpers import assert_same_training_state, demo_args, metrics_rows, preprocessed_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return preprocessed_dataset(tmp_path_factory.mktemp("ema"), 40, 13, seed=5, size=48)


def ema_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return demo_args(data, run_dir, "train.ema=0.9", "train.checkpoint_every_minutes=0", "data.val_fraction=0",
                     *extra, workers=0)


@pytest.mark.slow
def test_the_weight_average_is_evaluated_saved_and_resumed_bitwise(data, tmp_path, monkeypatch):
    straight, epoch_1 = tmp_path / "straight", tmp_path / "epoch1.pt"
    real = train.finish

    def finish(run, tracker):  # epoch 1's checkpoint, before the finished run drops its checkpoint_prev.pt
        shutil.copyfile(run.run_dir / "checkpoint_prev.pt", epoch_1)
        return real(run, tracker)
    monkeypatch.setattr(train, "finish", finish)
    assert main(ema_args(data, straight)) == 0
    monkeypatch.undo()
    state = checkpoint.TrainingState.load(straight / "checkpoint_last.pt")
    assert int(state.ema["n_averaged"]) == 2 * (40 // 8)  # updated after every step of both epochs
    average = state.weights()
    assert average.keys() == state.model.keys()
    assert any(not torch.equal(average[k], state.model[k]) for k in average if average[k].is_floating_point())
    assert load_state_dict_file(straight / "checkpoint_last.pt").keys() == average.keys()
    assert all(torch.equal(load_state_dict_file(straight / "checkpoint_last.pt")[k], average[k]) for k in average)

    # What was evaluated each epoch is the average: evaluate, which loads state.weights(), agrees to the bit.
    out = tmp_path / "eval"
    from dr_resnet.evaluate import main as evaluate

    assert evaluate(["--checkpoint", str(straight / "checkpoint_last.pt"), "--data-root", str(data), "--split", "test",
                     "--out", str(out), "--workers", "0", "--device", "cpu", "--resamples", "0"]) == 0
    scored = json.loads((out / "metrics.json").read_text())
    last = metrics_rows(straight)[-1]
    assert scored["loss"] == pytest.approx(last["test_loss"], abs=1e-6) and scored["qwk"] == last["test_qwk"]

    # Resumed from the end of epoch 1, the run ends as the straight one, average included.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.copyfile(epoch_1, resumed / "checkpoint_last.pt")
    (resumed / "checkpoint_best.pt").unlink()
    assert main(ema_args(data, resumed)) == 0
    assert "resumed" in (resumed / "train.log").read_text()
    assert_same_training_state(straight, resumed)
    again = checkpoint.TrainingState.load(resumed / "checkpoint_last.pt")
    assert again.ema.keys() == state.ema.keys()
    assert all(torch.equal(again.ema[k], state.ema[k]) for k in state.ema)
