"""python -m dr_resnet.pretrain end to end at 32 px: the backbone file that model.weights loads strictly, the
record of its pool, two gloo ranks, a resume bit for bit after a stop or a kill, a pool that shares photos with
the test split refused, a collapse stopped with one line. Real processes, files and signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dr_resnet.model.resnet import WeightsMismatchError, build_resnet
from dr_resnet.pretraining.run import main
from dr_resnet.training import checkpoint

from helpers import REPO, preprocessed_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return preprocessed_dataset(tmp_path_factory.mktemp("pretrain"), 40, 13, seed=5, size=32)


def args(data: Path, run_dir: Path, *extra: str, epochs: int = 1) -> list[str]:
    """A ResNet18 on 32 px photos, small heads, batch 8 a process, CPU."""
    return [f"data.root={data}", "data.image_size=32", "data.workers=0", "train.device=cpu", f"output.dir={run_dir}",
            "model.depth=18", f"pretrain.epochs={epochs}", "pretrain.batch_size=8", "pretrain.hidden_dim=64",
            "pretrain.projection_dim=32", "pretrain.warmup_epochs=0", *extra]


def start(nproc: int, argv: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "dr_resnet.pretrain", *argv]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_line(log: Path, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in {log}:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)  # another process's output: nothing to synchronise with


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_backbones(a: Path, b: Path) -> None:
    first, second = checkpoint.load(a / "backbone.pt")["model"], checkpoint.load(b / "backbone.pt")["model"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    timing = {"photos_per_s", "epoch_seconds"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows(a)] == \
           [{k: v for k, v in r.items() if k not in timing} for r in rows(b)]


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_epoch") / "run"
    assert main(args(data, run_dir)) == 0
    return run_dir


def test_the_backbone_loads_strictly_into_its_depth_and_records_what_it_learned_from(one_epoch, data, tmp_path):
    saved = checkpoint.load(one_epoch / "backbone.pt")
    reference = build_resnet(18).state_dict()
    assert set(saved["model"]) == set(reference) - {"fc.weight", "fc.bias"}  # everything but the classifier
    assert saved["initialisation"] == "ssl"
    record = json.loads((one_epoch / "backbone.json").read_text())
    assert record == saved["pretraining"]
    assert record["initialisation"] == "ssl" and record["depth"] == 18 and record["method"] == "byol"
    assert record["images"] == 40 and [s["images"] for s in record["pool"]] == [40]  # the whole training split
    assert record["epochs"] == 1 and record["finished"] and record["cpu_hours"] > 0 and record["gpu_hours"] == 0
    (row,) = rows(one_epoch)
    assert row["photos"] == 40 // 8 * 8 and 0 < row["loss"] <= 8  # 2 - 2 cos per view order, summed over both
    assert row["spread_x_sqrt_d"] > 0.1  # not collapsed
    assert (one_epoch / "pretraining.png").stat().st_size > 0
    assert not (one_epoch / "checkpoint_prev.pt").exists() and (one_epoch / "checkpoint_last.pt").exists()

    loaded = build_resnet(18, weights=one_epoch / "backbone.pt")
    for key, value in saved["model"].items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(WeightsMismatchError, match="ResNet18 weights; model.depth=50"):
        build_resnet(50, weights=one_epoch / "backbone.pt")
    alone = tmp_path / "backbone.pt"  # copied without its record: it would be named and trained as pretrained
    shutil.copy(one_epoch / "backbone.pt", alone)
    with pytest.raises(WeightsMismatchError, match="a backbone of initialisation ssl, but the record beside it"):
        build_resnet(18, weights=alone)


def test_fine_tuning_from_the_backbone_is_an_ssl_arm(one_epoch, data, tmp_path):
    from dr_resnet.training.train import main as train

    run_dir = tmp_path / "fine"
    assert train(["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}", "data.image_size=32",
                  "train.batch_size=8", "train.epochs=1", "data.workers=0", "train.device=cpu", f"output.dir={run_dir}",
                  f"model.weights={one_epoch / 'backbone.pt'}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["initialisation"] == "ssl"
    assert summary["pretraining"]["config_hash"] == json.loads((one_epoch / "backbone.json").read_text())["config_hash"]
    assert "(ssl, linear scaling)" in (run_dir / "train.log").read_text()  # the ssl arms' learning-rate rule


def test_a_pool_that_is_the_test_split_is_refused_in_one_line(data, tmp_path, capfd):
    run_dir = tmp_path / "run"
    assert main(args(data, run_dir, f"pretrain.pools={data}:test")) == 2
    err = capfd.readouterr().err.strip().splitlines()
    (refusal,) = [line for line in err if " ERROR " in line]  # one line, naming the entry and what it shares
    assert f"{data}:test shares 13 image(s)" in refusal and "pretrain.pools" in refusal, refusal
    assert not (run_dir / "backbone.pt").exists()


def test_a_collapse_stops_the_run_with_one_line(data, tmp_path, capfd):
    run_dir = tmp_path / "run"
    # Above any healthy spread x sqrt(d) (about 1): the first epoch counts as collapsed.
    assert main(args(data, run_dir, "pretrain.collapse_below=5")) == 2
    err = capfd.readouterr().err
    assert err.count("pretraining collapsed at step") == 1, err
    assert not (run_dir / "backbone.pt").exists() and (run_dir / "pretraining.png").exists()


def test_pretraining_starts_from_none_or_imagenet_only(data, tmp_path, capfd):
    assert main(args(data, tmp_path / "run", "model.weights=/some/file.pt")) == 2
    assert "pretraining starts from none" in capfd.readouterr().err


@pytest.mark.slow
def test_two_gloo_ranks_pretrain_together(data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    process = start(2, args(data, run_dir), log)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "torch has no SyncBatchNorm on CPU" in text
    (row,) = rows(run_dir)
    assert row["photos"] == 40 // 16 * 16  # both ranks' photos, each once
    assert json.loads((run_dir / "backbone.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_stopped_mid_epoch_or_killed_it_resumes_bit_for_bit(data, tmp_path):
    straight = tmp_path / "straight"
    assert main(args(data, straight, "train.checkpoint_every_minutes=0", epochs=2)) == 0

    # SIGTERM inside epoch 2: a checkpoint at the next step, then the rest of the run from it.
    stopped, log = tmp_path / "stopped", tmp_path / "stopped.log"
    command = [sys.executable, "-m", "dr_resnet.pretrain", *args(data, stopped, "train.checkpoint_every_minutes=0",
                                                                  "pretrain.batch_size=2", epochs=2)]
    straight_small = tmp_path / "straight_small"
    assert main(args(data, straight_small, "train.checkpoint_every_minutes=0", "pretrain.batch_size=2", epochs=2)) == 0
    process = subprocess.Popen(command, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_for_line(log, "pretrain 2/2")  # the second epoch's progress bar: its steps have begun
    os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=120)
    position = checkpoint.load(stopped / "checkpoint_last.pt")["position"]
    assert position["epoch"] == 1 and 0 < position["step"] < 20, log.read_text()[-2000:]
    assert main(args(data, stopped, "train.checkpoint_every_minutes=0", "pretrain.batch_size=2", epochs=2)) == 0
    assert f"after step {position['step']}" in (stopped / "train.log").read_text()
    assert_same_backbones(straight_small, stopped)

    # SIGKILL after epoch 1's checkpoint: nothing to write on the way out; the resume starts at epoch 2.
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    process = subprocess.Popen([sys.executable, "-m", "dr_resnet.pretrain",
                                *args(data, killed, "train.checkpoint_every_minutes=0", epochs=2)],
                               cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_for_line(log, "pretraining epoch 1/2  loss")
    process.kill()
    process.wait(timeout=60)
    assert checkpoint.load(killed / "checkpoint_last.pt")["epoch"] == 1  # the kill landed inside epoch 2
    assert not (killed / "backbone.pt").exists()
    assert main(args(data, killed, "train.checkpoint_every_minutes=0", epochs=2)) == 0
    assert_same_backbones(straight, killed)
