"""End to end: real torchrun with gloo on CPU, real files, real checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.training import checkpoint
from dr_resnet.training.components import class_weights, lr_lambda
from dr_resnet.training.train import main

from helpers import (
    REPO,
    assert_same_training_state,
    demo_args,
    metrics_rows,
    preprocessed_dataset,
)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """40 train / 13 test images at 48 px (13: no world size of 2 or 3 divides it)."""
    return preprocessed_dataset(tmp_path_factory.mktemp("tiny"), 40, 13, seed=11, size=48)


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return demo_args(data, run_dir, *extra)


def torchrun(nproc: int, args: list[str], module: str = "dr_resnet.train", extra: list[str] = (),
             timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node", str(nproc), *extra, "-m", module, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def straight_run(tiny, tmp_path_factory) -> Path:
    """3 epochs straight through, 2 processes."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = torchrun(2, overrides(tiny, run_dir, "train.epochs=3"))
    assert "run: selected epoch 3 (final epoch, nothing held out)" in result.stdout
    return run_dir


@pytest.mark.slow
def test_torchrun_two_processes_writes_the_run_directory(straight_run, tiny):
    names = {p.name for p in straight_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt", "summary.json",
            "confusion_matrix.png"} <= names
    rows = metrics_rows(straight_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    required = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_qwk", "lr", "images_per_s",
                "test_recall", "confusion_matrix", "epoch_seconds", "test_referable_sensitivity",
                "test_referable_specificity", "test_referable_auc", "grad_norm_mean", "grad_norm_max", "clipped_share",
                "data_wait_share"}
    assert all(required <= r.keys() for r in rows) and all(0 <= r["data_wait_share"] <= 1 for r in rows)
    assert all(0 < r["grad_norm_mean"] <= r["grad_norm_max"] and 0 <= r["clipped_share"] <= 1 for r in rows)
    # 40 images, 2 ranks, batch 8: 2 full batches a rank, 32 images an epoch; 13 test images each epoch.
    assert all(np.sum(r["confusion_matrix"]) == 13 for r in rows)
    summary = json.loads((straight_run / "summary.json").read_text())
    assert summary["num_test_samples"] == 13 and summary["world_size"] == 2
    # 40 training images hold out 4 at data.val_fraction=0.1, under data.min_val_images: nothing is held out,
    # and the final epoch is the result (never the best on test).
    assert summary["selected_on"] == summary["selected_by"] == "final" and summary["selected"]["epoch"] == 3
    assert summary["confusion_matrix"] == rows[-1]["confusion_matrix"] and "val_qwk" not in rows[-1]
    saved = yaml.safe_load((straight_run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 3 and saved["data"]["root"] == str(tiny)
    # The learning rate the rule gave (demo_args fixes train.lr=0.02), and what else the run derived.
    assert saved["effective"]["processes"] == 2 and saved["effective"]["global_batch"] == 16
    assert saved["effective"]["lr"] == 0.02 and saved["effective"]["held_out_images"] == 0
    assert saved["effective"]["sync_bn"] is False  # CPU processes: SyncBatchNorm needs CUDA
    assert saved["effective"]["first_epoch_grade_shares"] == pytest.approx([0.2] * 5)
    state = checkpoint.load(straight_run / "checkpoint_last.pt")
    assert state["epoch"] == 3 and {"model", "optimizer", "scheduler", "scaler", "rng", "config", "best"} <= state.keys()
    assert not any(k.startswith("module.") for k in state["model"]) and "layer4.1.bn2.running_var" in state["model"]
    assert checkpoint.load(straight_run / "checkpoint_best.pt")["epoch"] == 3


@pytest.mark.slow
def test_rerun_resumes_drops_unsaved_epochs_and_extends(tiny, tmp_path):
    run_dir = tmp_path / "run"
    first = torchrun(2, overrides(tiny, run_dir, "train.scheduler=none"))
    assert "resumed" not in first.stderr
    before = metrics_rows(run_dir)
    # An epoch logged after the last checkpoint (a crash between the two writes) is redone, not kept.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "stale": True}) + "\n")
    second = torchrun(2, overrides(tiny, run_dir, "train.scheduler=none", "train.epochs=3"))
    assert "resumed" in second.stderr and "after epoch 2" in second.stderr
    rows = metrics_rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and "stale" not in rows[2]
    assert rows[:2] == before
    again = torchrun(2, overrides(tiny, run_dir, "train.scheduler=none", "train.epochs=3"))
    assert "epoch 3/3" not in again.stderr and len(metrics_rows(run_dir)) == 3  # done: nothing to train


@pytest.mark.slow
def test_evaluation_is_exact_at_any_world_size(straight_run, tiny, tmp_path):
    results = []
    for nproc in (1, 2, 3):
        out = tmp_path / f"eval{nproc}"
        torchrun(nproc, ["--checkpoint", str(straight_run / "checkpoint_last.pt"), "--data-root", str(tiny),
                         "--out", str(out), "--batch-size", "4", "--workers", "0", "--device", "cpu"],
                 module="dr_resnet.evaluate")
        results.append(json.loads((out / "metrics.json").read_text()))
        assert (out / "confusion_matrix.png").stat().st_size > 10_000
    assert [r["num_samples"] for r in results] == [13, 13, 13]
    assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"] == results[2]["confusion_matrix"]
    assert results[0]["qwk"] == results[1]["qwk"] == results[2]["qwk"]
    # Referable AUC needs every image's score: gathered from all ranks, the same at any world size.
    assert results[0]["referable_auc"] == pytest.approx(results[1]["referable_auc"]) == pytest.approx(results[2]["referable_auc"])
    assert metrics_rows(straight_run)[-1]["test_referable_auc"] == pytest.approx(results[0]["referable_auc"])
    # Test-time augmentation over flips: exact under any world size like the rest.
    tta = []
    for nproc in (1, 3):
        out = tmp_path / f"tta{nproc}"
        torchrun(nproc, ["--checkpoint", str(straight_run / "checkpoint_last.pt"), "--data-root", str(tiny),
                         "--out", str(out), "--batch-size", "4", "--workers", "0", "--tta", "flips", "--device", "cpu"],
                 module="dr_resnet.evaluate")
        tta.append(json.loads((out / "metrics.json").read_text()))
    assert tta[0]["num_samples"] == tta[1]["num_samples"] == 13 and tta[0]["tta"] == "flips"
    assert tta[0]["confusion_matrix"] == tta[1]["confusion_matrix"]
    assert tta[0]["loss"] == pytest.approx(tta[1]["loss"], rel=1e-6) and tta[0]["loss"] != pytest.approx(results[0]["loss"])
    assert results[0]["loss"] == pytest.approx(results[2]["loss"], rel=1e-6)
    # Same model, same images: what training logged for its last epoch.
    assert results[0]["confusion_matrix"] == metrics_rows(straight_run)[-1]["confusion_matrix"]
    # The sampler this replaces would have counted padded duplicates: 14 and 15 images.
    from torch.utils.data import DistributedSampler
    assert [sum(len(DistributedSampler(range(13), w, r, shuffle=False)) for r in range(w)) for w in (2, 3)] == [14, 15]


def _workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


@pytest.mark.slow
def test_killed_worker_restarts_and_ends_bitwise_equal_to_a_straight_run(straight_run, tiny, tmp_path):
    run_dir = tmp_path / "run"
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "-m",
                      "dr_resnet.train", *overrides(tiny, run_dir, "train.epochs=3")]
    # Restarted workers must not read the previous round's addresses from a shared store (pytorch #135712).
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint_last.pt").exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # waiting on another process's file: nothing to synchronise with
        assert agent.poll() is None, "training ended before a worker could be killed"
        workers = _workers_of(agent.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        output, _ = agent.communicate(timeout=300)
    finally:
        agent.kill()
    assert agent.returncode == 0, output
    assert "resumed" in output
    assert [r["epoch"] for r in metrics_rows(run_dir)] == [1, 2, 3]
    # Stopped after epoch k, resumed: the same weights, optimizer state and metrics, bit for bit.
    assert_same_training_state(straight_run, run_dir)


def test_single_process_in_process_run_and_config_errors(tiny, tmp_path, capsys):
    assert main(overrides(tiny, tmp_path / "one", "train.epochs=1", "train.warmup_epochs=0", "train.class_weights=balanced",
                          "train.amp=bf16", "data.workers=0")) == 0
    assert "one: selected epoch 1 (final epoch, nothing held out)" in capsys.readouterr().out
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["num_test_samples"] == 13
    assert main(overrides(tiny, tmp_path / "loss", "train.select_by=loss", "data.workers=0", "data.val_fraction=0.25",
                          "data.min_val_images=1", "train.epochs=3")) == 0
    rows = [json.loads(line) for line in (tmp_path / "loss" / "metrics.jsonl").read_text().splitlines()]
    lowest = min(rows, key=lambda r: (r["val_loss"], r["epoch"]))["epoch"]
    summary = json.loads((tmp_path / "loss" / "summary.json").read_text())
    assert summary["selected_by"] == "loss" and summary["selected"]["epoch"] == lowest
    assert checkpoint.load(tmp_path / "loss" / "checkpoint_best.pt")["epoch"] == lowest
    # The report selects the run's own epoch (by loss here), the one in checkpoint_best.pt.
    from dr_resnet.results.report import report
    report(tmp_path / "loss")
    import csv
    with open(tmp_path / "loss" / "results.csv") as f:
        table = next(csv.DictReader(f))
    assert int(table["selected_epoch"]) == lowest and table["selected_by"] == "held-out loss"
    assert main(overrides(tiny, tmp_path / "bad", "train.epochz=3")) == 2
    assert "unknown key 'train.epochz'" in capsys.readouterr().err
    assert main(overrides(tiny, tmp_path / "big", "train.batch_size=64")) == 2
    assert not (tmp_path / "big" / "checkpoint_last.pt").exists()


def test_class_weights_match_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight
    labels = np.array([0] * 30 + [1] * 5 + [2] * 10 + [3] * 3 + [4] * 2)
    expected = compute_class_weight("balanced", classes=np.arange(5), y=labels)
    np.testing.assert_allclose(class_weights(np.bincount(labels, minlength=5)).numpy(), expected, rtol=1e-6)
    assert class_weights(np.array([4, 0, 4, 0, 0])).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_learning_rate_schedules():
    cosine = lr_lambda("cosine", warmup_steps=4, total_steps=20)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(12) == pytest.approx(0.5) and cosine(20) == pytest.approx(0.0)
    assert lr_lambda("none", 4, 20)(7) == 1.0


@pytest.mark.parametrize("warmup_steps,pct_start", [(0, 0.3), (25, 0.25), (10, 0.1)])
def test_onecycle_is_torchs_one_cycle_policy(warmup_steps, pct_start):
    """The learning rate at every step equals torch's OneCycleLR (cosine, momentum not cycled)."""
    total, max_lr = 100, 0.05
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=pct_start,
                                                    cycle_momentum=False)
    ours = lr_lambda("onecycle", warmup_steps, total)
    for step in range(total):
        assert max_lr * ours(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        optimizer.step()
        if step < total - 1:
            reference.step()
    assert ours(0) == pytest.approx(1 / 25) and max(ours(s) for s in range(total)) == pytest.approx(1.0)


def test_balanced_sampler_trains(tiny, tmp_path):
    assert main(overrides(tiny, tmp_path / "bal", "train.sampler=balanced", "train.epochs=1", "data.workers=0")) == 0
    row = json.loads((tmp_path / "bal" / "metrics.jsonl").read_text())
    assert row["epoch"] == 1 and np.sum(row["confusion_matrix"]) == 13


def test_regression_head_fits_thresholds_and_evaluate_uses_them(tiny, tmp_path):
    from dr_resnet.training.evaluate import main as evaluate_main
    run_dir = tmp_path / "reg"
    assert main(overrides(tiny, run_dir, "model.head=regression", "train.clip_grad_norm=1.0", "data.workers=0")) == 0
    rows = metrics_rows(run_dir)
    assert all(len(r["thresholds"]) == 4 and r["thresholds"] == sorted(r["thresholds"]) for r in rows)
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert state["head"]["thresholds"] == pytest.approx(rows[-1]["thresholds"])
    assert state["model"]["fc.weight"].shape == (1, 512)
    assert evaluate_main(["--checkpoint", str(run_dir / "checkpoint_last.pt"), "--data-root", str(tiny),
                          "--out", str(tmp_path / "eval"), "--workers", "0", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["head"] == "regression" and result["thresholds"] == pytest.approx(rows[-1]["thresholds"])
    assert result["confusion_matrix"] == rows[-1]["confusion_matrix"]
    assert result["referable_auc"] == pytest.approx(rows[-1]["test_referable_auc"])
    # The thresholds were fitted on an eval-mode pass over the training split: evaluating the checkpoint
    # there reproduces the QWK the fit reached.
    assert evaluate_main(["--checkpoint", str(run_dir / "checkpoint_last.pt"), "--data-root", str(tiny),
                          "--split", "train", "--out", str(tmp_path / "eval_train"), "--workers", "0", "--device", "cpu"]) == 0
    on_train = json.loads((tmp_path / "eval_train" / "metrics.json").read_text())
    assert on_train["num_samples"] == 40 and on_train["qwk"] == pytest.approx(rows[-1]["thresholds_fit_qwk"])


def test_held_out_validation_selects_the_epoch_and_fits_thresholds(tiny, tmp_path, capfd):
    from dr_resnet.data.dataset import RetinopathyDataset
    from dr_resnet.data.split import holdout_mask

    run_dir = tmp_path / "val"
    assert main(overrides(tiny, run_dir, "model.head=regression", "train.clip_grad_norm=1.0", "data.workers=0",
                          "data.val_fraction=0.25", "data.min_val_images=1", "regression.fit_thresholds=val",
                          "train.epochs=3", "train.seed=4")) == 0
    train = RetinopathyDataset(tiny, "train")
    held = holdout_mask(train.patients, train.labels, 0.25, seed=0)  # data.split_seed's draw, whatever train.seed
    assert 0 < held.sum() < 40
    assert f"{40 - held.sum()} train / {held.sum()} held-out / 13 test images" in capfd.readouterr().err
    rows = metrics_rows(run_dir)
    for r in rows:
        assert np.array_equal(np.sum(r["val_confusion_matrix"], axis=1), np.bincount(train.labels[held], minlength=5))
        assert np.sum(r["confusion_matrix"]) == 13
        assert r["thresholds_fit_qwk"] == pytest.approx(r["val_qwk"])  # cut where they were fitted
    summary = json.loads((run_dir / "summary.json").read_text())
    chosen = max(rows, key=lambda r: (r["val_qwk"], -r["epoch"]))
    assert summary["selected_on"] == "val" and summary["selected"]["epoch"] == chosen["epoch"]
    assert summary["selected"]["val_qwk"] == chosen["val_qwk"] and summary["selected"]["test_qwk"] == chosen["test_qwk"]
    best = checkpoint.load(run_dir / "checkpoint_best.pt")
    assert best["epoch"] == chosen["epoch"] and best["best"]["on"] == "val"
    assert best["head"]["thresholds"] == pytest.approx(chosen["thresholds"])
    # predictions.csv is the selected epoch's, predictions_final.csv the final epoch's (the report compares both).
    from dr_resnet.results.metrics import confusion_matrix
    from dr_resnet.results.predictions import read_predictions

    for name, row in (("predictions.csv", chosen), ("predictions_final.csv", rows[-1])):
        found = read_predictions(run_dir / name)
        assert confusion_matrix(found.labels, found.grades).tolist() == row["confusion_matrix"], name


def test_ordinal_head_trains_and_evaluate_reproduces_its_epoch(tiny, tmp_path):
    from dr_resnet.training.evaluate import main as evaluate_main
    run_dir = tmp_path / "ordinal"
    assert main(overrides(tiny, run_dir, "model.head=ordinal", "data.workers=0")) == 0
    rows = metrics_rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.sum(r["confusion_matrix"]) == 13 for r in rows)
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert state["model"]["fc.weight"].shape == (4, 512) and state["config"]["model"]["head"] == "ordinal"
    assert evaluate_main(["--checkpoint", str(run_dir / "checkpoint_last.pt"), "--data-root", str(tiny),
                          "--out", str(tmp_path / "eval"), "--workers", "0", "--device", "cpu", "--tta", "none"]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["head"] == "ordinal" and result["confusion_matrix"] == rows[-1]["confusion_matrix"]
    assert result["referable_auc"] == pytest.approx(rows[-1]["test_referable_auc"])
    assert result["loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_run_log_holds_every_attempt_and_every_ranks_warnings(tiny, tmp_path):
    run_dir = tmp_path / "run"
    torchrun(2, overrides(tiny, run_dir, "train.epochs=1"))
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    checkpoint.save({**state, "precision": "bf16"}, run_dir / "checkpoint_last.pt")  # as if trained on another GPU
    torchrun(2, overrides(tiny, run_dir, "train.epochs=2"))
    text = (run_dir / "train.log").read_text()
    lines = text.splitlines()
    assert sum("environment: host" in line and "2 process(es) (torchrun)" in line for line in lines) == 2
    assert sum("config " in line and "train.epochs=1" in line for line in lines) == 1  # the first attempt's
    for epoch in ("epoch 1/1 ", "epoch 2/2 "):
        assert sum(epoch in line for line in lines) == 1, epoch
    assert "resumed" in text and "after epoch 1" in text
    for rank in (0, 1):  # rank 1 logs its warnings only
        assert sum(f"[rank {rank}] WARNING" in line and "was trained in bf16" in line for line in lines) == 1
    assert not [line for line in lines if "[rank 1] INFO" in line]
    assert lines[0][:4].isdigit() and lines[0][4] == "-"  # dated: a log read days later


def test_a_stopped_run_says_why_in_its_run_log_and_a_failed_start_leaves_no_folder(tiny, tmp_path, capfd):
    """A run that fails before it began (bad data) leaves no folder behind, its error on stderr; a run
    folder that holds a run keeps the reason in its train.log."""
    run_dir = tmp_path / "run"
    assert main(overrides(tiny, run_dir, f"data.root={tmp_path / 'nowhere'}", "train.device=cpu")) == 2
    assert str(tmp_path / "nowhere") in capfd.readouterr().err and not run_dir.exists()
    assert main(overrides(tiny, run_dir, "train.epochs=1", "data.workers=0")) == 0
    moved = tmp_path / "moved"
    tiny_copy = shutil.copytree(tiny, moved)
    shutil.rmtree(tiny_copy)  # the data went away before the run was extended
    assert main(overrides(tiny, run_dir, "train.epochs=2", "data.workers=0", f"data.root={moved}")) == 2
    text = (run_dir / "train.log").read_text()
    assert "ERROR" in text and str(moved) in text and (run_dir / "checkpoint_last.pt").is_file()


@pytest.mark.parametrize("head", ["classification", "regression"])
def test_selected_epoch_predictions_and_intervals_match_evaluate(runs, photos, tmp_path, head):
    from dr_resnet.results.metrics import confusion_matrix
    from dr_resnet.results.predictions import read_predictions
    from dr_resnet.training.evaluate import main as evaluate_main

    run_dir = runs[head]
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = read_predictions(run_dir / "predictions.csv")
    assert len(saved.names) == 24 and saved.names == RetinopathyDataset(photos / "data", "test").names
    assert confusion_matrix(saved.labels, saved.grades).tolist() == summary["confusion_matrix"]
    intervals = summary["intervals"]
    assert intervals["unit"] == "patients" and intervals["resamples"] == 2000
    for name, key in (("accuracy", "test_acc"), ("qwk", "test_qwk"), ("referable_auc", "test_referable_auc")):
        assert intervals[name]["value"] == pytest.approx(summary["selected"][key], abs=1e-9)
        assert intervals[name]["low"] <= intervals[name]["value"] <= intervals[name]["high"]
    # evaluate on the selected checkpoint writes the same predictions and the same intervals.
    assert evaluate_main(["--checkpoint", str(run_dir / "checkpoint_best.pt"), "--data-root", str(photos / "data"),
                          "--out", str(tmp_path), "--workers", "0", "--device", "cpu"]) == 0
    evaluated = read_predictions(tmp_path / "predictions.csv")
    assert evaluated.names == saved.names and np.array_equal(evaluated.grades, saved.grades)
    assert np.allclose(evaluated.referable_scores, saved.referable_scores, atol=1e-6)
    assert evaluated.values.shape == ((24,) if head == "regression" else (24, 5))
    assert json.loads((tmp_path / "metrics.json").read_text())["intervals"] == intervals


def test_temperature_calibration_travels_to_evaluate_predict_and_export(photos, tmp_path, capsys):
    from dr_resnet.results.predictions import read_predictions
    from dr_resnet.serving.export import export
    from dr_resnet.serving.grading import load_grader
    from dr_resnet.training.evaluate import main as evaluate_main

    from helpers import train_run

    assert main(["train.calibration=temperature", f"data.root={photos / 'data'}", "data.val_fraction=0"]) == 2
    assert "train.calibration=temperature fits the probabilities on a held-out set" in capsys.readouterr().err
    # A held-out part too small to use (4 of 40 images) is an error when something must be fitted on it.
    assert main(["train.calibration=temperature", f"data.root={photos / 'data'}"]) == 2
    assert ("train.calibration=temperature fits on the held-out part, but data.val_fraction=0.1 holds out 4 of the 40 "
            "training images") in capsys.readouterr().err
    run_dir = train_run(photos / "data", tmp_path / "run", "data.val_fraction=0.25", "data.min_val_images=1",
                        "train.calibration=temperature")
    rows = metrics_rows(run_dir)
    assert all(r["temperature"] > 0 and {"val_ece_before", "val_ece_after", "test_ece", "test_ece_before"} <= set(r)
               for r in rows)
    best = checkpoint.load(run_dir / "checkpoint_best.pt")
    chosen = next(r for r in rows if r["epoch"] == best["epoch"])
    assert best["head"] == {"temperature": chosen["temperature"]}
    # The selected checkpoint's probabilities are the network's softmax at that temperature, in evaluate,
    # predict and the export alike.
    assert evaluate_main(["--checkpoint", str(run_dir / "checkpoint_best.pt"), "--data-root", str(photos / "data"),
                          "--out", str(tmp_path / "eval"), "--workers", "0", "--device", "cpu"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["temperature"] == chosen["temperature"] and evaluated["ece"] == pytest.approx(chosen["test_ece"], abs=1e-6)
    grader = load_grader(run_dir / "checkpoint_best.pt", torch.device("cpu"))
    test = RetinopathyDataset(photos / "data", "test")
    images = torch.stack([grader.recipe.prepare(p) for p in test.paths])
    with torch.no_grad():
        logits = grader.network(grader.model.normalize(images))
    expected = (logits / chosen["temperature"]).softmax(dim=1).numpy()
    assert np.allclose(grader.grade(images).values, expected, atol=1e-6)
    assert np.allclose(read_predictions(tmp_path / "eval" / "predictions.csv").values, expected, atol=1e-5)
    exported = load_grader(export(run_dir / "checkpoint_best.pt", "torchscript", tmp_path / "ts")[0], torch.device("cpu"))
    assert np.allclose(exported.grade(images).values, expected, atol=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["selected"]["temperature"] == chosen["temperature"] and summary["selected"]["test_ece"] == chosen["test_ece"]


def test_the_held_out_part_is_drawn_by_its_own_seed_not_train_seed(tiny):
    from dr_resnet import config
    from dr_resnet.training import components

    def held_out(*extra):
        cfg = config.load(REPO / "configs" / "demo.yaml", [f"data.root={tiny}", "data.val_fraction=0.25",
                                                           "data.min_val_images=1", *extra])
        return components.datasets(cfg).val.names

    assert held_out("train.seed=0") == held_out("train.seed=5") == held_out("train.seed=5", "data.split_seed=0")
    assert held_out("data.split_seed=1") != held_out()
    assert len(held_out()) == 10  # whole patients, stratified: a quarter of the 40 images


def test_the_learning_rate_rule_is_what_a_run_trains_with(tiny, tmp_path, capfd):
    run_dir = tmp_path / "auto"
    assert main(overrides(tiny, run_dir, "train.lr=auto", "train.epochs=1", "data.workers=0")) == 0
    expected = 0.4 * 8 / 256  # the demo's scratch rate: 0.4 per 256 images, one process of 8
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(expected)
    effective = yaml.safe_load((run_dir / "config.yaml").read_text())["effective"]
    assert effective["lr"] == pytest.approx(expected) and effective["lr_rule"] == "0.4 x 8 / 256 (scratch, linear scaling)"
    assert f"learning rate {expected:.6g} (0.4 x 8 / 256 (scratch, linear scaling))" in capfd.readouterr().err
    assert config_lr(run_dir) is None  # the config keeps "auto": the rule, not its value for one process count


def config_lr(run_dir: Path):
    from dr_resnet import config

    return config.load(run_dir / "config.yaml").train.lr


def test_a_collapsed_run_is_flagged_everywhere(tiny, tmp_path, capsys):
    """Natural sampling, the prior-initialised output bias and a learning rate too small to move it: every
    test image is graded 0. The summary, the last line and the report say so."""
    run_dir = tmp_path / "collapsed"
    assert main(overrides(tiny, run_dir, "train.sampler=random", "train.lr=1e-9", "train.epochs=1", "data.workers=0")) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["collapsed"].startswith("grade 0 predicted for 100.0% of the images")
    assert np.array(summary["confusion_matrix"])[:, 1:].sum() == 0
    assert "; COLLAPSED: grade 0 predicted for 100.0% of the images" in capsys.readouterr().out
    from dr_resnet.results.report import report

    report(run_dir)
    import csv
    with open(run_dir / "results.csv") as f:
        assert next(csv.DictReader(f))["collapsed"] == summary["collapsed"]


def test_resume_refuses_a_changed_config_and_starts_over_only_when_told(tiny, tmp_path, capfd):
    """Re-running into a folder with a checkpoint: train.epochs extends it; a changed learning rate or
    depth is refused, naming each key with its old and new value (no epoch trained, config.yaml as it
    was); train.resume=never moves the old files aside and starts over; train.resume=must needs one."""
    import yaml

    run_dir = tmp_path / "run"
    assert main(overrides(tiny, run_dir, "train.epochs=1", "data.workers=0")) == 0
    saved = (run_dir / "config.yaml").read_text()
    capfd.readouterr()
    assert main(overrides(tiny, run_dir, "train.epochs=2", "data.workers=0", "train.lr=0.5", "model.depth=50")) == 2
    err = capfd.readouterr().err
    assert "train.lr: 0.02 -> 0.5" in err and "model.depth: 18 -> 50" in err and "train.epochs" not in err.split("config:")[1]
    assert "output.dir" in err and "train.resume=never" in err and "Traceback" not in err
    assert len(metrics_rows(run_dir)) == 1 and (run_dir / "config.yaml").read_text() == saved
    assert main(overrides(tiny, run_dir, "train.epochs=2", "data.workers=0", "train.lr=0.5", "train.resume=never")) == 0
    aside = list(run_dir.glob("replaced-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint_last.pt").is_file() and len(metrics_rows(aside[0])) == 1
    rows = metrics_rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2] and yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.5
    assert checkpoint.load(run_dir / "checkpoint_last.pt")["optimizer"]["param_groups"][0]["initial_lr"] == 0.5
    assert main(overrides(tiny, run_dir, "train.epochs=3", "data.workers=0", "train.lr=0.5", "data.workers=1")) == 0
    assert [r["epoch"] for r in metrics_rows(run_dir)] == [1, 2, 3]  # extended; data.workers may change
    capfd.readouterr()
    assert main(overrides(tiny, tmp_path / "empty", "train.resume=must")) == 2
    assert "train.resume=must: no checkpoint to resume in" in capfd.readouterr().err


def test_a_user_error_under_torchrun_is_printed_once_and_names_the_root_cause(tmp_path):
    """Every rank of 3 meets the same bad data.root: one error line, not one per rank, and torchrun's
    failure summary names the error (its error file) instead of <N/A>, in one line, without our traceback."""
    missing = tmp_path / "nowhere"
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node", "3", "-m", "dr_resnet.train", "--config",
                      str(REPO / "configs" / "demo.yaml"), f"data.root={missing}", "train.device=cpu",
                      f"output.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if "ERROR dr_resnet" in line]
    assert len(ours) == 1 and f"data root {missing} is not a directory" in ours[0], result.stderr[-3000:]
    assert f"DatasetError: data root {missing} is not a directory" in result.stderr  # the summary's root cause
    # ... in one line a rank: the error files carry the message, not our traceback (torchrun's own stays).
    assert "fit(build(cfg, info))" not in result.stderr and "read_split(" not in result.stderr, result.stderr[-3000:]
    for line in result.stderr.splitlines():
        if line.strip().startswith("traceback :") and "DatasetError" in line:
            assert line.strip() == f"traceback : DatasetError: data root {missing} is not a directory"


def test_a_failed_write_on_rank_0_stops_every_process_of_a_launch_without_a_watchdog(tiny, tmp_path):
    """Two processes started as a plain srun or submitit's local executor starts them (no agent to end the
    others when one dies): rank 0 cannot write config.yaml (the kernel refuses files over 2 KB to it), and
    rank 1 stops at once with the same error instead of waiting in its first collective for 30 minutes."""
    import resource
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "dr_resnet.train", *overrides(tiny, tmp_path / "run", "train.epochs=1")]

    def start(rank: int) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DR_RESNET_CACHE": str(tmp_path / f"cache{rank}")}

        def small_files_only():
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=small_files_only if rank == 0 else None)

    started = time.monotonic()
    ranks = [start(0), start(1)]
    outputs = [p.communicate(timeout=240) for p in ranks]
    assert time.monotonic() - started < 200
    assert [p.returncode for p in ranks] == [2, 2], outputs[1][1][-2000:]
    # One of them reports (the first; with torchrun's variables both count as one launch): the cause, or rank
    # 0's failure to write as rank 1 learnt it.
    both = outputs[0][1] + outputs[1][1]
    assert ("rank 0 could not write the run folder's config.yaml and metrics.jsonl" in both
            or "cannot write the run folder's config.yaml and metrics.jsonl: [Errno 27] File too large" in both), both[-3000:]
