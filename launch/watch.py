"""A live view of a sweep while its jobs run: one line per run (arm, or arm and seed) with its state, epoch
k/N, its held-out QWK at the last epoch and the best so far, and an estimate of the time left, read from the
run directories and the scheduler's job states; during --tune's phase 1, a line per arm with the best held-out
QWK among its trials so far. No test figure is shown: what the view shows while runs are going is what may
choose among them. Redrawn in place on a terminal; quiet otherwise (a log file gets the report at the end,
not a screenful per refresh)."""

from __future__ import annotations

import math
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
HELD_OUT = "val_qwk"  # the held-out QWK of an epoch's metrics row; absent without a held-out part
NO_HELD_OUT = "no held-out part: nothing to choose on"


@dataclass(frozen=True)
class RunView:
    name: str
    state: str  # pending, running, requeued, done, failed, not run
    epoch: int
    epochs: int
    held_out_qwk: float | None  # at the last epoch; None: no epoch yet, or no held-out part
    best_qwk: float | None  # the best finite held-out QWK of any epoch so far
    best_epoch: int | None
    held_out: bool | None  # whether the run holds images out (None: not known before its first epoch)
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
    # a diverged epoch logs NaN: never the best so far (the tuning rule never selects it either)
    scored = [(r[HELD_OUT], r.get("epoch", i + 1)) for i, r in enumerate(rows) if _finite(r.get(HELD_OUT))]
    best = max(scored, key=lambda s: s[0], default=(None, None))
    return RunView(name, state, len(rows), epochs, last.get(HELD_OUT), best[0], best[1],
                   HELD_OUT in last if rows else None, left)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _qwk(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def render(views: list[RunView], elapsed: float, trials_of: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """The view's lines: a header, a line per run, then (trials_of: run name -> (arm, trial), --tune's phase 1)
    a line per arm with its best trial so far, and a note for runs without a held-out part."""
    width = max([len(v.name) for v in views] + [3])
    lines = [f"{'run':<{width}}  {'state':<8}  epoch  held-out QWK  best so far  time left   "
             f"({_duration(elapsed)} so far)"]
    for v in views:
        lines.append(f"{v.name:<{width}}  {v.state:<8}  {f'{v.epoch}/{v.epochs}':>5}  {_qwk(v.held_out_qwk):>12}  "
                     f"{_qwk(v.best_qwk):>11}  {_duration(v.seconds_left):>9}")
    if trials_of:
        lines += best_trials(views, trials_of)
    without = [v for v in views if v.held_out is False]
    if without:
        lines.append(f"{NO_HELD_OUT} ({len(without)} of {len(views)} runs: each one's final epoch is its result)")
    return lines


def best_trials(views: list[RunView], trials_of: dict[str, tuple[str, str]]) -> list[str]:
    """A line per arm: the best held-out QWK among its trials so far and which trial (and epoch) has it."""
    arms: dict[str, list[RunView]] = {}
    for v in views:
        if v.name in trials_of:
            arms.setdefault(trials_of[v.name][0], []).append(v)
    lines = []
    for arm, mine in arms.items():
        scored = [v for v in mine if v.best_qwk is not None]
        if not scored:
            lines.append(f"{arm}: no held-out QWK yet ({len(mine)} trials)")
            continue
        best = max(scored, key=lambda v: v.best_qwk)
        lines.append(f"{arm}: best held-out QWK so far {best.best_qwk:.3f}, trial {trials_of[best.name][1]} "
                     f"(epoch {best.best_epoch}; {len(scored)} of {len(mine)} trials with a held-out QWK)")
    return lines


class LiveView:
    """Redraws the lines in place on a terminal (ANSI cursor movement); does nothing elsewhere."""

    def __init__(self, stream: TextIO | None = None) -> None:
        # sys.stdout as it is now, not as it was at import (a default argument would keep a replaced stream)
        self.stream, self.shown, self.started = stream or sys.stdout, 0, time.monotonic()
        self.enabled = self.stream.isatty()

    def show(self, views: list[RunView], trials_of: dict[str, tuple[str, str]] | None = None) -> None:
        if not self.enabled:
            return
        lines = render(views, time.monotonic() - self.started, trials_of)
        if self.shown:
            self.stream.write(f"\x1b[{self.shown}F")  # back to the first line drawn last time
        self.stream.write("".join(f"{line}\x1b[K\n" for line in lines))
        if len(lines) < self.shown:  # a note that went away: clear what is left of the last drawing
            self.stream.write("\x1b[J")
        self.stream.flush()
        self.shown = len(lines)


def watch(runs: dict[str, tuple[Path, int]], state_of: Callable[[str], str], finished: Callable[[], bool],
          view: LiveView, poll_s: float = 5.0, trials_of: dict[str, tuple[str, str]] | None = None) -> None:
    """Refresh the view every poll_s seconds until finished(); runs: name -> (run directory, planned epochs);
    state_of(name): its job's state ("not run" for a run that was never submitted); trials_of: name -> (arm,
    trial) for --tune's phase 1 (a line per arm with its best trial so far)."""
    while True:
        done = finished()
        view.show([view_of(name, run_dir, state_of(name), epochs) for name, (run_dir, epochs) in runs.items()],
                  trials_of)
        if done:
            return
        time.sleep(poll_s)  # the run directories and the scheduler have nothing to wait on
