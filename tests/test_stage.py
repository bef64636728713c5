"""data.stage_to: the node-local copy, made once a node outside any collective, locked on the target,
named by its manifest, checked for room, and cleaned up after failures (real files, real gloo processes)."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from dr_resnet.config import ConfigError
from dr_resnet.data import stage
from dr_resnet.data.stage import (
    LAST_USED,
    MANIFEST,
    StageError,
    check_room,
    clean,
    copy_name,
    manifest_of,
    memory_room,
    mount_of,
    release,
    stage_base,
    warn_if_network,
)
from dr_resnet.training.train import main as train_main

from helpers import REPO, demo_args

FILES = {"train.csv": "image,level\n", "images/a.jpg": "a" * 5000, "images/b.jpg": "b" * 300, "images/sub/c.jpg": "c"}


def source(base: Path, files: dict[str, str] = FILES) -> Path:
    root = base / "prepared"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(autouse=True)
def no_held_copies(monkeypatch):
    """Each test starts and ends holding no copy (the locks this process took are released), outside any
    SLURM job (a job's staging step records its copy)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    yield
    for target in list(stage._held):
        release(target)


# -- two processes of one launch: the leader copies, the other waits on the store ---------------------

def _stage_in_group(rank: int, port: int, scenario: str, root: str, out: str) -> None:
    import logging
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from dr_resnet.config import DataConfig
    from dr_resnet.training import components, distributed

    logging.basicConfig(filename=f"{out}/log{rank}", level=logging.INFO, force=True)
    distributed.WAIT_PROGRESS_S = 0.5
    if rank == 0:
        def slow(src: str, dst: str) -> None:  # a busy NFS: each file well past the group's 2 s timeout
            time.sleep(4)
            shutil.copy2(src, dst)

        def unreadable(src: str, dst: str) -> None:
            raise PermissionError(errno.EACCES, "Permission denied", src)
        stage._copy_file = unreadable if scenario == "fails" else slow
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=2))
    minutes = 1 / 60 if scenario == "deadline" else 120
    data = DataConfig(root=root, stage_to=f"{out}/local", stage_timeout_minutes=minutes)
    try:
        path = components.staged_root(data, local_rank=rank)
        together = distributed.all_reduce_sum(torch.ones(1)).item()  # the group outlived the copy
        result = {"path": str(path), "together": together}
    except Exception as exc:
        result = {"error": str(exc), "type": type(exc).__name__}
    Path(f"{out}/result{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_pair(tmp_path: Path, scenario: str) -> tuple[list[dict], list[str]]:
    root = source(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_stage_in_group, args=(port, scenario, str(root), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    results = [json.loads((tmp_path / f"result{r}").read_text()) for r in (0, 1)]
    return results, [(tmp_path / f"log{r}").read_text() if (tmp_path / f"log{r}").exists() else "" for r in (0, 1)]


@pytest.mark.slow
def test_a_copy_longer_than_the_process_groups_timeout_leaves_every_rank_waiting_on_the_store(tmp_path):
    """The leader's copy takes twice the group's timeout: the other rank waits on the store (saying so)
    instead of in a collective, reads the folder the leader names, and the group goes on."""
    results, logs = run_pair(tmp_path, "slow")
    assert results[0] == results[1], results
    staged = Path(results[1]["path"])
    assert results[1]["together"] == 2 and (staged / MANIFEST).is_file()
    assert staged.parent == tmp_path / "local" and (staged / "images" / "sub" / "c.jpg").read_text() == "c"
    assert "waiting for the copy of" in logs[1] and f"data.stage_to: staged {tmp_path / 'prepared'}" in logs[0]


@pytest.mark.slow
def test_a_failed_copy_stops_the_other_rank_with_the_leaders_line_and_a_late_one_at_its_deadline(tmp_path):
    """An unreadable source file on the leader: both ranks stop with one line naming it, no temporary
    left. A copy past data.stage_timeout_minutes: the waiting rank stops naming the key."""
    results, _ = run_pair(tmp_path / "fails", "fails")
    assert results[0]["type"] == "StageError" and results[1]["type"] == "NodeWorkError"
    assert results[0]["error"] == results[1]["error"] and "Permission denied" in results[1]["error"], results
    assert "\n" not in results[1]["error"] and not list((tmp_path / "fails" / "local").glob(".*.tmp"))
    results, _ = run_pair(tmp_path / "late", "deadline")
    assert results[1]["type"] == "NodeWorkError", results
    assert "did not end within data.stage_timeout_minutes=" in results[1]["error"]


# -- one node: locks, names, reuse --------------------------------------------------------------------

def _stage_slowly(root: str, stage_to: str, out: str, delay: float) -> None:
    def slow(src: str, dst: str) -> None:
        with open(f"{out}.files", "a") as f:
            f.write(dst + "\n")
        time.sleep(delay)
        shutil.copy2(src, dst)
    stage._copy_file = slow
    Path(out).write_text(stage.stage(root, stage_to, progress_s=0.2).said)


def test_two_jobs_at_once_copy_once_and_the_second_reuses_the_first_copy(tmp_path):
    """Two jobs on one node start together: the second waits on the copy's lock and reuses it; nothing is
    copied twice, and the copy keeps the files' modification times."""
    root = source(tmp_path)
    ctx = mp.get_context("spawn")
    first = ctx.Process(target=_stage_slowly, args=(str(root), str(tmp_path / "local"), str(tmp_path / "first"), 1.0))
    first.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "first.files").exists():  # the first has taken the lock and is copying
        assert time.monotonic() < deadline and first.is_alive()
        time.sleep(0.05)
    second = ctx.Process(target=_stage_slowly, args=(str(root), str(tmp_path / "local"), str(tmp_path / "second"), 0))
    second.start()
    first.join(60)
    second.join(60)
    assert first.exitcode == 0 and second.exitcode == 0
    assert (tmp_path / "first").read_text().startswith("staged ")
    assert "already holds an unchanged copy" in (tmp_path / "second").read_text()
    assert len((tmp_path / "first.files").read_text().splitlines()) == len(FILES)
    assert not (tmp_path / "second.files").exists()
    target = tmp_path / "local" / copy_name(root.resolve(), manifest_of(root))
    for rel in FILES:
        assert (target / rel).stat().st_mtime_ns == (root / rel).stat().st_mtime_ns


def test_a_changed_dataset_gets_a_new_copy_and_the_one_in_use_stays_until_cleaned(tmp_path):
    """A copy is named by its source, user and manifest: a changed dataset is copied to a new folder while
    the old one, still held by a job, is left alone; `clean` removes only copies no one holds and no job
    used for the given days."""
    root = source(tmp_path)
    local = tmp_path / "local"
    old = stage.stage(root, str(local)).path
    assert old.name.startswith(f"prepared-{stage.user()}-") and (old / LAST_USED).exists()
    (root / "images" / "b.jpg").write_text("changed")
    new = stage.stage(root, str(local)).path
    assert new != old and (old / MANIFEST).is_file() and (new / "images" / "b.jpg").read_text() == "changed"
    assert clean(local, 0) == []  # both held by this process
    release(old)
    assert clean(local, 1) == []  # not held, but used today
    past = time.time() - 3 * 86400
    os.utime(old / LAST_USED, (past, past))
    assert clean(local, 2) == [str(old)] and not old.exists() and (new / MANIFEST).is_file()


def test_a_failed_copy_leaves_no_temporary_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """ENOSPC in the middle of the copy: one line with the space needed and found (not shutil's list of
    every file), the temporary folder removed; a killed copy's temporary is removed by the next stage."""
    root = source(tmp_path, {f"images/{i}.jpg": "x" * 100 for i in range(40)})
    local = tmp_path / "local"
    copied = []
    lock = threading.Lock()

    def fills_up(src: str, dst: str) -> None:
        time.sleep(0.05)  # a copy takes a while: the pool's other threads take the next files meanwhile
        with lock:
            copied.append(threading.current_thread().name)
            if len(copied) > 10:
                raise OSError(errno.ENOSPC, "No space left on device", dst)
        shutil.copy2(src, dst)
    monkeypatch.setattr(stage, "_copy_file", fills_up)
    with pytest.raises(StageError) as error:
        stage.stage(root, str(local))
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    assert "needs 160 KiB (40 files) and " in message and " is free there" in message
    assert len(copied) < 40 and len(set(copied)) > 1  # stopped early; several threads
    assert [p.name for p in local.iterdir()] == [f".{copy_name(root, manifest_of(root))}.lock"]
    # A copy SIGKILLed on this host leaves its temporary: a later stage removes it (its pid is gone).
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = local / f".prepared-{stage.user()}-0123456789ab.{socket.gethostname()}.{gone.stdout.strip()}.tmp"
    (stale / "images").mkdir(parents=True)
    monkeypatch.setattr(stage, "_copy_file", shutil.copy2)
    staged = stage.stage(root, str(local)).path
    assert not stale.exists() and len(list((staged / "images").iterdir())) == 40
    # One left by a killed copy whose pid is this process's now (pids are reused): removed under the name's
    # lock, never in the way of the new copy.
    shutil.rmtree(staged)
    os.close(stage._held.pop(staged))  # this process lets the copy go, as if a new one staged
    mine = stage._temporary(local, staged.name)
    (mine / "images").mkdir(parents=True)
    again = stage.stage(root, str(local)).path
    assert again == staged and not mine.exists() and len(list((again / "images").iterdir())) == 40


# -- where the copy goes ------------------------------------------------------------------------------

def test_an_unset_variable_or_a_relative_folder_is_refused_in_one_line(tmp_path, monkeypatch, capfd):
    """'$TMPDIR' with TMPDIR unset would become a folder named $TMPDIR in the working folder, on the shared
    file system: refused, naming the key and the variable; so is a relative path."""
    monkeypatch.delenv("TMPDIR", raising=False)
    with pytest.raises(ConfigError, match=r"data.stage_to=\$TMPDIR: \$TMPDIR is not set on "):
        stage_base("$TMPDIR")
    with pytest.raises(ConfigError, match="data.stage_to=local/copies is a relative path"):
        stage_base("local/copies")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node"))
    assert stage_base("$TMPDIR/x") == tmp_path / "node" / "x"
    monkeypatch.delenv("TMPDIR")
    monkeypatch.chdir(tmp_path)
    data = source(tmp_path)
    assert train_main(demo_args(data, tmp_path / "run", "data.stage_to=${TMPDIR}", workers=0)) == 2
    assert "data.stage_to=${TMPDIR}: $TMPDIR is not set" in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_a_network_target_warns_and_memory_counts_against_the_jobs_limit(tmp_path):
    """The mount that holds the target decides: a network file system is named in a warning; on a tmpfs
    the copy must fit in the job's memory limit less its use (its cgroup, v2 or v1), not the free space."""
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\nserver:/home /home\\040x nfs4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n"
                      "server:/scratch /scratch lustre rw 0 0\n")
    assert mount_of(Path("/home x/u/data"), mounts) == ("/home x", "nfs4")
    assert mount_of(Path("/home/u"), mounts) == ("/", "ext4")
    assert "network file system (lustre at /scratch)" in warn_if_network(Path("/scratch/u"), mounts)
    assert warn_if_network(Path("/dev/shm/u"), mounts) == ""
    # cgroup v2: the job's limit one level up from the step's (unlimited) one.
    v2 = tmp_path / "v2"
    (v2 / "job_7" / "step_0").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    for folder, limit, used in ((v2 / "job_7", "8000000", "1000000"), (v2 / "job_7" / "step_0", "max", "900000")):
        (folder / "memory.max").write_text(limit + "\n")
        (folder / "memory.current").write_text(used + "\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job_7/step_0\n")
    assert memory_room(proc, v2) == (8000000, 1000000)
    v1 = tmp_path / "v1"
    (v1 / "memory" / "slurm" / "job_8").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "memory" / "slurm" / "job_8" / "memory.limit_in_bytes").write_text("5000000\n")
    (v1 / "memory" / "slurm" / "job_8" / "memory.usage_in_bytes").write_text("4000000\n")
    proc.write_text("5:cpu:/slurm/job_8\n4:memory:/slurm/job_8\n0::/\n")
    assert memory_room(proc, v1) == (5000000, 4000000)
    # The copy (3 MB) fits the free space of /dev/shm but not the 1 MB the job has left.
    root = source(tmp_path, {"images/big.jpg": "x" * 3_000_000})
    with pytest.raises(StageError, match=r"counts against this job's memory, and only 977 KiB of its limit 4\.8 MiB"):
        check_room(Path("/dev/shm"), root, manifest_of(root), mounts, proc, v1)
    proc.write_text("0::/job_7/step_0\n")
    check_room(Path("/dev/shm"), root, manifest_of(root), mounts, proc, v2)  # 7 MB left: fits
    with pytest.raises(StageError, match=r"needs 931322574\.6 GiB \(1 files\) and .* is free there"):
        check_room(tmp_path, root, {"huge.jpg": [10**18, 0]}, mounts, proc, v1)


# -- the command and slurm/train.sbatch's staging step ---------------------------------------------------

def test_the_stage_command_copies_shows_and_cleans(tmp_path, monkeypatch):
    """python -m dr_resnet.stage: --root/--to, --train (slurm/train.sbatch's staging step, whose copy the
    training step's node leaders then take without listing the source again), --clean."""
    root = source(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dr_resnet.stage", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    made = command("--root", str(root), "--to", str(tmp_path / "local"))
    assert made.returncode == 0 and f"data.stage_to: staged {root}" in made.stdout, made.stderr
    train_args = ["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={root}"]
    shown = command("--train", "--show", *train_args, f"data.stage_to={tmp_path / 'local'}")
    assert shown.stdout == f"{tmp_path / 'local'}\n", shown.stderr
    assert command("--train", "--show", *train_args).stdout == "\n"
    found = command("--train", *train_args, f"data.stage_to={tmp_path / 'local'}")
    assert "already holds an unchanged copy" in found.stdout, found.stderr
    # The training step of the same job leg: its leader reads the copy's name from the staging step's record.
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setattr(stage, "manifest_of", lambda root: pytest.fail("the source was listed again"))
    said = stage.stage(root, str(tmp_path / "local")).said
    assert "already holds an unchanged copy" in said and "as this job's staging step recorded" in said
    release(Path(said.split()[0]))  # so that --clean below, another process, may take it
    bad = command("--root", str(root), "--to", "relative")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --to=relative is a relative")
    cleaned = command("--clean", str(tmp_path / "local"), "--older-than", "0")
    assert cleaned.returncode == 0 and cleaned.stdout.startswith("removed "), cleaned.stderr
