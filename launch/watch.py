"""A live view of a sweep while its jobs run: one line per run (arm, or arm and seed) with its state, epoch
k/N, last test accuracy and QWK, and an estimate of the time left, read from the run directories and
the scheduler's job states. Redrawn in place on a terminal; quiet otherwise (a log file gets the report
at the end, not a screenful per refresh)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from dr_resnet.results.rundir import MetricsError, read_metrics

# submitit's job states (SLURM's, and the local executor's) -> what the view says
STATES = {"PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued",
          "REQUEUE_FED": "requeued", "RUNNING": "running", "COMPLETING": "running", "COMPLETED": "done",
          "FINISHED": "done", "DONE": "done", "FAILED": "failed", "CANCELLED": "failed", "TIMEOUT": "failed",
          "OUT_OF_MEMORY": "failed", "NODE_FAIL": "failed", "PREEMPTED": "requeued", "INTERRUPTED": "failed",
          "UNKNOWN": "pending"}


@dataclass(frozen=True)
class RunView:
    name: str
    state: str  # pending, running, requeued, done, failed, not run
    epoch: int
    epochs: int
    test_acc: float | None
    test_qwk: float | None
    seconds_left: float | None  # None: not known yet (no epoch finished)


def view_of(name: str, run_dir: Path, job_state: str, epochs: int) -> RunView:
    """A run's line, from its metrics log and its job's state (submitit's word, or "not run")."""
    try:
        rows = read_metrics(run_dir)
    except MetricsError:
        rows = []
    state = "not run" if job_state == "not run" else STATES.get((job_state.split() or ["UNKNOWN"])[0].upper(), "pending")
    if state == "done" and len(rows) < epochs:  # the local executor says FINISHED whatever the exit code
        state = "failed"
    last = rows[-1] if rows else {}
    left = None
    if rows and state in ("running", "requeued", "pending"):
        per_epoch = sum(r.get("epoch_seconds", 0.0) for r in rows) / len(rows)
        left = per_epoch * max(0, epochs - len(rows))
    elif state == "done":
        left = 0.0
    return RunView(name, state, len(rows), epochs, last.get("test_acc"), last.get("test_qwk"), left)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render(views: list[RunView], elapsed: float) -> list[str]:
    width = max([len(v.name) for v in views] + [3])
    lines = [f"{'run':<{width}}  {'state':<8}  epoch   test acc  QWK    time left   ({_duration(elapsed)} so far)"]
    for v in views:
        acc = f"{v.test_acc:6.1%}" if v.test_acc is not None else "     -"
        qwk = f"{v.test_qwk:5.3f}" if v.test_qwk is not None else "    -"
        left = _duration(v.seconds_left)
        lines.append(f"{v.name:<{width}}  {v.state:<8}  {v.epoch:>2}/{v.epochs:<2}   {acc}    {qwk}  {left:>9}")
    return lines


class LiveView:
    """Redraws the lines in place on a terminal (ANSI cursor movement); does nothing elsewhere."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream, self.shown, self.started = stream, 0, time.monotonic()
        self.enabled = stream.isatty()

    def show(self, views: list[RunView]) -> None:
        if not self.enabled:
            return
        lines = render(views, time.monotonic() - self.started)
        if self.shown:
            self.stream.write(f"\x1b[{self.shown}F")  # back to the first line drawn last time
        self.stream.write("".join(f"{line}\x1b[K\n" for line in lines))
        self.stream.flush()
        self.shown = len(lines)


def watch(runs: dict[str, tuple[Path, int]], state_of: Callable[[str], str], finished: Callable[[], bool],
          view: LiveView, poll_s: float = 5.0) -> None:
    """Refresh the view every poll_s seconds until finished(); runs: name -> (run directory, planned epochs);
    state_of(name): its job's state ("not run" for a run that was never submitted)."""
    while True:
        done = finished()
        view.show([view_of(name, run_dir, state_of(name), epochs) for name, (run_dir, epochs) in runs.items()])
        if done:
            return
        time.sleep(poll_s)  # the run directories and the scheduler have nothing to wait on
