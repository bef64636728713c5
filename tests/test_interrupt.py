"""A local sweep stopped by a signal to its launcher (Ctrl-C, a closed terminal, `timeout`, `kill`): every job
writes its checkpoint and ends, the launcher says so in one line and exits with 128 + the signal's number, no
process is left behind, and the same command resumes. A real launcher, submitit controllers, training
processes, fork servers and signals."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.interrupt import INTERRUPTED, STOP_WAIT_S

from helpers import REPO, preprocessed_dataset

pytestmark = pytest.mark.slow


def sweep_command(out: Path, data: Path, seeds: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "launch.sweep", "--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor",
            "local", "--runs", "resnet18_scratch", "--seeds", seeds, "--out", str(out), "--time", "20",
            f"data.root={data}", "data.image_size=32", "train.batch_size=4", "train.warmup_epochs=0",
            "data.val_fraction=0", *overrides]


def session_processes(session: int) -> list[int]:
    """The processes still running (not zombies) in a session: the launcher's, its jobs' and theirs."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def start_and_stop(command: list[str], logs: list[Path], signum: int, to_group: bool) -> tuple[int, str, str]:
    """Start the launcher in a session of its own, wait until every run has begun training (its train.log
    says which learning rate it trains at, just before its first step), send the signal (to the launcher, or
    to its whole group, as a terminal does), and return its exit code and output once it has ended."""
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not all(log.is_file() and "learning rate" in log.read_text() for log in logs):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.2)  # another process's log: nothing to wait on but the file
        (os.killpg if to_group else os.kill)(launcher.pid, signum)
        out, err = launcher.communicate(timeout=STOP_WAIT_S + 60)
        assert session_processes(launcher.pid) == []  # no job, training process, fork server or worker left
        return launcher.returncode, out, err
    finally:
        for pid in session_processes(launcher.pid):  # what the old launcher left running
            os.kill(pid, signal.SIGKILL)
        launcher.kill()


def test_sigterm_stops_every_local_job_at_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """`kill` or `timeout` to the launcher alone: it stops its two jobs (each with a data worker, so a fork
    server and a resource tracker) with SIGTERM; neither is requeued by submitit; both resume."""
    data = preprocessed_dataset(tmp_path, 96, 9, seed=4, size=32)
    out = tmp_path / "sweep"
    command = sweep_command(out, data, "0,1", "train.epochs=1", "data.workers=1")
    runs = [out / "resnet18_scratch" / f"seed{seed}" for seed in (0, 1)]
    code, stdout, stderr = start_and_stop(command, [run / "train.log" for run in runs], signal.SIGTERM, to_group=False)
    assert (code, stderr) == (143, INTERRUPTED + "\n"), stdout + stderr
    for run in runs:
        log = (run / "train.log").read_text()
        assert "stopped by SIGTERM in epoch 1 after step" in log and (run / "checkpoint_last.pt").is_file()
        assert not (run / "summary.json").exists()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    for run in runs:
        assert "resumed" in (run / "train.log").read_text().split("stopped by SIGTERM")[1]
        assert (run / "summary.json").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_the_terminals_signals_reach_the_jobs_too_and_still_stop_them_at_a_checkpoint(tmp_path, signum):
    """Ctrl-C and a closed terminal signal the terminal's whole foreground group, the jobs included: they
    leave it to the launcher, which stops them as it does at SIGTERM; no traceback, one line."""
    data = preprocessed_dataset(tmp_path, 48, 9, seed=4, size=32)
    run = tmp_path / "sweep" / "resnet18_scratch" / "seed0"
    command = sweep_command(tmp_path / "sweep", data, "0", "train.epochs=20", "data.workers=0")
    code, stdout, stderr = start_and_stop(command, [run / "train.log"], signum, to_group=True)
    assert (code, stderr) == (128 + signum, INTERRUPTED + "\n"), stdout + stderr
    assert "stopped by SIGTERM in epoch 1 after step" in (run / "train.log").read_text()
    assert (run / "checkpoint_last.pt").is_file()


def test_a_local_job_stopped_by_sigterm_is_not_requeued(tmp_path):
    """SIGTERM to one job (its controller, as `kill <job id>` does): the run writes its checkpoint and stops, and
    submitit does not start it again (it did: a local job's trainings restarted themselves); the launcher,
    left running, reports the run lost, which the same command resumes."""
    data = preprocessed_dataset(tmp_path, 48, 9, seed=4, size=32)
    run = tmp_path / "sweep" / "resnet18_scratch" / "seed0"
    command = sweep_command(tmp_path / "sweep", data, "0", "train.epochs=20", "data.workers=0")
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        job = int(launcher.stdout.readline().split("job ")[1].split()[0])  # "<run>: job <controller pid>  log ..."
        deadline = time.monotonic() + 300
        while not ((run / "train.log").is_file() and "learning rate" in (run / "train.log").read_text()):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.2)  # another process's log: nothing to wait on but the file
        os.kill(job, signal.SIGTERM)
        out, err = launcher.communicate(timeout=180)  # a requeued run would train its 20 epochs
    finally:
        for pid in session_processes(launcher.pid):
            os.kill(pid, signal.SIGKILL)
        launcher.kill()
    assert launcher.returncode == 1, out + err
    assert "resnet18_scratch_seed0: LOST" in err and "not requeued at SIGTERM" in err
    log = (run / "train.log").read_text()
    assert log.count("stopped by SIGTERM in epoch 1 after step") == 1 and "resumed" not in log
