"""The run folder's files agree with each other after a kill at any moment: predictions.csv is always the
selected epoch's, the one checkpoint_best.pt holds, or the report refuses it in one line; a resume
completes the pair. Each kill stops the real training loop in process at one point of an epoch's
writes (a BaseException, which nothing in the loop catches, as nothing survives a SIGKILL)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dr_resnet.results.predictions import read_predictions
from dr_resnet.results.report import report
from dr_resnet.training import checkpoint, train

from helpers import demo_args, preprocessed_dataset


class Killed(BaseException):
    """The process dies here."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return preprocessed_dataset(tmp_path_factory.mktemp("killdata"), 40, 13, seed=5, size=48)


def args(data, run_dir):
    # Nothing held out (40 images): the final epoch is selected, so every epoch writes a new pair.
    return demo_args(data, run_dir, "train.epochs=2", workers=0)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    assert train.main(args(data, run_dir)) == 0
    return run_dir


def die_on_second_call(monkeypatch, owner, name):
    real, calls = getattr(owner, name), []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise Killed(name)
        return real(*a, **k)
    monkeypatch.setattr(owner, name, dying)


def die_writing_last_checkpoint_of_epoch_2(monkeypatch):
    real = checkpoint.TrainingState.save

    def dying(self, path, *a, **k):
        if path.name == "checkpoint_last.pt" and self.epoch == 2:
            raise Killed("between checkpoint_best.pt and checkpoint_last.pt")
        return real(self, path, *a, **k)
    monkeypatch.setattr(checkpoint.TrainingState, "save", dying)


KILLS = {
    "before the checkpoints": lambda mp: die_on_second_call(mp, train, "save_checkpoint"),
    "between the best and the last checkpoint": die_writing_last_checkpoint_of_epoch_2,
    "after the checkpoints, before the rename": lambda mp: die_on_second_call(mp, train, "commit_pending"),
}


@pytest.mark.parametrize("where", KILLS)
def test_a_kill_while_writing_an_epoch_leaves_files_the_report_refuses_and_a_resume_completes(
        where, data, uninterrupted, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        KILLS[where](patch)
        with pytest.raises(Killed):
            train.main(args(data, run_dir))
    assert read_predictions(run_dir / "predictions.csv").epoch == 1  # the old file, whole
    assert (run_dir / "predictions.csv.pending").is_file()
    capsys.readouterr()
    report(run_dir, tmp_path / "report")
    line = capsys.readouterr().err
    assert "run: predictions not used: stopped while writing a newly selected epoch's files" in line
    with open(tmp_path / "report" / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert "predictions not used" in row["status"] and row["selected_qwk_95ci"] == ""

    assert train.main(args(data, run_dir)) == 0  # the same command resumes and completes the pair
    assert not list(run_dir.glob("*.pending"))
    found, whole = read_predictions(run_dir / "predictions.csv"), read_predictions(uninterrupted / "predictions.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert found.epoch == summary["selected"]["epoch"] == summary["checkpoint_best_epoch"] == 2
    assert checkpoint.load(run_dir / "checkpoint_best.pt")["epoch"] == 2
    assert np.array_equal(found.values, whole.values) and found.names == whole.names  # as if never killed


def test_the_report_refuses_predictions_of_another_epoch_than_the_selected_one(uninterrupted, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    rows = (run_dir / "predictions.csv").read_text().splitlines()
    header = rows[0].split(",")
    at = header.index("epoch")
    stale = [rows[0]] + [",".join(c if i != at else "1" for i, c in enumerate(r.split(","))) for r in rows[1:]]
    (run_dir / "predictions.csv").write_text("\n".join(stale) + "\n")
    report(run_dir, tmp_path / "report")
    assert ("predictions.csv holds epoch 1's predictions but the run selects epoch 2 (metrics.jsonl): not used"
            in capsys.readouterr().err)


def test_held_out_rows_are_scored_at_the_temperature_fitted_that_epoch(data, tmp_path):
    """With train.calibration=temperature the held-out loss in metrics.jsonl and predictions_val.csv are
    both at the temperature fitted at the end of that very epoch (not the previous epoch's)."""
    run_dir = tmp_path / "run"
    assert train.main(demo_args(data, run_dir, "train.epochs=2", "train.calibration=temperature",
                                "data.val_fraction=0.25", "data.min_val_images=1", workers=0)) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    chosen = next(r for r in rows if r["epoch"] == summary["selected"]["epoch"])
    val = read_predictions(run_dir / "predictions_val.csv")
    assert val.epoch == chosen["epoch"] and len({r["temperature"] for r in rows}) == 2  # it moved between epochs
    nll = -np.mean(np.log(val.values[np.arange(len(val.labels)), val.labels]))
    assert nll == pytest.approx(chosen["val_loss"], rel=1e-5)


def test_a_run_whose_last_launch_crashed_is_reported_failed_with_its_reason(data, tmp_path):
    """A photo gone after the first epoch stops the next launch with an error: the report shows the run as
    failed with the one-line reason its train.log ends with, not as in progress; a later launch that goes
    on clears it."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    run_dir = tmp_path / "run"
    assert train.main(demo_args(copy, run_dir, "train.epochs=1", workers=0)) == 0
    photo = copy / "images" / f"{(copy / 'train_img.csv').read_text().split()[0]}.jpeg"
    kept = photo.read_bytes()
    photo.unlink()
    assert train.main(demo_args(copy, run_dir, "train.epochs=2", workers=0)) == 2
    report(run_dir, tmp_path / "report")
    with open(tmp_path / "report" / "results.csv") as f:
        status = next(csv.DictReader(f))["status"]
    assert status.startswith("failed: lab split 'train'") and "image file missing" in status, status
    assert "\n" not in status
    photo.write_bytes(kept)
    assert train.main(demo_args(copy, run_dir, "train.epochs=2", workers=0)) == 0
    report(run_dir, tmp_path / "report")
    with open(tmp_path / "report" / "results.csv") as f:
        assert next(csv.DictReader(f))["status"] == "done"
