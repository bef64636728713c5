"""Runs that survive: stopped by a signal or killed at any moment, they resume mid-epoch and end bit for bit
equal to a straight run; bad numbers, damaged checkpoints, failed writes and unreadable images stop them
with one clear message. Real torchrun (gloo, 2 processes), real signals and kills, real files."""

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dr_resnet.training import checkpoint, train
from dr_resnet.training.train import main

from helpers import (
    REPO,
    assert_same_training_state,
    demo_args,
    preprocessed_dataset,
    without_timing,
)
from helpers import metrics_rows as rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return preprocessed_dataset(tmp_path_factory.mktemp("resume"), 40, 13, seed=11, size=48)


def args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """Batch 2 of 40 images: 10 steps an epoch in 2 processes (20 in one), with a data worker each."""
    return demo_args(data, run_dir, *extra, batch_size=2)


def start(nproc: int, argv: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "dr_resnet.train", *argv]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-5000:]
    return log.read_text()


def assert_bitwise_equal_runs(a: Path, b: Path) -> None:
    assert_same_training_state(a, b)
    sa, sb = checkpoint.load(a / "checkpoint_last.pt"), checkpoint.load(b / "checkpoint_last.pt")
    assert sa["epoch"] == sb["epoch"] == 2 and sb["position"] == {}
    assert sa["scheduler"] == sb["scheduler"]
    assert [r["epoch"] for r in rows(b)] == [1, 2]  # every epoch exactly once


def straight(data: Path, base: Path, *extra: str) -> Path:
    run_dir = base / "run"
    finish(start(2, args(data, run_dir, "train.checkpoint_every_minutes=0", *extra), base / "log"), base / "log")
    return run_dir


@pytest.fixture(scope="module")
def straight_random(data, tmp_path_factory) -> Path:
    return straight(data, tmp_path_factory.mktemp("straight_random"))


@pytest.fixture(scope="module")
def straight_balanced(data, tmp_path_factory) -> Path:
    return straight(data, tmp_path_factory.mktemp("straight_balanced"), "train.sampler=balanced")


def wait_for_line(log: Path, text: str, count: int = 1, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"no {count} x {text!r} in {log}:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)  # another process's output: nothing to synchronise with


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun's agent, its training processes, their data workers)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            todo += [int(c) for c in (task / "children").read_text().split()] if (task / "children").exists() else []
    return found


@pytest.mark.slow
def test_sigterm_stops_mid_epoch_and_the_resumed_run_is_bitwise_a_straight_one(data, straight_random, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    agent = start(2, args(data, run_dir, "train.checkpoint_every_minutes=0"), log)
    wait_for_line(log, "epoch 1/2  train loss")
    wait_for_line(log, "epoch 2/2:")  # the second epoch's progress bar: its steps have begun
    os.kill(agent.pid, signal.SIGTERM)  # what srun passes on at a requeue; torchrun passes it to both processes
    agent.wait(timeout=120)
    text = log.read_text()
    assert text.count("stopped by SIGTERM in epoch 2 after step") == 2, text[-3000:]  # both ranks, same step
    position = checkpoint.load(run_dir / "checkpoint_last.pt")["position"]
    assert position["epoch"] == 1 and 0 < position["step"] < 10 and position["world_size"] == 2
    assert position["images"] == position["step"] * 2 * 2 and len(position["ranks"]) == 2
    assert checkpoint.load(run_dir / "checkpoint_prev.pt")["epoch"] == 1  # the epoch's end, kept
    assert [r["epoch"] for r in rows(run_dir)] == [1]
    one_process = tmp_path / "one"
    shutil.copytree(run_dir, one_process)

    text = finish(start(2, args(data, run_dir, "train.checkpoint_every_minutes=0"), tmp_path / "second.log"),
                  tmp_path / "second.log")
    assert f"in epoch 2 after step {position['step']} of 10" in text
    assert_bitwise_equal_runs(straight_random, run_dir)

    # The same checkpoint resumed by one process: the rest of the epoch, shared out anew; close, not bitwise.
    assert main(args(data, one_process, "train.checkpoint_every_minutes=0", "data.workers=0")) == 0
    log_text = (one_process / "train.log").read_text()
    assert "written by 2 process(es) in the middle of epoch 2; 1 continue it" in log_text
    assert [r["epoch"] for r in rows(one_process)] == [1, 2]
    assert without_timing(rows(one_process))[0] == without_timing(rows(straight_random))[0]


@pytest.mark.slow
def test_with_train_ema_a_run_stopped_mid_epoch_resumes_bitwise_average_included(data, tmp_path):
    """The weight average and its count of updates (a Python int while training) are saved mid-epoch and go
    on exactly: the resumed run's average equals the straight run's, tensor for tensor."""
    ema = ("train.ema=0.9", "train.checkpoint_every_minutes=0")
    (tmp_path / "straight").mkdir()
    reference = straight(data, tmp_path / "straight", "train.ema=0.9")
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    agent = start(2, args(data, run_dir, *ema), log)
    wait_for_line(log, "epoch 1/2  train loss")
    wait_for_line(log, "epoch 2/2:")
    os.kill(agent.pid, signal.SIGTERM)
    agent.wait(timeout=120)
    stopped = checkpoint.load(run_dir / "checkpoint_last.pt")
    position = stopped["position"]
    assert position["epoch"] == 1 and 0 < position["step"] < position["steps"] == 10, log.read_text()[-3000:]
    assert int(stopped["ema"]["n_averaged"]) == 10 + position["step"]  # one update after every step so far

    finish(start(2, args(data, run_dir, *ema), tmp_path / "second.log"), tmp_path / "second.log")
    assert_bitwise_equal_runs(reference, run_dir)  # the average too (helpers.assert_same_training_state)
    final = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert int(final["ema"]["n_averaged"]) == 20
    counts = {k: v for k, v in final["model"].items() if not v.is_floating_point()}  # BatchNorm's batches seen
    assert counts and all(torch.equal(final["ema"][f"module.{k}"], v) for k, v in counts.items())  # copied, not averaged


@pytest.mark.slow
def test_killed_at_random_moments_it_ends_bitwise_a_straight_run(data, straight_balanced, tmp_path):
    """kill -9 of every process (agent, training processes, data workers), three times, with a checkpoint
    after every step: whatever was being written, the run continues from the last complete checkpoint."""
    run_dir = tmp_path / "run"
    argv = args(data, run_dir, "train.sampler=balanced", "train.checkpoint_every_minutes=1e-9")
    moments = random.Random(0)
    written = 0
    for attempt in range(3):
        log = tmp_path / f"attempt{attempt}.log"
        agent = start(2, argv, log)
        written += moments.randint(1, 4)
        wait_for_line(run_dir / "train.log" if attempt else log, "checkpoint in epoch", written)
        time.sleep(moments.uniform(0, 0.3))  # anywhere in a step, a checkpoint write or an evaluation
        tree = process_tree(agent.pid)
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        agent.wait()
        assert len(tree) >= 5  # agent, 2 training processes, their data workers
    text = finish(start(2, argv, tmp_path / "last.log"), tmp_path / "last.log")
    assert "resumed" in text
    assert_bitwise_equal_runs(straight_balanced, run_dir)
    assert not list(run_dir.glob(".*.tmp"))


def test_damaged_checkpoints_fall_back_to_the_previous_one_or_say_what_to_delete(data, tmp_path, capfd, monkeypatch):
    run_dir = tmp_path / "run"
    one = ["data.workers=0", "train.batch_size=8"]
    assert main(args(data, run_dir, *one, "train.epochs=1")) == 0
    assert not (run_dir / "checkpoint_prev.pt").exists()
    # Extended by an epoch, it keeps epoch 1's checkpoint as checkpoint_prev.pt while it trains, and drops it
    # once it has finished (checkpoint_last.pt stays: extending the run needs it).
    epoch_1 = tmp_path / "epoch1.pt"
    with monkeypatch.context() as patch:
        real = train.finish

        def finish(run, tracker):
            shutil.copyfile(run.run_dir / "checkpoint_prev.pt", epoch_1)
            return real(run, tracker)
        patch.setattr(train, "finish", finish)
        assert main(args(data, run_dir, *one, "train.epochs=2")) == 0
    assert checkpoint.load(epoch_1)["epoch"] == 1
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_best.pt", "checkpoint_last.pt"]
    # A run stopped after epoch 2 of more (preempted between epochs) holds both, and a damaged last one...
    shutil.copyfile(epoch_1, run_dir / "checkpoint_prev.pt")
    last = run_dir / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a disk that lost the end of the file
    capfd.readouterr()
    assert main(args(data, run_dir, *one, "train.epochs=3")) == 0
    err = capfd.readouterr().err
    assert f"cannot resume from {last}" in err and "resuming from the previous checkpoint" in err
    assert "resumed" in err and "after epoch 1" in err and "Traceback" not in err
    assert (run_dir / "checkpoint_last.pt.damaged").is_file()
    assert [r["epoch"] for r in rows(run_dir)] == [1, 2, 3] and checkpoint.load(last)["epoch"] == 3
    # Neither usable: one message naming both files and the way out, exit code 2, nothing trained.
    for name in ("checkpoint_last.pt", "checkpoint_prev.pt"):
        (run_dir / name).write_bytes(b"not a checkpoint")
    assert main(args(data, run_dir, *one, "train.epochs=4")) == 2
    err = capfd.readouterr().err
    assert "no usable checkpoint to resume from" in err and "checkpoint_last.pt (" in err and "checkpoint_prev.pt (" in err
    assert "Delete these files" in err and "Traceback" not in err and "epoch 4/4" not in err


def test_a_failed_checkpoint_write_stops_with_one_message_and_keeps_the_previous_one(data, tmp_path):
    run_dir = tmp_path / "run"
    assert main(args(data, run_dir, "data.workers=0", "train.batch_size=8", "train.epochs=1")) == 0
    before = {name: (run_dir / name).read_bytes() for name in ("checkpoint_last.pt", "checkpoint_best.pt")}

    def small_files_only():  # a real failed write: the kernel refuses to grow a file past 20 MB (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))

    result = subprocess.run([sys.executable, "-m", "dr_resnet.train",
                             *args(data, run_dir, "data.workers=0", "train.batch_size=8", "train.epochs=2")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files_only)
    assert result.returncode == 2, result.stderr[-3000:]
    # checkpoint_best.pt is written first (a resume point always has its selected epoch's best checkpoint).
    assert f"cannot write the checkpoint {run_dir / 'checkpoint_best.pt'}: File too large" in result.stderr
    assert "is unchanged" in result.stderr and "Traceback" not in result.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not list(run_dir.glob(".*.tmp"))


def test_a_non_finite_step_stops_the_run_and_saves_nothing_after_it(data, tmp_path, capfd):
    run_dir = tmp_path / "run"
    # lr 1e30 (auto: the scaling rule's, 1e30 x 4 / 4): the first step is finite, the weights it leaves overflow
    # the second one.
    assert main(args(data, run_dir, "data.workers=0", "train.batch_size=4", "train.epochs=1", "train.lr=auto",
                     "train.lr_base_scratch=1e30", "train.lr_base_batch=4", "train.scheduler=none",
                     "train.checkpoint_every_minutes=1e-9")) == 2
    err = capfd.readouterr().err
    assert "epoch 1, step 2: non-finite loss or gradient (loss nan, learning rate 1e+30)" in err
    assert "train.lr (now auto: 1e+30)" in err
    assert "the last checkpoint is untouched" in err and "train.clip_grad_norm" in err and "Traceback" not in err
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert state["position"]["step"] == 1  # the last good step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skipped_non_finite_steps_are_counted_and_too_many_stop_the_run(data, tmp_path, capfd):
    diverging = ["data.workers=0", "train.batch_size=4", "train.lr=1e30", "train.scheduler=none", "train.nonfinite=skip"]
    run_dir = tmp_path / "skip"
    assert main(args(data, run_dir, *diverging, "train.nonfinite_skip_limit=1")) == 0
    # 10 steps an epoch: after the first, every step overflows and is left out; the weights stay finite.
    assert [r["nonfinite_steps"] for r in rows(run_dir)] == [9, 10]
    state = checkpoint.load(run_dir / "checkpoint_last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    capfd.readouterr()
    assert main(args(data, tmp_path / "limit", *diverging)) == 2
    assert "epoch 1: 9 of 10 steps had a non-finite loss or gradient" in capfd.readouterr().err


def test_an_image_that_became_unreadable_is_named_with_its_row(data, tmp_path, capfd):
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    name = (broken / "train_img.csv").read_text().splitlines()[2]
    image = next((broken / "images").glob(f"{name}.*"))
    image.write_bytes(image.read_bytes()[:200])  # truncated after the split was checked
    # Every image once an epoch (the progressive sampler draws with replacement and might skip this one).
    assert main(args(broken, tmp_path / "run", "train.batch_size=8", "train.epochs=1", "train.sampler=random")) == 2
    err = capfd.readouterr().err
    # Found by the check at start (data/check.py), before any step: named with its row and split.
    assert f"{image} (row 3, split 'train'): cannot be decoded" in err
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_a_resumed_momentum_buffer_is_laid_out_like_its_parameter_and_fused_sgd_updates_right():
    """A checkpoint written with NCHW weights resumed into a channels_last model (a CPU checkpoint on CUDA,
    or train.channels_last changed): load_state_dict keeps the buffer's NCHW strides, and fused SGD then
    computes a wrong update on CPU (a crash on CUDA). After loading, each buffer is laid out like its
    parameter and the fused step equals the foreach step."""
    from dr_resnet.training.components import load_optimizer_state, sgd

    torch.manual_seed(0)
    writer = torch.nn.Conv2d(3, 8, 3)
    opt = sgd(writer.parameters(), 0.1, 0.9, 1e-4, fused=False)
    writer(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    saved = opt.state_dict()
    grad = torch.randn_like(writer.weight)

    def step(fused: bool) -> torch.Tensor:
        model = torch.nn.Conv2d(3, 8, 3)
        model.load_state_dict(writer.state_dict())
        model = model.to(memory_format=torch.channels_last)
        optimizer = sgd(model.parameters(), 0.1, 0.9, 1e-4, fused=fused)
        load_optimizer_state(optimizer, saved)
        buffer = optimizer.state[model.weight]["momentum_buffer"]
        assert buffer.stride() == model.weight.stride() and buffer.is_contiguous(memory_format=torch.channels_last)
        model.weight.grad = grad.contiguous(memory_format=torch.channels_last)
        model.bias.grad = torch.zeros_like(model.bias)
        optimizer.step()
        return model.weight.detach().clone()

    torch.testing.assert_close(step(fused=True), step(fused=False), rtol=0, atol=1e-6)
