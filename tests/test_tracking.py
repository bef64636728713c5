"""W&B for real (offline mode, no network): what training logs can be read back from the run files,
an unreachable server never stops training, a resumed run continues the same W&B run."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from dr_resnet import config
from dr_resnet.training import checkpoint
from dr_resnet.training.tracking import Tracker, TrackingSettings, new_run_id, table_of
from dr_resnet.training.train import main

from helpers import (
    REPO,
    preprocessed_dataset,
)

WANDB = str(Path(sys.executable).parent / "wandb")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return preprocessed_dataset(tmp_path_factory.mktemp("tiny_wandb"), 24, 9, seed=2, size=32)


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """No user settings, key or mode leak in; W&B files stay under tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME",
                "WANDB_TAGS", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(var, raising=False)
    yield
    import wandb
    # W&B keeps process-wide settings (key, server): each test starts afresh. After a test that killed
    # the service on purpose, the teardown finds its connection gone.
    with contextlib.suppress(ConnectionError):
        wandb.teardown()


def train(data: Path, run_dir: Path, *extra: str) -> int:
    return main(["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}", "data.image_size=32",
                 "train.batch_size=8", "train.epochs=2", "train.warmup_epochs=0", "data.workers=1",
                 f"output.dir={run_dir}", *extra])


def inspect(run_folder: Path, *flags: str) -> list[dict]:
    out = subprocess.run([WANDB, "leet", "inspect", "--json", *flags, str(run_folder)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()] if not flags else [json.loads(out)]


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_offline_run_holds_every_epoch_and_the_summary(tiny, tmp_path):
    run_dir = tmp_path / "run"
    assert train(tiny, run_dir, "wandb.mode=offline", "wandb.group=sweep-a", "wandb.log_checkpoint=true",
                 "wandb.log_predictions=true", "model.head=regression", "train.clip_grad_norm=1.0",
                 "data.val_fraction=0.25", "data.min_val_images=1", "wandb.trial=train.lr,data.image_size",
                 "wandb.tags=final") == 0
    [folder] = offline_runs(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    history = [r["history"]["item"] for r in inspect(folder) if r.get("type") == "history"]
    epochs = [h for h in history if "test_qwk" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    for logged, row in zip(epochs, rows):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_qwk", "lr", "images_per_s"):
            assert logged[key] == pytest.approx(row[key], rel=1e-12), key
        assert [logged[f"test_recall/grade_{g}"] for g in range(5)] == pytest.approx(row["test_recall"])
        assert [logged[f"val_recall/grade_{g}"] for g in range(5)] == pytest.approx(row["val_recall"])
        assert logged["val_qwk"] == pytest.approx(row["val_qwk"], rel=1e-12)
        assert [logged[f"thresholds/{i}"] for i in range(4)] == pytest.approx(row["thresholds"])
    [state] = inspect(folder, "--summary")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert state["summary"]["selected/test_qwk"] == pytest.approx(summary["selected"]["test_qwk"])
    assert state["summary"]["selected/epoch"] == summary["selected"]["epoch"] and state["summary"]["selected/on"] == "val"
    assert state["summary"]["collapsed"] is bool(summary["collapsed"])
    assert state["summary"]["collapsed_reason"] == summary["collapsed"]
    assert state["summary"]["majority_baseline"] == pytest.approx(summary["majority_baseline"])
    for metric in ("qwk", "accuracy", "referable_auc"):  # the selected epoch's 95% interval
        assert state["summary"][f"selected/test_{metric}_low"] == pytest.approx(summary["intervals"][metric]["low"])
        assert state["summary"][f"selected/test_{metric}_high"] == pytest.approx(summary["intervals"][metric]["high"])
    assert state["summary"]["selected/intervals_resampled"] == "patients"
    assert "confusion_matrix_table" in state["summary"] and "confusion_matrix_png" in state["summary"]
    assert state["config"]["train"]["epochs"] == 2 and state["state"] == "finished"
    # What the run derived, not the config's "auto" (None): the rate it trained with, global batch, precision.
    effective = yaml.safe_load((run_dir / "config.yaml").read_text())["effective"]
    assert state["config"]["train"]["lr"] == pytest.approx(effective["lr"]) and effective["lr"] > 0
    # A sweep's trial values as flat keys (launch.sweep sets wandb.trial), typed: parallel coordinates read them.
    assert state["config"]["trial/train.lr"] == pytest.approx(effective["lr"])
    assert state["config"]["trial/data.image_size"] == 32
    assert state["config"]["effective"]["global_batch"] == effective["global_batch"] == 8
    assert state["config"]["effective"]["precision"] == effective["precision"] == "fp32"
    assert state["config"]["effective"]["first_epoch_grade_shares"] == effective["first_epoch_grade_shares"]
    assert state["run_id"] == checkpoint.load(run_dir / "checkpoint_last.pt")["wandb_id"]
    records = inspect(folder)
    run_record = next(r for r in records if r.get("type") == "run")["run"]
    assert run_record["run_group"] == "sweep-a" and run_record["job_type"] == "train"  # W&B's meaning: what it does
    assert sorted(run_record["tags"]) == ["final", "resnet18", "resnet18_scratch", "scratch", "seed0"]  # + wandb.tags
    assert state["config"]["wandb_mode_used"] == "offline" and state["config"]["wandb"]["mode"] == "offline"
    assert state["config"]["run"] == {"arm": "resnet18_scratch", "depth": 18, "initialisation": "scratch", "seed": 0}
    assert run_record["project"] == "dr-resnet" and run_record["display_name"] == "run"
    # The selected checkpoint as a model artifact each time the selection moved, and at the end with the
    # intervals: named model-<run id>, aliases best, latest and epoch-<n>, the metrics in its metadata.
    models = [r["artifact"] for r in records if r.get("type") == "artifact" and r["artifact"]["type"] == "model"]
    improved = [r["epoch"] for i, r in enumerate(rows) if r["val_qwk"] > max([-1.0] + [q["val_qwk"] for q in rows[:i]])]
    assert len(models) == len(improved) + 1 and {m["name"] for m in models} == {f"model-{state['run_id']}"}
    final = json.loads(models[-1]["metadata"])
    assert set(models[-1]["aliases"]) == {"best", "latest", f"epoch-{summary['selected']['epoch']}"}
    assert final["epoch"] == summary["selected"]["epoch"] and final["arm"] == "resnet18_scratch"
    assert final["val_qwk"] == pytest.approx(summary["selected"]["val_qwk"]) and final["intervals"] == summary["intervals"]
    assert final["recipe"]["image_size"] == 32 and "intervals" not in json.loads(models[0]["metadata"])
    # The selected epoch's predictions as a Table (wandb.log_predictions): every test image, its columns.
    [logged] = [h for h in history if h.get("predictions._type") == "table-file"]
    assert logged["predictions.nrows"] == 9
    table = folder / "files" / logged["predictions.path"]
    content = json.loads(table.read_text())
    predictions = (run_dir / "predictions.csv").read_text().splitlines()
    assert content["columns"] == predictions[0].split(",") and len(content["data"]) == len(predictions) - 1 == 9
    assert content["data"] == table_of(run_dir / "predictions.csv")[1]  # names as text, numbers as numbers


def test_the_predictions_table_keeps_names_as_text_and_numbers_as_numbers(tmp_path):
    """The W&B Table's cells from predictions.csv (the csv module, no pandas): a patient id "007" stays
    text, grades are ints, probabilities floats, and evaluate's empty epoch is no value."""
    import numpy as np

    from dr_resnet.results.predictions import write_predictions

    path = write_predictions(tmp_path / "predictions.csv", ["007_left", "007_right"], np.array([2, 0]), np.array([1, 0]),
                             np.array([[0.1, 0.2, 0.3, 0.25, 0.15], [0.9, 0.05, 0.05, 0, 0]]), np.array([0.7, 0.05]),
                             "classification")
    columns, rows = table_of(path)
    assert columns == ["image", "patient", "epoch", "true_grade", "grade", *(f"p_grade{g}" for g in range(5)),
                       "referable_score"]
    assert rows == [["007_left", "007", None, 2, 1, 0.1, 0.2, 0.3, 0.25, 0.15, 0.7],
                    ["007_right", "007", None, 0, 0, 0.9, 0.05, 0.05, 0, 0, 0.05]]
    assert [type(v) for v in rows[0][3:6]] == [int, int, float]


def test_a_tuning_winner_is_an_artifact_aliased_winner(tmp_path):
    record = tmp_path / "tuning.json"
    record.write_text(json.dumps({"arms": {"r18": {"winner": {"trial": "lr0.05"}}}}))
    tracker = Tracker(TrackingSettings("offline", group="sweep-t", name="sweep-t-tuning", job_type="tune"), tmp_path,
                      new_run_id(), {"arms": {"r18": {"train.lr": "0.05"}}})
    tracker.log_tuning(record, "r18", {"trial": "lr0.05", "values": {"train.lr": "0.05"}, "held_out": 0.8})
    tracker.finish()
    [folder] = offline_runs(tmp_path)
    records = inspect(folder)
    [artifact] = [r["artifact"] for r in records if r.get("type") == "artifact"]
    assert artifact["name"] == "tuning-r18" and artifact["type"] == "tuning"
    assert {"winner", "lr0.05"} <= set(artifact["aliases"])
    assert json.loads(artifact["metadata"])["values"] == {"train.lr": "0.05"}
    run_record = next(r for r in records if r.get("type") == "run")["run"]
    assert run_record["job_type"] == "tune" and run_record["run_group"] == "sweep-t"


def test_a_sweep_has_one_tuning_run_whatever_the_launches(tmp_path):
    """log_winners resumes the sweep's tuning run (its id kept in the sweep folder), not a new run a launch."""
    from launch.sweep import TUNING_ID_FILE, log_winners

    out = tmp_path / "sweep-t"
    out.mkdir()
    choice = {"arms": {"r18": {"winner": {"trial": "lr0.05", "values": {"train.lr": 0.05}, "held_out": 0.8}}}}
    (out / "tuning.json").write_text(json.dumps(choice))
    recipe = config.load(REPO / "configs" / "demo.yaml", ["wandb.mode=offline"])
    log_winners(choice, out, recipe)
    run_id = (out / TUNING_ID_FILE).read_text().strip()
    log_winners(choice, out, recipe)  # a later launch of the same sweep (more trials, say)
    folders = offline_runs(out)
    assert len(folders) == 2 and all(run_id in f.name for f in folders)
    assert {next(r for r in inspect(f) if r.get("type") == "run")["run"]["run_id"] for f in folders} == {run_id}
    assert (out / TUNING_ID_FILE).read_text().strip() == run_id


def earlier_winner_run(run_dir: Path, mode: str = "offline") -> str:
    """A phase-2 run of an earlier winner as training leaves it for W&B: its offline run, and the id and
    config in its last checkpoint."""
    cfg = config.load(REPO / "configs" / "demo.yaml", [f"wandb.mode={mode}", "wandb.group=sweep-s", "wandb.tags=final",
                                                        "wandb.name=r18_lr0.1_seed1", "train.seed=1", f"output.dir={run_dir}"])
    run_id = new_run_id()
    tracker = Tracker(TrackingSettings(mode, group="sweep-s", name="r18_lr0.1_seed1", tags=("resnet18_scratch", "final")),
                      run_dir, run_id, {})
    tracker.finish()
    checkpoint.save({"config": cfg.to_dict(), "wandb_id": run_id, "epoch": 1}, run_dir / "checkpoint_last.pt")
    return run_id


def test_an_earlier_winners_runs_set_aside_are_tagged_superseded(tmp_path, capsys):
    from launch.sweep import set_aside_earlier_winners

    arm = tmp_path / "sweep-s" / "r18"
    run_id = earlier_winner_run(arm / "lr0.1" / "seed1")
    (arm / "lr0.1" / "seed2").mkdir()  # failed before its first checkpoint: no W&B id, nothing to tag
    (arm / "lr0.3").mkdir()  # the current winner: left alone
    set_aside_earlier_winners(arm, "lr0.3", config.load(REPO / "configs" / "demo.yaml", ["wandb.mode=offline"]).wandb)
    moved = tmp_path / "sweep-s" / "superseded" / "r18" / "lr0.1" / "seed1"
    assert (moved / "checkpoint_last.pt").is_file() and (arm / "lr0.3").is_dir() and not (arm / "lr0.1").exists()
    first, tagged = offline_runs(moved)
    for folder in (first, tagged):
        assert next(r for r in inspect(folder) if r.get("type") == "run")["run"]["run_id"] == run_id
    runs = [r["run"] for r in inspect(tagged) if r.get("type") == "run"]
    assert {"superseded", "final", "resnet18_scratch", "seed1"} <= set(runs[-1]["tags"])
    assert runs[0]["run_group"] == "sweep-s" and runs[0]["display_name"] == "r18_lr0.1_seed1"  # not renamed or moved
    assert not any("superseded" in r["run"].get("tags", []) for r in inspect(first) if r.get("type") == "run")
    assert not (moved.parent / "seed2" / "wandb").exists()
    # W&B disabled (the recipe's mode): the runs move, and no W&B run is started
    other = tmp_path / "sweep-d" / "r18"
    earlier_winner_run(other / "lr0.1" / "seed1")
    set_aside_earlier_winners(other, "lr0.3", config.load(REPO / "configs" / "demo.yaml").wandb)
    assert len(offline_runs(tmp_path / "sweep-d" / "superseded" / "r18" / "lr0.1" / "seed1")) == 1


def test_wandb_variables_fill_what_the_config_leaves_empty(tiny, tmp_path, monkeypatch):
    """WANDB_PROJECT, WANDB_NAME and WANDB_TAGS count where the config sets nothing; a config value wins."""
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_NAME", "env-name")
    monkeypatch.setenv("WANDB_TAGS", "cohort-b, night")
    run_dir = tmp_path / "run"
    assert train(tiny, run_dir, "wandb.mode=offline", "train.epochs=1") == 0
    record = next(r for r in inspect(offline_runs(run_dir)[0]) if r.get("type") == "run")["run"]
    assert record["project"] == "from-env" and record["display_name"] == "env-name"
    assert {"cohort-b", "night", "resnet18_scratch"} <= set(record["tags"])
    other = tmp_path / "other"
    assert train(tiny, other, "wandb.mode=offline", "train.epochs=1", "wandb.project=mine", "wandb.name=given") == 0
    record = next(r for r in inspect(offline_runs(other)[0]) if r.get("type") == "run")["run"]
    assert record["project"] == "mine" and record["display_name"] == "given"


def test_resumed_run_continues_the_same_wandb_run(tiny, tmp_path):
    run_dir = tmp_path / "run"
    assert train(tiny, run_dir, "wandb.mode=offline", "train.epochs=1") == 0
    first_id = checkpoint.load(run_dir / "checkpoint_last.pt")["wandb_id"]
    assert train(tiny, run_dir, "wandb.mode=offline", "train.epochs=2") == 0
    folders = offline_runs(run_dir)
    assert len(folders) == 2 and all(f.name.endswith(f"-{first_id}") for f in folders)
    assert checkpoint.load(run_dir / "checkpoint_last.pt")["wandb_id"] == first_id
    second = [r["history"]["item"] for r in inspect(folders[1]) if r.get("type") == "history"]
    assert [h["epoch"] for h in second if "test_qwk" in h] == [2]  # only the new epoch, on the same axis


def test_wandb_mode_variable_wins_and_disabled_writes_nothing(tiny, tmp_path, monkeypatch):
    assert train(tiny, tmp_path / "off", "wandb.mode=offline", "train.epochs=1") == 0
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert train(tiny, tmp_path / "env", "wandb.mode=offline", "train.epochs=1") == 0
    assert offline_runs(tmp_path / "off") and not (tmp_path / "env" / "wandb").exists()


@pytest.fixture
def silent_server():
    """A local server that accepts connections and never answers: the worst case for a W&B start."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.slow
def test_unreachable_server_falls_back_offline(tiny, tmp_path, monkeypatch, silent_server, caplog):
    # How long the fall-back takes (init_timeout + ~9 s here) is a measurement, not asserted: a loaded
    # machine would break a wall-clock bound.
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    tracker = Tracker(TrackingSettings(mode="online", init_timeout=3), tmp_path / "t", new_run_id(), {"x": 1})
    assert tracker.mode == "offline" and tracker.active
    tracker.finish()
    # And through training: the run finishes, its curves kept offline for `wandb sync`.
    assert train(tiny, tmp_path / "run", "wandb.mode=online", "wandb.init_timeout=3", "train.epochs=1") == 0
    assert "logging offline instead" in caplog.text
    assert offline_runs(tmp_path / "run") and (tmp_path / "run" / "summary.json").is_file()


def test_no_api_key_goes_offline_with_a_warning(tmp_path, caplog):
    tracker = Tracker(TrackingSettings(mode="online"), tmp_path / "t", new_run_id(), {"wandb": {"mode": "online"}})
    assert tracker.mode == "offline"
    assert "no API key" in caplog.text
    tracker.finish()
    # The run's W&B config says what was asked for and what was used.
    [state] = inspect(offline_runs(tmp_path / "t")[0], "--summary")
    assert state["config"]["wandb"]["mode"] == "online" and state["config"]["wandb_mode_used"] == "offline"


def test_wandb_dying_mid_run_never_reaches_training(tmp_path, caplog):
    tracker = Tracker(TrackingSettings(mode="offline"), tmp_path / "t", new_run_id(), {})
    tracker.log_epoch({"epoch": 1, "test_acc": 0.5})
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    core = [int(c) for c in children if "wandb-core" in Path(f"/proc/{c}/cmdline").read_text()]
    assert core, "no wandb-core service process found"
    for pid in core:
        os.kill(pid, signal.SIGKILL)
    for epoch in (2, 3):
        tracker.log_epoch({"epoch": epoch, "test_acc": 0.6})  # must not raise
    tracker.log_summary({"selected": {"test_acc": 1, "test_qwk": 1, "epoch": 1}, "selected_on": "final",
                         "final": {"test_acc": 1, "test_qwk": 1},
                         "majority_baseline": 0.5, "epochs_completed": 3, "confusion_matrix": [[1]]}, None)
    tracker.finish()
    assert not tracker.active and "tracking stops here, training goes on" in caplog.text


def test_evaluate_logs_an_eval_run_beside_its_training_run(tiny, tmp_path):
    """evaluate --wandb offline: an eval run (job_type eval) in the training run's group, its metrics and
    intervals in the summary under the split's name, the confusion matrix, the arm and split as tags."""
    from dr_resnet.training.evaluate import main as evaluate_main

    run_dir = tmp_path / "run"
    assert train(tiny, run_dir, "train.epochs=1", "wandb.group=sweep-b") == 0  # trained without W&B
    out = tmp_path / "eval"
    assert evaluate_main(["--checkpoint", str(run_dir / "checkpoint_best.pt"), "--data-root", str(tiny), "--out", str(out),
                          "--device", "cpu", "--workers", "0", "--resamples", "200", "--wandb", "offline"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    [folder] = offline_runs(out)
    records = inspect(folder)
    record = next(r for r in records if r.get("type") == "run")["run"]
    assert record["job_type"] == "eval" and record["run_group"] == "sweep-b" and record["display_name"] == "run-eval-test"
    assert {"resnet18_scratch", "split-test", "seed0"} <= set(record["tags"])
    [state] = inspect(folder, "--summary")
    assert state["summary"]["test/qwk"] == pytest.approx(metrics["qwk"])
    assert state["summary"]["test/qwk_low"] == pytest.approx(metrics["intervals"]["qwk"]["low"])
    assert state["summary"]["test/num_samples"] == metrics["num_samples"] == 9
    assert "confusion_matrix_table" in state["summary"] and state["config"]["evaluation"]["split"] == "test"
