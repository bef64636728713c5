"""Helper processes (data loaders' workers, the photo check's pool): how they start, and the signals that
stop a run, which they leave to the training process.

They start from a fork server, never by forking the training process. The training process has threads
(gloo's, the DataLoader's queue feeders, tqdm's monitor, W&B's), and on CPython before 3.12 a fork while one
of them starts or ends can copy the interpreter's thread-list lock held: the child waits for it forever
(CPython gh-112275). Seen here twice in an hour of runs: a run stuck at its first evaluation, whose loader
forks its workers anew each epoch. The fork server (multiprocessing's "forkserver" context: one
single-threaded process per training process, started at the first worker, `torch` already imported by
`dr_resnet._fork_server`) forks every worker instead, in a few milliseconds. Each server holds about 0.4 GB
of its own (674 MB resident, the rest library pages shared with its training process): launch.sweep's default
memory request counts it (FORK_SERVER_GB).

torchrun and SLURM send the stop signals to every process of the job: the fork server ignores them (were it
to die, every worker would follow it, and the step before the checkpoint would fail), and each worker
leaves them to the training process (`leave_stop_signals_to`) and ends with it (`end_with`). As with
multiprocessing's spawn, a script of one's own that trains (calls dr_resnet.training.train.main) needs the
`if __name__ == "__main__":` guard: workers import the main script; `python -m dr_resnet.train`, torchrun and
launch.sweep have it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import signal
import threading
import time
from multiprocessing.context import BaseContext

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # what stops a run at its next step boundary
FORK_SERVER_PRELOAD = ["dr_resnet._fork_server"]  # imports torch and the datasets, ignores STOP_SIGNALS
FORK_SERVER_GB = 0.4  # the memory each training process's fork server holds of its own (not shared with it)


def context() -> BaseContext:
    """multiprocessing's fork-server context, with the preload that readies it for data workers."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


def start_fork_server() -> None:
    """Start this process's fork server now (it imports torch, about 2-3 s of one core), so that it is ready
    by the first worker: a training run calls it before reading its data."""
    context()
    from multiprocessing import forkserver

    forkserver.ensure_running()


def end_with(training_pid: int) -> None:
    """End this worker when the training process ends, however it ends (kill -9 too). Torch's own watchdog
    watches the parent, which is the fork server here, and the server lives while any worker holds its
    client's end of their shared pipe: without this, a killed training process would leave its server and
    workers behind for good (holding the job's output open, so that torchrun's restart never finishes)."""
    def wait() -> None:
        try:
            select.select([os.pidfd_open(training_pid)], [], [])  # readable once it has ended (Linux >= 5.3)
        except ProcessLookupError:
            pass  # already gone
        except (AttributeError, OSError):  # no pidfd here: poll
            with contextlib.suppress(ProcessLookupError):
                while True:
                    os.kill(training_pid, 0)  # ProcessLookupError once it is gone
                    time.sleep(1)  # nothing to wait on without a pidfd
        os._exit(0)

    threading.Thread(target=wait, daemon=True, name="end-with-training").start()


def leave_stop_signals_to(training_pid: int, worker_id: int = 0) -> None:
    """In each data worker (a DataLoader's worker_init_fn, bound to the training process's pid with
    functools.partial): torchrun and SLURM signal the whole job, and a worker killed by that SIGTERM would
    fail the step before the training process could write its checkpoint. The signals are blocked and a
    thread waits for them: sent by the training process itself (the DataLoader ending its workers), the
    worker exits at once; sent by anyone else, it is ignored. Workers also end when their training process
    does (end_with)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for sig in STOP_SIGNALS:  # the fork server's SIG_IGN would discard them before sigwaitinfo sees them
        signal.signal(sig, signal.SIG_DFL)

    def wait_for_signals() -> None:
        while True:
            if signal.sigwaitinfo(STOP_SIGNALS).si_pid == training_pid:
                os._exit(0)

    threading.Thread(target=wait_for_signals, daemon=True, name="stop-signals").start()
    end_with(training_pid)


def default_stop_signals(training_pid: int, *_) -> None:
    """A pool's or a DataLoader's worker initializer (bound to the pid of the process that uses it) where the
    worker need not outlive the stop signals (the photo check, predict): they end it as usual
    (Pool.terminate sends SIGTERM), and so does the end of that process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    end_with(training_pid)
