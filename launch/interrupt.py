"""How a local sweep ends when its launcher is stopped: Ctrl-C (SIGINT), a closed terminal (SIGHUP),
`timeout` or `kill` (SIGTERM).

The local executor's jobs are the launcher's children (submitit's controller, then its tasks). A terminal
sends SIGINT and SIGHUP to every process of its foreground group, the jobs' too: killed by them, a task
writes no checkpoint (and Ctrl-C printed a traceback from each). A launcher ended by SIGTERM or SIGHUP
left its jobs running with parent 1. So the jobs start with SIGINT and SIGHUP ignored
(`LocalJobs.start`), and every stop signal to the launcher ends in one place (`stoppable`): each job
still running gets SIGTERM (submitit's controller passes it to its tasks, training writes a checkpoint at
its next step boundary and stops, and launch.task does not requeue a local job stopped so), the launcher
waits for them, says INTERRUPTED and exits with 128 + the signal's number. A job still running after
STOP_WAIT_S is killed with its processes: its last checkpoint before then is where it resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .requeue import SHUTDOWN_S

LAUNCHER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what stops the launcher
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP)  # what a terminal sends its whole foreground group
INTERRUPTED = "interrupted; the same command resumes"
STOP_WAIT_S = SHUTDOWN_S  # as long as torchrun's processes get under slurm/train.sbatch
RESEND_S = 5.0  # SIGTERM again: a task ignores it until training's handler is in place (submitit's bypasses it)


class Interrupted(BaseException):
    """A stop signal reached the launcher (a BaseException, as KeyboardInterrupt: no `except Exception`
    on the way out catches it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended


class LocalJobs:
    """The local jobs this launcher started, and how they are stopped."""

    def __init__(self) -> None:
        self.started: list = []  # submitit LocalJobs
        self._starting = False
        self._deferred: int | None = None  # a stop signal that arrived while a job was starting

    def on_signal(self, signum: int, frame) -> None:
        if self._starting:  # raised once the job is recorded, so that it is stopped too
            self._deferred = self._deferred or signum
            return
        raise Interrupted(signum)

    def start(self, submit: Callable[[], object]):
        """Run `submit` (one job, or a list of them: an array), the jobs' processes inheriting SIGINT and
        SIGHUP ignored (dispositions are what a child inherits; handlers are not): they leave the terminal's
        signals to the launcher. The launcher ignores them too meanwhile, a few milliseconds a job; SIGTERM
        is held until the jobs are recorded."""
        self._starting = True
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in TERMINAL_SIGNALS} if _main_thread() else {}
        try:
            jobs = submit()
            self.started.extend(jobs if isinstance(jobs, list) else [jobs])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._starting = False
        if self._deferred is not None:
            raise Interrupted(self._deferred)
        return jobs

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """SIGTERM to each job still running (its controller passes it to the tasks), again every RESEND_S,
        until every process of every job has ended or wait_s has passed; then what is left is killed. A
        job's processes are those seen below its controller meanwhile: a fork server still importing torch
        when its training process ends, say, outlives it by seconds, with parent 1."""
        running = [job for job in self.started if not job.done()]
        processes = {job: set(process_tree(int(job.job_id))) for job in running}
        deadline = time.monotonic() + wait_s
        resend_at = time.monotonic()
        while time.monotonic() < deadline:
            if time.monotonic() >= resend_at:
                for job in running:  # not reaped yet (done() was False): the pid is still the controller's
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(job.job_id), signal.SIGTERM)
                resend_at = time.monotonic() + RESEND_S
            time.sleep(0.2)  # other processes' exits: nothing to wait on but their state
            for job in running:
                processes[job] |= set(process_tree(int(job.job_id)))
            running = [job for job in running if not job.done()]
            if not running and not any(alive(pid) for pids in processes.values() for pid in pids):
                return
        for job, pids in processes.items():
            left = [pid for pid in pids if alive(pid)]
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            job.done()  # reaps the controller
            if left:
                say(f"job {job.job_id}: {len(left)} process(es) still running {wait_s:.0f} s after SIGTERM, killed; "
                    f"the run resumes from its last checkpoint")


def stoppable(work: Callable[[LocalJobs], int], wait_s: float = STOP_WAIT_S) -> int:
    """work(jobs)'s exit code; at a stop signal, the local jobs it started stopped (LocalJobs.stop), one
    line (INTERRUPTED) on stderr, and 128 + the signal's number."""
    jobs = LocalJobs()
    if not _main_thread():  # Python runs signal handlers in the main thread only
        return work(jobs)
    previous = {sig: signal.signal(sig, jobs.on_signal) for sig in LAUNCHER_SIGNALS}
    try:
        return work(jobs)
    except Interrupted as stop:
        for sig in LAUNCHER_SIGNALS:  # the stop runs to its end (a closed terminal may send SIGHUP twice)
            signal.signal(sig, signal.SIG_IGN)
        say(INTERRUPTED)
        jobs.stop(wait_s)
        return stop.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it, parents first (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree = [pid]
    for p in tree:  # grows while it is walked: breadth first
        tree.extend(children.get(p, []))
    return tree


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended: its parent, or init, reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def say(line: str) -> None:
    """One line on stderr; nothing when the terminal has gone (a closed terminal's SIGHUP)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
