"""The run directory: every file name in it (RUN_FILES says what each holds and what writes it), its
per-epoch log (training appends to it and trims it on resume; the report reads it) and the rule that
selects a run's epoch. Nothing else spells these names. No torch here, so the report stays light.
"""

from __future__ import annotations

import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from dr_resnet.config import SelectBy
from dr_resnet.errors import UserError
from dr_resnet.files import write_text

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LAST_CHECKPOINT = "checkpoint_last.pt"
PREV_CHECKPOINT = "checkpoint_prev.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
CONFUSION_PNG = "confusion_matrix.png"
TRAIN_LOG = "train.log"
PREDICTIONS_FILE = "predictions.csv"  # layout: predictions.py
VAL_PREDICTIONS_FILE = "predictions_val.csv"
FINAL_PREDICTIONS_FILE = "predictions_final.csv"
EVALUATIONS_DIR = "evaluations"  # evaluate's results on other datasets and splits: evaluations/<dataset>-<split>/
PRETRAINING_JOB_FILE = "job.json"  # a sweep's backbone folder: the SLURM job pretraining it (launch/backbones.py)
STATUS_FILE = "launch_status.json"  # {"status": "not run" | "failed", "reason": ..., "detail": ...}
PRUNED_FILE = "checkpoints_pruned.txt"  # a run whose checkpoints were deleted (pruned_note)
DAMAGED_CHECKPOINT = LAST_CHECKPOINT + ".damaged"  # a last checkpoint that could not be read, moved aside by a resume
REPLACED_PREFIX = "replaced-"  # replaced-<time>/: an earlier run's files, moved aside by train.resume=never
BACKBONE_FILE = "backbone.pt"  # python -m dr_resnet.pretrain's result: what model.weights=PATH loads
BACKBONE_RECORD = "backbone.json"  # beside it: its initialisation and what it learned from (config.recorded_initialisation)
PRETRAINING_PNG = "pretraining.png"  # the pretraining's health: loss and spread per epoch
WANDB_DIR = "wandb"  # W&B's own files for the run (wandb.init's dir is the run folder)
CHECKPOINT_FILES = (LAST_CHECKPOINT, PREV_CHECKPOINT, BEST_CHECKPOINT)  # what pruning deletes (also the .damaged one)
SELECTED_PREDICTIONS = (PREDICTIONS_FILE, VAL_PREDICTIONS_FILE)  # the files that go with checkpoint_best.pt
PENDING_SUFFIX = ".pending"


@dataclass(frozen=True)
class RunFile:
    """A file (or folder: a name ending in /) of the run directory, for the people who read it."""

    name: str
    holds: str  # what is in it
    written_by: str  # the commands that write it (and, after a semicolon, those that read it)


RUN_FILES = (
    RunFile(CONFIG_FILE, "the resolved config, followed by what the run recorded: the recipe (what photos go through "
            "before the network) and the values it derived (effective: learning rate, global batch, ...)", "train, launch.sweep"),
    RunFile(METRICS_FILE, "one JSON object per epoch: the losses, every metric on the test split (and on the held-out "
            "part), the confusion matrix, the learning rate, the gradients' norms, the timings", "train; read by report"),
    RunFile(SUMMARY_FILE, "the selected and the final epochs' metrics (with their bootstrap intervals), the collapse "
            "flag, the patients shared between the splits, the images left out", "train; read by report"),
    RunFile(LAST_CHECKPOINT, "the resume point (the end of an epoch, or inside one)", "train"),
    RunFile(PREV_CHECKPOINT, "the resume point before it, kept until the next one is complete; gone once the run has "
            "finished", "train"),
    RunFile(BEST_CHECKPOINT, "the selected epoch's training state: what evaluate, predict and export read", "train"),
    RunFile(DAMAGED_CHECKPOINT, f"a {LAST_CHECKPOINT} that could not be read, moved aside when the run resumed from "
            f"{PREV_CHECKPOINT}", "train"),
    RunFile(CONFUSION_PNG, "the selected epoch's confusion matrix", "train (evaluate writes one in its --out)"),
    RunFile(PREDICTIONS_FILE, "the selected epoch's per-image test predictions (layout: results/predictions.py)",
            "train (evaluate writes one in its --out); read by report"),
    RunFile(VAL_PREDICTIONS_FILE, "the same on the held-out part of the training split (with data.val_fraction)", "train"),
    RunFile(FINAL_PREDICTIONS_FILE, "the final planned epoch's per-image test predictions (the report's final-epoch "
            "comparisons)", "train; read by report"),
    RunFile("*.csv" + PENDING_SUFFIX, f"a newly selected epoch's predictions, written before its {BEST_CHECKPOINT} and "
            "renamed in place after it: a kill between them leaves the old pair and a pending file that the next start "
            "renames or deletes, and that the report refuses to guess on", "train"),
    RunFile(BACKBONE_FILE, "a pretraining run's result: the backbone's weights without a classifier, its initialisation "
            "(ssl, imagenet+ssl) and its record; model.weights=PATH fine-tunes from it", "pretrain; read by train"),
    RunFile(BACKBONE_RECORD, "the backbone's record: initialisation, method, the pool of photos (each source with its "
            "counts), epochs, the settings' hash, CPU- or GPU-hours", "pretrain; read by train, report"),
    RunFile(PRETRAINING_JOB_FILE, 'a sweep\'s backbone folder: the job that pretrains it, {"job_id", "log", '
            '"submitted_at"}, so that a later or concurrent sweep waits on that job instead of submitting another',
            "launch.sweep"),
    RunFile(PRETRAINING_PNG, "the pretraining's health per epoch: its loss and the outputs' spread x sqrt(d) (about 1 "
            "healthy, near 0 collapsed)", "pretrain"),
    RunFile(TRAIN_LOG, "rank 0's log and every rank's warnings, appended across resumes and requeues", "train"),
    RunFile(STATUS_FILE, 'a launcher\'s word on a run it could not run: {"status": "not run" | "failed", "reason", '
            '"detail"}', "launch.sweep; read by report"),
    RunFile(PRUNED_FILE, "one line: the checkpoints were deleted, by what and when (a tuning trial that lost); "
            "training refuses to start over in such a folder", "launch.sweep --keep-checkpoints winners"),
    RunFile(EVALUATIONS_DIR + "/", "<dataset>-<split>/: evaluate's results on other datasets and splits "
            "(metrics.json, predictions.csv, confusion_matrix.png)", "evaluate"),
    RunFile(REPLACED_PREFIX + "<time>/", "an earlier run's files, moved aside by train.resume=never (its "
            f"{TRAIN_LOG} stays in place)", "train"),
    RunFile(WANDB_DIR + "/", "W&B's files for the run (offline runs: upload them with `wandb sync`)", "train, "
            "with wandb.mode online or offline"),
)


class MetricsError(UserError, ValueError):
    """A metrics log with a damaged line other than the last; the message names the file and line."""


def read_metrics(run_dir: Path, up_to_epoch: int | None = None) -> list[dict]:
    """One dict per logged epoch (up to and including up_to_epoch, if given); [] if none yet. A last line
    cut short (a process killed while appending it) is left out: its epoch has no checkpoint yet."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise MetricsError(f"{path}: line {number} is not JSON ({exc.msg}); the file is damaged") from exc
    return [r for r in rows if up_to_epoch is None or r["epoch"] <= up_to_epoch]


def rewrite_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Keep exactly the epochs a checkpoint covers (an epoch logged after the last checkpoint is redone)."""
    write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


SELECT_BY = typing.get_args(SelectBy)  # train.select_by
FINAL = "final"  # selected_on when a run has no held-out part: its final epoch is its result


def selected_on(row: dict) -> str:
    """How a run chooses its epoch: on the held-out part of its training split ("val") if it has one
    (data.val_fraction), else it takes its final epoch ("final"). Never on the test split."""
    return "val" if "val_qwk" in row else FINAL


def selection_value(row: dict, select_by: str, on: str = "val") -> float:
    """Higher is better: QWK, accuracy, or minus the loss, on split `on` ("val", or "test" for tables
    that show how optimistic choosing on test would be)."""
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    if select_by == "loss":
        loss = row[f"{on}_loss"]
        return -loss if loss is not None else math.nan
    return row[f"{on}_qwk"] if select_by == "qwk" else row[f"{on}_acc"]


def selected_row(rows: list[dict], select_by: str, on: str | None = None) -> dict:
    """THE selected epoch's row: the best by train.select_by on the held-out part (ties: the earlier
    epoch; a NaN or infinite value never wins), or the final epoch without one. It is the epoch of
    checkpoint_best.pt, the summary's "selected", the report's and the benchmarks' choice. `on="test"`
    forces the choice on the test split, only for showing how optimistic that would be: never a result."""
    on = on or selected_on(rows[-1])
    if on == FINAL:
        return rows[-1]
    # NaN compares false both ways, so a plain max kept a NaN first epoch against every later one: a
    # non-finite value ranks below every finite one. With no finite epoch the first is returned, and
    # `selectable` says so (tuning counts such a run as diverged).
    return max(rows, key=lambda r: (selectable(r, select_by, on), _finite_or_zero(selection_value(r, select_by, on)),
                                    -r["epoch"]))


def selectable(row: dict, select_by: str, on: str = "val") -> bool:
    """Whether the row's selection value is a finite number (a diverged epoch logs NaN or inf)."""
    value = selection_value(row, select_by, on)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _finite_or_zero(value: float | None) -> float:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def pending_path(path: Path) -> Path:
    """Where a selected epoch's predictions file waits for its checkpoint_best.pt."""
    return path.with_name(path.name + PENDING_SUFFIX)


def pending_files(run_dir: Path) -> list[Path]:
    """The selected-epoch predictions still waiting (a kill came between them and their checkpoint)."""
    return [p for p in (pending_path(Path(run_dir) / n) for n in SELECTED_PREDICTIONS) if p.is_file()]


def commit_pending(run_dir: Path) -> None:
    """checkpoint_best.pt is written: its predictions take their place (a rename each)."""
    for path in pending_files(run_dir):
        path.replace(path.with_name(path.name.removesuffix(PENDING_SUFFIX)))


def settle_pending(run_dir: Path, selected_epoch: int | None) -> list[str]:
    """At a (re)start, before training: pending predictions of the epoch the resumed run selects have their
    checkpoint_best.pt (it is written before the checkpoint the run resumed from) and are renamed in
    place; any others belong to an epoch about to be redone and are deleted. Returns what was done."""
    from dr_resnet.results.predictions import read_predictions

    done = []
    for path in pending_files(run_dir):
        epoch = read_predictions(path).epoch
        final = path.with_name(path.name.removesuffix(PENDING_SUFFIX))
        if epoch is not None and epoch == selected_epoch:
            path.replace(final)
            done.append(f"completed {final.name} of epoch {epoch}, whose checkpoint_best.pt was written")
        else:
            path.unlink()
            done.append(f"removed {path.name} of epoch {epoch}, stopped before its checkpoint: the epoch is redone")
    return done


# train.log's first line of every launch (training's or pretraining's: train.announce_launch)
LAUNCH_LINE = re.compile(r" INFO dr_resnet\.(?:train|pretrain): dr_resnet \S+: config ")
ERROR_LINE = re.compile(r"^\S+ \S+ (?:\[rank \d+\] )?ERROR \S+: (.*)$")


def last_launch_error(run_dir: Path) -> str:
    """Why the run's last launch ended with an error, in one line, from its train.log ('' when it did
    not, or there is no log): the user error it logged, or an unexpected error's last traceback line."""
    path = Path(run_dir) / TRAIN_LOG
    if not path.is_file():
        return ""
    lines = path.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if LAUNCH_LINE.search(line)]
    last = lines[starts[-1]:] if starts else lines
    for i, line in enumerate(last):
        found = ERROR_LINE.match(line)
        if found:
            more = []  # the message's further lines (a data error lists its problems), or a traceback
            for following in last[i + 1:]:
                if re.match(r"^\d{4}-\d\d-\d\d ", following):
                    break
                more.append(following.strip())
            more = [m for m in more if m]
            if more and more[0].startswith("Traceback"):
                return f"{found.group(1)}: {more[-1]}"  # an unexpected error: the exception is the last line
            return " ".join([found.group(1), *more])
    return ""


def is_finished(run_dir: Path, epochs: int | None = None) -> bool:
    """Whether the run completed every planned epoch (or `epochs`, where a config now plans more) and
    wrote its final summary (with its intervals)."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return False
    try:
        content = json.loads(path.read_text())
    except ValueError:
        return False
    planned = max(content.get("epochs_planned", 1), epochs or 0)
    return content.get("epochs_completed", 0) >= planned and "intervals" in content


def pruned_note(run_dir: Path) -> str:
    """The line that says the run's checkpoints were pruned, by what and when ('' when they were not)."""
    path = Path(run_dir) / PRUNED_FILE
    if not path.is_file():
        return ""
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[0] if lines else "checkpoints pruned"


def missing_checkpoint(path: Path) -> str:
    """Why a checkpoint file is not there, in one line: pruned (the run folder's note, and what stays), or
    plainly not found."""
    note = pruned_note(Path(path).parent)
    if note:
        return (f"{path} is gone: {note} (the run's summary, logs and predictions stay); to have its weights, "
                f"train it again in another folder")
    return f"checkpoint not found: {path}"
