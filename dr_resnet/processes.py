"""Helper processes (data loaders' workers, the photo check's pool): how they start, and the signals that
stop a run, which they leave to the training process.

They start from a fork server, never by forking the training process. The training process has threads
(gloo's, the DataLoader's queue feeders, tqdm's monitor, W&B's), and on CPython before 3.12 a fork while one
of them starts or ends can copy the interpreter's thread-list lock held: the child waits for it forever
(CPython gh-112275). Seen here twice in an hour of runs: a run stuck at its first evaluation, whose loader
forks its workers anew each epoch. The fork server (multiprocessing's "forkserver" context: one
single-threaded process per training process, started before the first worker, `torch` already imported by
`dr_resnet._fork_server`) forks every worker instead, in a few milliseconds. Each server holds about 0.4 GB
of its own (674 MB resident, the rest library pages shared with its training process): launch.sweep's default
memory request counts it (FORK_SERVER_GB).

torchrun and SLURM send the stop signals to every process of the job, SLURM's preemption signal (SIGUSR1)
and submitit's (SIGUSR2) included. The fork server must outlive them (were it to die, every worker would
follow it, and the step before the checkpoint would fail), and so must multiprocessing's resource tracker,
which ignores only SIGINT and SIGTERM of its own: both start with the stop signals blocked
(`start_fork_server`); the tracker keeps SIGUSR1 and SIGUSR2 blocked, the server all three. Each worker
inherits the server's mask, so that a signal sent before the worker has set itself up waits instead of
killing it or being lost, and its initializer decides: a data worker leaves them to the training process
(`leave_stop_signals_to`), a pool's worker ends at them as usual (`default_stop_signals`); both end with
the process that uses them (`end_with`). As with multiprocessing's spawn, a script of one's own that trains
(calls dr_resnet.training.train.main) needs the `if __name__ == "__main__":` guard: workers import the main
script; `python -m dr_resnet.train`, torchrun and launch.sweep have it.
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
FORK_SERVER_PRELOAD = ["dr_resnet._fork_server"]  # blocks STOP_SIGNALS, imports torch and the datasets
FORK_SERVER_GB = 0.4  # the memory each training process's fork server holds of its own (not shared with it)


def context() -> BaseContext:
    """multiprocessing's fork-server context, with the preload that readies it for data workers; this
    process's fork server and resource tracker are running when it returns (see start_fork_server). Every
    worker started from it needs leave_stop_signals_to or default_stop_signals as its initializer: it
    starts with the stop signals blocked, and a pool's worker left so would never end at Pool.terminate."""
    start_fork_server()
    return multiprocessing.get_context("forkserver")


def start_fork_server() -> None:
    """Start this process's fork server (it imports torch, about 2-3 s of one core, while this process goes
    on), and before it the resource tracker, unless they run already: a training run calls it before
    reading its data, so that the server is ready by the first worker. They start here, with the stop
    signals blocked, and not at the first worker or queue (whichever came first would start the tracker
    unguarded): started from a thread that has them blocked, each begins with them blocked, and none can
    end it before it has set its own signals up. This thread's own mask is restored at once."""
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(FORK_SERVER_PRELOAD)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        forkserver.ensure_running()  # the resource tracker first (the server's workers share it), then the server
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
            # Any error means it is gone: ESRCH, or EPERM once its pid belongs to another user's process.
            with contextlib.suppress(OSError):
                while True:
                    os.kill(training_pid, 0)
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
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # as the fork server left them: kept so
    for sig in STOP_SIGNALS:  # an ignored signal may be discarded before sigwaitinfo sees it
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
    (Pool.terminate sends SIGTERM), and so does the end of that process. The worker starts with them blocked
    (the fork server's mask): unblocked here, one sent meanwhile ends it now, Pool.terminate's included,
    which a worker that ignored it until its initializer ran would lose (leaving `with Pool` would hang)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    end_with(training_pid)
