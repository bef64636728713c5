"""Weights & Biases for the training loop: rank 0 only, bounded start, never raises into training.

- Mode: `wandb.mode` from the config (online | offline | disabled); the WANDB_MODE variable wins.
- Online with no API key: offline at once, with one warning (no interactive prompt, ever).
- Online start that fails or outlasts `wandb.init_timeout`: offline, with one warning.
- Any later W&B error: one warning, then tracking stops; training goes on.
- The run id is made here and stored in the checkpoint, so a resumed or requeued run continues the
  same W&B run (``resume="allow"``). Everything is logged against our own ``epoch`` axis, since an
  offline run resumed in a new process restarts W&B's internal step at 0.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import string
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dr_resnet.config import ModelConfig, WandbMode
from dr_resnet.results.metrics import METRICS
from dr_resnet.results.rundir import WANDB_DIR

log = logging.getLogger(__name__)

MODES = typing.get_args(WandbMode)  # wandb.mode
DEFAULT_PROJECT = "dr-resnet"  # wandb.project when neither the config nor WANDB_PROJECT names one


@dataclass(frozen=True)
class TrackingSettings:
    mode: str = "disabled"
    project: str = ""  # '' : WANDB_PROJECT, else DEFAULT_PROJECT
    entity: str = ""
    group: str = ""  # the sweep folder's name: the W&B UI groups the four arms by it ('' : WANDB_RUN_GROUP)
    name: str = ""  # the run's name ('' : WANDB_NAME, else the run directory's name)
    job_type: str = "train"  # what the run does: train, eval (W&B's meaning; the arm is a tag and in the config)
    tags: tuple[str, ...] = ()  # WANDB_TAGS (comma-separated) are added
    init_timeout: float = 20.0  # seconds for an online start before falling back to offline
    log_checkpoint: bool = False  # upload the best checkpoint as an artifact at the end
    log_predictions: bool = False  # log the selected epoch's per-image predictions as a W&B Table at the end


def _confusion_media(wandb, cm: list[list[int]], png: Path | None) -> dict[str, Any]:
    """A confusion matrix of counts as W&B's plot (and its PNG when there is one)."""
    from dr_resnet import GRADES

    y_true = [t for t, row in enumerate(cm) for p, n in enumerate(row) for _ in range(n)]
    y_pred = [p for t, row in enumerate(cm) for p, n in enumerate(row) for _ in range(n)]
    media: dict[str, Any] = {"confusion_matrix": wandb.plot.confusion_matrix(y_true=y_true, preds=y_pred,
                                                                             class_names=list(GRADES))}
    if png is not None and Path(png).is_file():
        media["confusion_matrix_png"] = wandb.Image(str(png))
    return media


TEXT_COLUMNS = ("image", "patient")  # predictions.csv's names: text, so that patient "007" stays "007"


def table_of(path: Path) -> tuple[list[str], list[list[Any]]]:
    """A predictions.csv's header and rows for a W&B Table: the names as text, every other cell a number
    (an int where it reads as one; an empty cell, such as evaluate's epoch, None), so that the UI sorts
    and plots the columns as numbers."""
    def number(cell: str) -> int | float | None:
        if cell == "":
            return None
        try:
            return int(cell)
        except ValueError:
            return float(cell)

    with open(path, newline="") as f:
        reader = csv.reader(f)
        columns = next(reader, [])
        text = [c in TEXT_COLUMNS for c in columns]
        return columns, [[cell if keep else number(cell) for cell, keep in zip(row, text)] for row in reader]


def identity(model: ModelConfig, seed: int) -> dict[str, Any]:
    """What a run is, for the W&B UI's filters (the config's `run` section) and its tags."""
    return {"arm": model.arm, "depth": model.depth, "initialisation": model.initialisation, "seed": seed}


def identity_tags(run: dict[str, Any]) -> tuple[str, ...]:
    return (run["arm"], f"resnet{run['depth']}", run["initialisation"], f"seed{run['seed']}")


def training_tags(run: dict[str, Any], tags: str) -> tuple[str, ...]:
    """A training run's tags: what it is (identity_tags) and wandb.tags (comma-separated)."""
    return (*identity_tags(run), *(t.strip() for t in tags.split(",") if t.strip()))


def requested_mode(mode: str) -> str:
    """The mode a run asks for: WANDB_MODE, else `mode` (wandb.mode); an unknown one disables tracking."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower() or mode
    if mode == "dryrun":  # W&B's old name for offline
        mode = "offline"
    if mode not in MODES:
        log.warning("W&B: unknown mode %r (WANDB_MODE or wandb.mode): tracking disabled", mode)
        return "disabled"
    return mode


def new_run_id() -> str:
    """8 characters of [a-z0-9], W&B's run-id alphabet; made here so the checkpoint can keep it."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class Tracker:
    """W&B run of rank 0, or a no-op. Each method swallows W&B errors after one warning."""

    def __init__(self, settings: TrackingSettings, run_dir: Path, run_id: str, config: dict[str, Any],
                 is_main: bool = True) -> None:
        self.settings, self.run_dir, self.run_id, self.config = settings, Path(run_dir), run_id, config
        self.run = None
        self.mode = "disabled"
        self.start_seconds = 0.0
        if is_main:
            self._start()

    @property
    def active(self) -> bool:
        return self.run is not None

    def _start(self) -> None:
        mode = requested_mode(self.settings.mode)
        if mode == "disabled":
            return
        start = time.perf_counter()
        try:
            import wandb
        except Exception as exc:  # a broken install must not stop training
            log.warning("W&B: cannot import wandb (%s): tracking disabled", exc)
            return
        if mode == "online" and not self._has_api_key(wandb):
            log.warning("W&B: no API key (run `wandb login` or set WANDB_API_KEY): logging offline to %s; "
                        "upload later with `wandb sync`", self.run_dir / WANDB_DIR)
            mode = "offline"
        self.run = self._init(wandb, mode)
        if self.run is None and mode == "online":
            self._teardown(wandb)  # the failed attempt's service still holds the run id
            log.warning("W&B: online start failed or took over %.0f s: logging offline instead; "
                        "upload later with `wandb sync %s`", self.settings.init_timeout, self.run_dir / WANDB_DIR)
            self.run = self._init(wandb, "offline")
        if self.run is not None:
            self.mode = mode if self.run.settings.mode != "offline" else "offline"
            # wandb.mode says what was asked for; an online start that fell back to offline is recorded too
            self._guard("config", self.run.config.update, {"wandb_mode_used": self.mode}, allow_val_change=True)
            self.run.define_metric("epoch")
            self.run.define_metric("*", step_metric="epoch")
        self.start_seconds = time.perf_counter() - start

    @staticmethod
    def _teardown(wandb) -> None:
        try:
            wandb.teardown()
        except Exception as exc:
            log.warning("W&B: teardown after a failed start: %s", exc)

    @staticmethod
    def _has_api_key(wandb) -> bool:
        try:
            return bool(wandb.login(prompt=False, verify=False))
        except Exception:
            return False

    def _init(self, wandb, mode: str):
        s = self.settings
        env_tags = [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]
        tags = list(dict.fromkeys([*s.tags, *env_tags]))
        try:
            return wandb.init(  # a field the config leaves empty: W&B's own WANDB_* variable, then our default
                project=s.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, entity=s.entity or None,
                group=s.group or None, name=s.name or os.environ.get("WANDB_NAME") or self.run_dir.name,
                job_type=s.job_type, tags=tags or None, config=self.config, dir=str(self.run_dir),
                id=self.run_id, resume="allow", mode=mode, reinit="create_new",
                settings=wandb.Settings(init_timeout=s.init_timeout, finish_timeout=30, console="off",
                                        silent=True))
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            log.warning("W&B: %s start failed (%s: %s)", mode, type(exc).__name__, first_line[:300])
            return None

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            log.warning("W&B: %s failed (%s: %s): tracking stops here, training goes on", what, type(exc).__name__, exc)
            self._close()

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One epoch's metrics on the `epoch` axis; per-grade recall as <split>_recall/grade_<g> keys, a
        regression head's thresholds as thresholds/<i>."""
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for split in ("test", "val"):
            for grade, recall in enumerate(row.get(f"{split}_recall", [])):
                values[f"{split}_recall/grade_{grade}"] = recall
        for i, threshold in enumerate(row.get("thresholds", [])):
            values[f"thresholds/{i}"] = threshold
        self._guard("log", lambda: self.run.log(values))

    def update_summary(self, values: dict[str, Any]) -> None:
        """Values into the W&B run's summary (a pretraining's final loss and cost)."""
        self._guard("summary", lambda: self.run.summary.update(values))

    def log_summary(self, summary: dict[str, Any], confusion_png: Path | None) -> None:
        """The selected and final epochs' values, the majority baseline, the collapse flag, and the
        confusion matrix (plot and image)."""
        def write():
            import wandb

            selected, final = summary["selected"], summary["final"]
            headline = [m.key("test") for m in METRICS.values() if m.headline]  # test_acc, test_qwk
            self.run.summary.update({
                **{f"selected/{k}": selected[k] for k in headline}, **{f"final/{k}": final[k] for k in headline},
                "selected/epoch": selected["epoch"], "selected/on": summary["selected_on"],
                "majority_baseline": summary["majority_baseline"], "epochs_completed": summary["epochs_completed"],
                "collapsed": bool(summary.get("collapsed")), "collapsed_reason": summary.get("collapsed", ""),
            })
            intervals = summary.get("intervals")
            if intervals:  # the selected epoch's bootstrap 95% intervals: selected/test_qwk_low, ..._high, ...
                self.run.summary.update({f"selected/test_{m}_{end}": intervals[m][end] for m in intervals
                                         if isinstance(intervals[m], dict) for end in ("low", "high")})
                self.run.summary["selected/intervals_resampled"] = intervals["unit"]
            self.run.log({"epoch": summary["epochs_completed"], **_confusion_media(wandb, summary["confusion_matrix"],
                                                                                  confusion_png)})
        self._guard("summary", write)

    def log_evaluation(self, result: dict[str, Any], confusion_png: Path | None) -> None:
        """An evaluation (dr_resnet.evaluate's metrics.json): its numbers and 95% intervals in the run
        summary under the split's name (test/qwk, test/qwk_low, ...), and its confusion matrix."""
        def write():
            import wandb

            split = result["split"]
            self.run.summary.update({f"{split}/{k}": v for k, v in result.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
            intervals = result.get("intervals") or {}
            self.run.summary.update({f"{split}/{m}_{end}": intervals[m][end] for m in intervals
                                     if isinstance(intervals[m], dict) for end in ("low", "high")})
            self.run.log(_confusion_media(wandb, result["confusion_matrix"], confusion_png))
        self._guard("evaluation", write)

    def log_checkpoint(self, path: Path, metadata: dict[str, Any]) -> None:
        """The selected checkpoint as a model artifact, model-<run id> (the name Lightning's logger uses),
        each time the selection moves to a new epoch and once more at the end (with the intervals), with
        the aliases `best`, `latest` and `epoch-<n>` and `metadata` (selected epoch, its held-out and test
        metrics, the recipe): the W&B model registry links to `best`."""
        if not self.settings.log_checkpoint or not Path(path).is_file():
            return

        def upload():
            import wandb

            artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata=metadata)
            artifact.add_file(str(path))
            aliases = ["best", "latest"] + ([f"epoch-{metadata['epoch']}"] if "epoch" in metadata else [])
            self.run.log_artifact(artifact, aliases=aliases)
        self._guard("checkpoint artifact", upload)

    def log_tuning(self, path: Path, arm: str, winner: dict[str, Any]) -> None:
        """An arm's tuning record (tuning.json) as an artifact tuning-<arm>, aliased `winner` and with the
        winning trial's name; the winner's values as its metadata."""
        if self.run is None:
            return

        def upload():
            import wandb

            artifact = wandb.Artifact(f"tuning-{arm}", type="tuning", metadata=winner)
            artifact.add_file(str(path))
            self.run.log_artifact(artifact, aliases=["winner", winner["trial"]])
        self._guard("tuning artifact", upload)

    def add_tags(self, *tags: str) -> None:
        """Add tags to those the run has (a resumed run's too)."""
        self._guard("tags", lambda: setattr(self.run, "tags", tuple(dict.fromkeys([*(self.run.tags or ()), *tags]))))

    def log_predictions(self, path: Path) -> None:
        """The selected epoch's predictions.csv as a W&B Table ("predictions"), so arms can be compared
        image by image in the W&B UI too."""
        if not self.settings.log_predictions or not Path(path).is_file():
            return

        def write():
            import wandb

            columns, rows = table_of(path)
            self.run.log({"predictions": wandb.Table(columns=columns, data=rows)})
        self._guard("predictions table", write)

    def _close(self) -> None:
        run, self.run = self.run, None
        try:
            run.finish()
        except Exception as exc:
            log.warning("W&B: finish failed (%s): ignored", exc)

    def finish(self) -> None:
        if self.run is not None:
            self._close()
