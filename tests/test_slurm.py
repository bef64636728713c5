"""Against a real SLURM: the project's own slurm/local_cluster.sh starts two emulated nodes on this
machine (it installs Debian's slurm, munge and mariadb if needed). Skipped, with the reason, only where
that cannot run: no root or no apt-get."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from dr_resnet.model.resnet import imagenet_cache_path
from dr_resnet.training import checkpoint

from helpers import (
    REPO,
    preprocessed_dataset,
)

OPT_IN = "DR_RESNET_SLURM_TESTS"  # the tests that change this machine's system files run only when it is 1
SCRIPTS = [REPO / "slurm" / "train.sbatch", REPO / "slurm" / "sweep.sh", REPO / "slurm" / "local_cluster.sh"]
pytestmark = pytest.mark.slow


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; CI installs it)")
    result = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"the SLURM tests install SLURM, munge and MariaDB and write /etc/slurm and /etc/hosts (backed up, "
                    f"put back at the end): set {OPT_IN}=1 to run them (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    start = subprocess.run(["bash", str(SCRIPTS[2]), "start", "2"], capture_output=True, text=True, timeout=900)
    assert start.returncode == 0, start.stdout + start.stderr
    yield
    subprocess.run(["bash", str(SCRIPTS[2]), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return preprocessed_dataset(tmp_path_factory.mktemp("slurm_data"), 24, 9, seed=6, size=32)


# CPU processes (gloo) also where the machine has a GPU: the emulated nodes share this one machine.
TINY = ["data.image_size=32", "train.batch_size=4", "data.workers=0", "train.warmup_epochs=0", "train.device=cpu"]


def epochs_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def job_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else ""


def wait_for_file(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():  # another process writes it: nothing to synchronise with but the file
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds} s"
        time.sleep(0.2)


def test_an_array_sweep_runs_two_arms_and_two_seeds_across_two_nodes(cluster, data, tmp_path, monkeypatch):
    """Two arms x two seeds as one SLURM job array (two tasks at a time), each run on both nodes, in its
    own folder, with its own seed; the report lists every run."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # jobs inherit the environment
    path = imagenet_cache_path(50)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet50().state_dict(), path)
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "launch.sweep", "--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor",
               "slurm", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "0:20:00", "--out",
               str(out), "--runs", "resnet18_scratch,resnet50_pretrained", "--seeds", "0,1", "--array-parallelism", "2",
               f"data.root={data}", "train.epochs=1", *TINY]
    submitted = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)  # submits, returns
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    submitted_runs = json.loads((out / "sweep.json").read_text())["runs"]
    first = {name: entry["job_id"] for name, entry in submitted_runs.items()}
    # The same command again while the array is queued or running (a launcher that lost its terminal): the
    # jobs are followed, never submitted a second time into the same folders.
    result = subprocess.run([*command, "--wait"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("followed, not submitted again") + result.stdout.count("finished earlier") == 4
    assert "Submitted" not in result.stdout and " log " not in result.stdout
    manifest = json.loads((out / "sweep.json").read_text())
    assert {n: e["job_id"] for n, e in manifest["runs"].items() if "job_id" in e}.items() <= first.items()
    array_ids = {first[name].split("_")[0] for name in manifest["runs"]}
    assert len(manifest["runs"]) == 4 and len(array_ids) == 1  # one array job
    for arm in ("resnet18_scratch", "resnet50_pretrained"):
        for seed in (0, 1):
            name = f"{arm}_seed{seed}"
            summary = json.loads((out / arm / f"seed{seed}" / "summary.json").read_text())
            assert summary["world_size"] == 2 and summary["num_test_samples"] == 9 and summary["epochs_completed"] == 1
            assert job_state(first[name]) == "COMPLETED"
            assert "2 process(es)" in Path(submitted_runs[name]["log"]).read_text()
    nodes = {subprocess.run(["sacct", "-n", "-X", "-P", "-j", first[a], "-o", "NodeList"],
                            capture_output=True, text=True).stdout.strip() for a in manifest["runs"]}
    assert nodes == {"n[1-2]"}
    assert "| resnet50_pretrained/seed1 | done | 1/1 |" in (out / "results.md").read_text()


def test_an_interrupted_array_task_is_requeued_and_finishes_every_epoch_once(cluster, data, tmp_path, monkeypatch):
    """Two runs as one job array (what launch.sweep --array submits); one task is preempted: it alone is
    requeued, resumes and logs every epoch once under the same W&B run; the other finishes untouched."""
    import submitit

    from launch.sweep import wait_for
    from launch.task import TrainTask

    monkeypatch.setenv("WANDB_MODE", "offline")
    runs = [tmp_path / "run0", tmp_path / "run1"]
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    # Over 10 minutes, or submitit counts the signal as a timeout rather than a preemption.
    executor.update_parameters(nodes=1, tasks_per_node=2, cpus_per_task=1, timeout_min=30, name="interrupt")
    with executor.batch():
        jobs = [executor.submit(TrainTask(["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}", *TINY,
                                           "train.epochs=4", f"output.dir={run_dir}"])) for run_dir in runs]
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array
    wait_for_file(runs[0] / "checkpoint_last.pt", 300)
    jobs[0]._interrupt()  # preemption: submitit's handler calls checkpoint() and requeues the task
    for job in jobs:
        wait_for(job)
    for run_dir in runs:
        assert epochs_logged(run_dir) == [1, 2, 3, 4]
        assert checkpoint.load(run_dir / "checkpoint_last.pt")["epoch"] == 4
    logs = ["".join(Path(str(p).replace("%t", "0")).read_text() for p in (job.paths.stdout, job.paths.stderr))
            for job in jobs]
    assert "this job is preempted" in logs[0] and "Requeued job" in logs[0] and "resumed" in logs[0]
    assert "preempted" not in logs[1] and "resumed" not in logs[1]
    # One W&B run across the requeue: every offline folder carries the checkpoint's run id.
    run_id = checkpoint.load(runs[0] / "checkpoint_last.pt")["wandb_id"]
    folders = sorted((runs[0] / "wandb").glob("offline-run-*"))
    assert len(folders) >= 2 and all(f.name.endswith(run_id) for f in folders)


def test_sbatch_script_runs_two_nodes_and_requeues_on_usr1(cluster, data, tmp_path):
    """Submitted with two tasks a node (the script still starts one torchrun a node), the dataset staged to
    node-local storage; at USR1 the step's tasks get SIGTERM (srun would have killed them), the leg ends with a
    checkpoint written on the signal, and the next leg resumes exactly there."""
    import re

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "1"}
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "2", "--cpus-per-task", "1",
         "--output", str(tmp_path / "slurm-%j.out"),
         str(SCRIPTS[0]), "--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}", *TINY,
         "train.epochs=4", f"output.dir={run_dir}", f"data.stage_to={tmp_path / 'node_local'}"],
        env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    wait_for_file(run_dir / "checkpoint_last.pt", 300)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)  # what --signal=B:USR1@120 sends
    deadline = time.monotonic() + 300
    while job_state(job_id) != "COMPLETED":
        assert time.monotonic() < deadline and job_state(job_id) not in ("FAILED", "CANCELLED", "TIMEOUT")
        time.sleep(1)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "USR1: the time limit is near; requeueing" in log and "(restart 1)" in log and "resumed" in log
    assert re.search(rf"SIGTERM to the tasks of job {job_id}'s steps: {job_id}\.\d+\n", log)  # training's (staging's ended)
    # data.stage_to: staged in a step of its own, one task a node (both emulated nodes share this disk: one
    # copies, the other waits on the lock and reuses it), which the training step's leaders find recorded
    # without listing the source again; the requeued leg finds it unchanged.
    assert "data.stage_to: staged" in log and "already holds an unchanged copy" in log
    assert "as this job's staging step recorded" in log
    assert len([p for p in (tmp_path / "node_local").iterdir() if not p.name.startswith(".")]) == 1
    stopped = re.search(r"stopped by SIGTERM (in epoch \d+ after step \d+ of \d+|after epoch \d+);", log)
    assert stopped, log[-3000:]  # the leg wrote its checkpoint on the signal...
    assert re.search(r"resumed \S+checkpoint_last\.pt " + stopped.group(1), log), log[-3000:]  # ...and the next went on there
    assert "gloo uses interface" in log  # two nodes: gloo told which interface reaches the master
    assert epochs_logged(run_dir) == [1, 2, 3, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_test_samples"] == 9


def test_an_array_task_of_the_batch_script_alone_checkpoints_and_requeues_on_usr1(cluster, data, tmp_path):
    """sbatch --array=0-1 slurm/train.sbatch: USR1 to the batch shell of the task that keeps the array's id as
    its SLURM_JOB_ID (an id that also names the other task): that task's steps get SIGTERM (srun would have
    killed them), its leg ends with a checkpoint written on the signal, and it alone is requeued and resumes
    exactly there; the other task is never signalled, never requeued, and trains to its end."""
    import re

    env = {**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "1", "PYTHONPATH": str(REPO)}
    array_id = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--nodes", "1", "--cpus-per-task", "1", "--chdir", str(tmp_path),
         "--output", str(tmp_path / "slurm-%A_%a.out"), str(SCRIPTS[0]), "--config", str(REPO / "configs" / "demo.yaml"),
         f"data.root={data}", *TINY, "train.epochs=4", "output.dir="],
        env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    # With no output.dir, each task trains in runs/demo-<its SLURM_JOB_ID>, the same folder after a requeue.
    wait_for_file(tmp_path / "runs" / f"demo-{array_id}" / "checkpoint_last.pt", 300)
    tasks = dict(line.split("|") for line in subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", array_id, "-o", "JobIDRaw,JobID"], capture_output=True, text=True,
        check=True).stdout.split())
    signalled = tasks[array_id]  # e.g. 1234_1: the task whose SLURM_JOB_ID is the array's
    other = f"{array_id}_{1 - int(signalled.split('_')[1])}"
    subprocess.run(["scancel", "--signal=USR1", "--batch", signalled], check=True)  # what --signal=B:USR1@120 sends
    deadline = time.monotonic() + 300
    while {job_state(signalled), job_state(other)} != {"COMPLETED"}:
        assert time.monotonic() < deadline
        assert not {job_state(signalled), job_state(other)} & {"FAILED", "CANCELLED", "TIMEOUT"}
        time.sleep(1)
    log, other_log = ((tmp_path / f"slurm-{task}.out").read_text() for task in (signalled, other))
    stopped = re.search(r"stopped by SIGTERM (in epoch \d+ after step \d+ of \d+|after epoch \d+);", log)
    assert stopped, log[-3000:]  # the leg wrote its checkpoint on the signal, at a step boundary...
    assert "forcing job termination" not in log and "Killed" not in log  # (srun answers SIGTERM with SIGKILL)
    assert re.search(r"resumed \S+checkpoint_last\.pt " + stopped.group(1), log), log[-3000:]  # ...and went on there
    assert f"USR1: the time limit is near; requeueing job {signalled} " in log and "(restart 1)" in log
    assert re.search(rf"SIGTERM to the tasks of job {signalled}'s steps: {signalled}\.\d+\n", log), log[-3000:]
    # The other task: no signal, no requeue, every epoch in its first leg.
    assert "(restart 0)" in other_log and "(restart 1)" not in other_log, other_log[-3000:]
    assert not re.search("USR1|SIGTERM|stopped by|resumed|forcing job termination|CANCELLED", other_log), other_log[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(epochs_logged(run) == [1, 2, 3, 4] for run in runs)


def test_a_process_started_in_the_batch_script_runs_alone(cluster, data, tmp_path):
    """`python -m dr_resnet.train` straight in an sbatch script with --ntasks 2 (no srun): one process,
    at once, instead of waiting for a second rank that never comes."""
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\ncd {REPO}\nexec {sys.executable} -m dr_resnet.train --config "
                      f"{REPO / 'configs' / 'demo.yaml'} data.root={data} {' '.join(TINY)} train.epochs=1 "
                      f"output.dir={run_dir}\n")
    job_id = subprocess.run(["sbatch", "--parsable", "--ntasks", "2", "--cpus-per-task", "1", "--output",
                             str(tmp_path / "slurm-%j.out"), str(script)],
                            capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 240
    while job_state(job_id) != "COMPLETED":
        assert time.monotonic() < deadline and job_state(job_id) not in ("FAILED", "CANCELLED", "TIMEOUT"), \
            (tmp_path / f"slurm-{job_id}.out").read_text()
        time.sleep(1)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert f"launch: one process (started in SLURM job {job_id}'s batch script, not by srun: its 2 tasks" in log
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 1


def test_local_cluster_takes_back_its_database_account(cluster):
    """Another set-up left the accounting database's 'slurm' user with another password: the script
    resets it instead of waiting for a slurmdbd that cannot log in. Restarts the cluster (kept last)."""
    subprocess.run(["mariadb", "--socket=/run/mysqld/mysqld.sock", "-e",
                    "ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'set-by-someone-else'; FLUSH PRIVILEGES;"], check=True)
    start = subprocess.run(["bash", str(SCRIPTS[2]), "start", "2"], capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stderr
    assert "cluster 'localcluster' up: n1 idle" in start.stderr
    assert subprocess.run(["sacctmgr", "-n", "show", "cluster"], capture_output=True, text=True).returncode == 0
