"""Data workers start from a fork server, never by forking the (threaded) training process, whose forks can
deadlock on CPython < 3.12 (gh-112275); the server outlives the stop signals a job gets, and each worker
leaves them to its training process. Real processes and signals."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.training.components import worker_start

from helpers import preprocessed_dataset


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return RetinopathyDataset(preprocessed_dataset(tmp_path_factory.mktemp("workers"), 24, 4, seed=3, size=32),
                              "train", image_size=32)


def test_workers_come_from_a_fork_server_that_outlives_the_stop_signals(dataset):
    loader = DataLoader(dataset, 4, num_workers=2, persistent_workers=True, **worker_start(2))
    batches = iter(loader)
    next(batches)
    workers = [w.pid for w in batches._workers]
    servers = {parent_of(pid) for pid in workers}
    assert os.getpid() not in servers and len(servers) == 1  # never forked from this (threaded) process
    [server] = servers
    assert parent_of(server) == os.getpid()
    # What SLURM or torchrun does at a time limit, and preemption or submitit's requeue signal: every process of
    # the job gets SIGTERM, SIGUSR1 or SIGUSR2 (here from another process, as from them). The server and the
    # workers stay; the loader goes on to the epoch's end.
    for name in ("TERM", "USR1", "USR2"):
        subprocess.run(["kill", f"-{name}", str(server), *map(str, workers)], check=True)
    time.sleep(1.0)
    assert alive(server) and all(alive(pid) for pid in workers)
    assert sum(len(labels) for _, labels in batches) == len(dataset) - 4
    assert sum(len(labels) for _, labels in loader) == len(dataset)  # the next epoch, same workers
    # The training process's own SIGTERM (how it ends a worker that does not stop) ends a worker at once.
    os.kill(workers[0], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive(workers[0]) and time.monotonic() < deadline:
        time.sleep(0.05)  # a child's exit: nothing to wait on but its state
    assert not alive(workers[0])


def test_no_workers_no_fork_server():
    assert worker_start(0) == {}


def test_a_killed_training_process_leaves_no_server_or_worker_behind(dataset, tmp_path):
    """kill -9 of the process that owns the loader: its fork server and workers end within seconds (they
    would otherwise live on, holding the job's output open: torchrun's restart then never finished)."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import os, sys, time\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from torch.utils.data import DataLoader\n"
        "from dr_resnet.data.dataset import RetinopathyDataset\n"
        "from dr_resnet.training.components import worker_start\n"
        "if __name__ == '__main__':  # the fork server's workers import the main script, as spawn's do\n"
        "    loader = DataLoader(RetinopathyDataset(sys.argv[1], 'train', image_size=32), 4, num_workers=2,\n"
        "                        persistent_workers=True, **worker_start(2))\n"
        "    batches = iter(loader)\n"
        "    next(batches)\n"
        "    print(' '.join(str(w.pid) for w in batches._workers), flush=True)\n"
        "    time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, str(script), str(dataset.root), str(Path(__file__).parent)],
                             stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in owner.stdout.readline().split()]
        [server] = {parent_of(pid) for pid in workers}
        owner.kill()
        owner.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in (server, *workers)) and time.monotonic() < deadline:
            time.sleep(0.1)  # other processes' exits: nothing to wait on but their state
        assert not any(alive(pid) for pid in (server, *workers))
    finally:
        owner.kill()


def test_the_fork_server_and_resource_tracker_outlive_the_stop_signals_and_pool_workers_still_end(tmp_path):
    """Preemption's SIGUSR1 and submitit's SIGUSR2 reach every process of a job, multiprocessing's resource
    tracker (which ignores only SIGINT and SIGTERM of its own) and the fork server while it still imports
    torch: both stay, and a later pool's workers come from the same server. Leaving `with Pool` at once ends
    its workers, those still starting too: Pool.terminate's SIGTERM must neither be ignored by a worker that
    has not run its initializer yet nor stay blocked for good (the server's mask, which workers inherit);
    either way the pool would wait for that worker forever."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import os, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from multiprocessing import forkserver, resource_tracker\n"
        "from dr_resnet import processes\n"
        "def parent(_):\n"
        "    return os.getppid()\n"
        "if __name__ == '__main__':\n"
        "    processes.start_fork_server()  # as a training run does before reading its data\n"
        "    print(resource_tracker._resource_tracker._pid, forkserver._forkserver._forkserver_pid, flush=True)\n"
        "    sys.stdin.readline()\n"
        "    with processes.context().Pool(4, initializer=processes.default_stop_signals, initargs=(os.getpid(),)) as pool:\n"
        "        print(pool.apply(parent, (0,)), flush=True)  # the first worker ready; others may be starting\n"
        "    print('left the pool', flush=True)\n")
    owner = subprocess.Popen([sys.executable, str(script), str(Path(__file__).parent.parent)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tracker, server = (int(pid) for pid in owner.stdout.readline().split())
        for pid in (tracker, server):  # at once: the server is still importing torch
            os.kill(pid, signal.SIGUSR1)
            os.kill(pid, signal.SIGUSR2)
        out, err = owner.communicate("go\n", timeout=120)  # a hang at the end of `with Pool` fails here
    finally:
        owner.kill()
    assert owner.returncode == 0, err
    assert out.splitlines() == [str(server), "left the pool"], err
    assert "died unexpectedly" not in err  # the tracker was not relaunched


def test_a_worker_ends_when_its_training_process_is_gone_without_a_pidfd(tmp_path):
    """Without pidfd (older kernels), a worker polls its training process with kill(pid, 0): once that pid
    belongs to another user's process (EPERM, here pid 1 seen by nobody), the training process is gone too."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, sys, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from dr_resnet import processes\n"
        "del os.pidfd_open\n"
        "if os.getuid() == 0:\n"
        "    os.setuid(65534)\n"
        "processes.end_with(1)\n"
        "time.sleep(60)\n"
        "sys.exit(3)\n")
    worker = subprocess.run([sys.executable, str(script), str(Path(__file__).parent.parent)], capture_output=True,
                            text=True, timeout=30)
    assert worker.returncode == 0, worker.stderr
