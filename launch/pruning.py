"""--keep-checkpoints winners: once --tune has chosen each arm's winner, the checkpoints of the runs that lost
are deleted. A trial keeps two or three checkpoints (the last, the selected epoch's, and the one before the last
until the run finishes), 3 x 180 MB for a 32-px ResNet50: 30 small trials took 12 GB, and nothing reads a losing
trial's weights again (phase 2 trains the winners' settings afresh). Torch-free.

What goes: checkpoint_last.pt, checkpoint_prev.pt, checkpoint_best.pt (and a checkpoint_last.pt.damaged) of
every finished run of an arm with a winner that is not the winner: its losing phase-1 trials
(SWEEP_DIR/tune/<arm>/<trial>/) and an earlier winner's phase-2 runs on every seed
(SWEEP_DIR/superseded/<arm>/<trial>/seed<k>/). What stays: each run's config, metrics, summary, predictions,
logs (what tuning.json, the report and the Tuning table read), and the checkpoints of runs that have not
finished (failed, stopped or lost: the next launch resumes them). Each pruned folder gets a one-line note
(rundir.PRUNED_FILE), by which training refuses to start such a run over and evaluate says why its checkpoint
is gone.
"""

from __future__ import annotations

import time
from pathlib import Path

from dr_resnet.files import write_text
from dr_resnet.results.rundir import CHECKPOINT_FILES, CONFIG_FILE, DAMAGED_CHECKPOINT, PRUNED_FILE, is_finished
from dr_resnet.results.tuning import TUNE_DIR

KEEP_CHECKPOINTS = ("all", "winners")  # --keep-checkpoints: every run's, or (after --tune) the winners' only
SUPERSEDED_DIR = "superseded"  # SWEEP_DIR/superseded/<arm>/<trial>/: an earlier winner's phase-2 runs
DAMAGED = DAMAGED_CHECKPOINT


def losing_runs(out: Path, choice: dict) -> tuple[list[Path], list[Path]]:
    """(finished runs whose checkpoints go, unfinished ones that keep theirs) among the runs of every arm
    with a winner in `choice` (tuning.json's content) that are not its winner's."""
    finished, unfinished = [], []
    for arm, entry in choice["arms"].items():
        if "winner" not in entry:  # nothing chosen: nothing lost
            continue
        winner = entry["winner"]["trial"]
        folders = [out / TUNE_DIR / arm / t["trial"] for t in entry["trials"] if t["trial"] != winner]
        superseded = out / SUPERSEDED_DIR / arm
        if superseded.is_dir():
            folders += sorted(p for p in superseded.iterdir() if p.is_dir() and p.name != winner)
        for run_dir in (r for folder in folders for r in run_folders(folder)):
            (finished if is_finished(run_dir) else unfinished).append(run_dir)
    return finished, unfinished


def run_folders(folder: Path) -> list[Path]:
    """The run folders (with a config.yaml) at or under `folder`, never looked into further (a run's own
    folders, replaced-<time>/ and evaluations/, are not runs of the sweep)."""
    if (folder / CONFIG_FILE).is_file():
        return [folder]
    if not folder.is_dir():
        return []
    return [run for sub in sorted(folder.iterdir()) if sub.is_dir() for run in run_folders(sub)]


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The run's checkpoint files that are there."""
    return [run_dir / name for name in (*CHECKPOINT_FILES, DAMAGED) if (run_dir / name).is_file()]


def prune_run(run_dir: Path, on: str) -> int:
    """Delete the run's checkpoint files, the note (PRUNED_FILE) written first; the bytes freed (0: none was
    left). A kill between the two leaves the note beside a checkpoint: training then resumes as usual."""
    files = checkpoint_files(run_dir)
    if not files:
        return 0
    inodes = {(s.st_dev, s.st_ino): s.st_size for s in (f.stat() for f in files)}  # a hard link counts once
    write_text(run_dir / PRUNED_FILE, f"checkpoints pruned by --keep-checkpoints winners on {on} "
                                      f"({', '.join(f.name for f in files)}: {size_text(sum(inodes.values()))})\n")
    for path in files:
        path.unlink()
    return sum(inodes.values())


def prune_losers(out: Path, choice: dict, on: str | None = None) -> str:
    """Prune every losing run's checkpoints (losing_runs); the one line that says what was freed."""
    finished, unfinished = losing_runs(out, choice)
    on = on or time.strftime("%Y-%m-%d")
    freed = [prune_run(run_dir, on) for run_dir in finished]
    pruned = sum(1 for b in freed if b)
    kept = f"; {len(unfinished)} unfinished kept theirs (the next launch resumes them)" if unfinished else ""
    return (f"--keep-checkpoints winners: {size_text(sum(freed))} freed, the checkpoints of {pruned} losing run(s) "
            f"deleted ({len(finished) - pruned} pruned earlier; their summaries, logs and predictions stay, and a "
            f"note, {PRUNED_FILE}){kept}")


def size_text(size: int) -> str:
    """Bytes as GB (1 GB and more) or MB, one decimal."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
