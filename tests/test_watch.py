"""The sweep's live view: each run's line (held-out figures only) from its real run directory and job state;
during --tune's phase 1 each arm's best trial so far; drawn in place on a real terminal (a pseudo-terminal),
silent elsewhere."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest

from launch.watch import LiveView, render, view_of, watch

from helpers import metrics_rows


def write_rows(run_dir: Path, val_qwk: list[float]) -> Path:
    """A run's metrics log as training writes it (test figures included: the view must not show them)."""
    run_dir.mkdir(parents=True)
    rows = [{"epoch": e, "val_qwk": q, "test_qwk": 0.99, "test_acc": 0.98, "epoch_seconds": 10.0}
            for e, q in enumerate(val_qwk, start=1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_a_runs_line_shows_its_held_out_qwk_and_best_so_far_never_a_test_figure(tmp_path):
    held = write_rows(tmp_path / "lr0.1", [0.40, 0.70, math.nan, 0.65])
    running = view_of("r18_lr0.1", held, "RUNNING", 6)
    assert (running.state, running.epoch, running.epochs) == ("running", 4, 6)
    assert running.held_out_qwk == 0.65 and (running.best_qwk, running.best_epoch) == (0.70, 2)  # NaN never best
    assert running.held_out is True and running.seconds_left == pytest.approx(20.0)
    assert view_of("x", held, "COMPLETED", 4).state == "done" and view_of("x", held, "COMPLETED", 4).seconds_left == 0
    assert view_of("x", held, "FINISHED", 6).state == "failed"  # the local executor's word for any exit
    assert view_of("x", held, "REQUEUED", 6).state == "requeued"
    waiting = view_of("x", tmp_path / "empty", "PENDING", 6)
    assert (waiting.state, waiting.epoch, waiting.held_out_qwk, waiting.held_out, waiting.seconds_left) == \
        ("pending", 0, None, None, None)
    assert view_of("x", tmp_path / "empty", "not run", 6).state == "not run"
    lines = render([running, waiting], elapsed=65)
    assert lines[0].endswith("(1m05s so far)") and len(lines) == 3
    assert "held-out QWK" in lines[0] and "best so far" in lines[0] and "test" not in lines[0]
    assert lines[1].split() == ["r18_lr0.1", "running", "4/6", "0.650", "0.700", "0m20s"]
    assert lines[2].split() == ["x", "pending", "0/6", "-", "-", "-"]
    assert not any("0.99" in line or "0.98" in line or "99.0%" in line for line in lines)


def test_a_run_without_a_held_out_part_shows_a_dash_and_says_nothing_can_be_chosen(runs):
    run_dir = runs["classification"]  # 40 training photos: under data.min_val_images, nothing held out
    rows = metrics_rows(run_dir)
    assert "val_qwk" not in rows[-1]
    running = view_of("resnet18_scratch/seed0", run_dir, "RUNNING", 6)
    assert (running.held_out, running.held_out_qwk, running.best_qwk) == (False, None, None)
    lines = render([running], elapsed=5)
    assert lines[1].split()[3:5] == ["-", "-"]
    assert lines[-1].startswith("no held-out part: nothing to choose on (1 of 1 runs")
    tests = {f"{rows[-1][k]:.3f}" for k in ("test_qwk", "test_acc")} | {f"{rows[-1]['test_acc']:.1%}"}
    assert not any(t in line for line in lines for t in tests)


def test_phase_one_shows_each_arms_best_trial_so_far(tmp_path):
    trials_of = {"r18_t00": ("r18", "t00-lr0.01"), "r18_t01": ("r18", "t01-lr0.1"), "r50_t00": ("r50", "t00-lr0.01"),
                 "r50_t01": ("r50", "t01-lr0.1")}
    write_rows(tmp_path / "a", [0.30, 0.50])
    write_rows(tmp_path / "b", [0.60, 0.55])
    views = [view_of("r18_t00", tmp_path / "a", "RUNNING", 3), view_of("r18_t01", tmp_path / "b", "RUNNING", 3),
             view_of("r50_t00", tmp_path / "none", "PENDING", 3), view_of("r50_t01", tmp_path / "none", "PENDING", 3)]
    lines = render(views, elapsed=1, trials_of=trials_of)
    assert lines[5] == "r18: best held-out QWK so far 0.600, trial t01-lr0.1 (epoch 1; 2 of 2 trials with a held-out QWK)"
    assert lines[6] == "r50: no held-out QWK yet (2 trials)" and len(lines) == 7


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
    # drawn 3 times, twice over itself: header, the run, the note that it holds nothing out
    assert shown.count("resnet18_scratch") == 3 and shown.count("\x1b[3F") == 2
    assert "done" in shown.rsplit("\x1b[3F", 1)[1] and "no held-out part: nothing to choose on" in shown
    quiet = io.StringIO()
    watch({"r": (runs["classification"], 3)}, lambda name: "RUNNING", lambda: True, LiveView(quiet), poll_s=0)
    assert quiet.getvalue() == ""
