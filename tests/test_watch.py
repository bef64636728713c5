"""The sweep's live view: each run's line from its real run directory and job state; drawn in place on a
real terminal (a pseudo-terminal), silent elsewhere."""

from __future__ import annotations

import io
import os

import pytest

from launch.watch import LiveView, render, view_of, watch

from helpers import metrics_rows


def test_a_runs_line_comes_from_its_metrics_and_job_state(runs, tmp_path):
    run_dir = runs["classification"]
    rows = metrics_rows(run_dir)
    running = view_of("resnet18_scratch/seed0", run_dir, "RUNNING", 6)
    assert (running.state, running.epoch, running.epochs) == ("running", 3, 6)
    assert running.test_acc == rows[-1]["test_acc"] and running.test_qwk == rows[-1]["test_qwk"]
    assert running.seconds_left == pytest.approx(3 * sum(r["epoch_seconds"] for r in rows) / 3)
    assert view_of("x", run_dir, "COMPLETED", 3).state == "done" and view_of("x", run_dir, "COMPLETED", 3).seconds_left == 0
    assert view_of("x", run_dir, "FINISHED", 6).state == "failed"  # the local executor's word for any exit
    assert view_of("x", run_dir, "REQUEUED", 6).state == "requeued"
    waiting = view_of("x", tmp_path / "empty", "PENDING", 6)
    assert (waiting.state, waiting.epoch, waiting.test_acc, waiting.seconds_left) == ("pending", 0, None, None)
    assert view_of("x", tmp_path / "empty", "not run", 6).state == "not run"
    lines = render([running, waiting], elapsed=65)
    assert lines[0].endswith("(1m05s so far)") and len(lines) == 3
    assert lines[1].split() == ["resnet18_scratch/seed0", "running", "3/6", f"{rows[-1]['test_acc']:.1%}",
                                f"{rows[-1]['test_qwk']:.3f}", lines[1].split()[-1]]


def test_the_view_redraws_in_place_on_a_terminal_and_is_silent_elsewhere(runs):
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as terminal:
        view = LiveView(terminal)
        assert view.enabled
        states = iter(["RUNNING", "RUNNING", "COMPLETED"])
        current = {"state": "RUNNING"}

        def finished() -> bool:
            current["state"] = next(states)
            return current["state"] == "COMPLETED"
        watch({"resnet18_scratch": (runs["classification"], 3)}, lambda name: current["state"], finished, view, poll_s=0)
    chunks = []
    while True:  # everything the terminal received, until the closed writer's end (EIO on Linux)
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    shown = b"".join(chunks).decode()
    assert shown.count("resnet18_scratch") == 3 and shown.count("\x1b[2F") == 2  # drawn 3 times, twice over itself
    assert "done" in shown.rsplit("\x1b[2F", 1)[1]
    quiet = io.StringIO()
    watch({"r": (runs["classification"], 3)}, lambda name: "RUNNING", lambda: True, LiveView(quiet), poll_s=0)
    assert quiet.getvalue() == ""
