"""The runs under a folder and how they compare: each run directory's record (config, metrics log,
launcher status, predictions, intervals), seed replicates grouped by arm, and the core experiment's
paired comparisons (pretrained vs scratch, ResNet50 vs ResNet18) with paired-bootstrap intervals and
McNemar's test. Reads only run-directory files; numpy only (no torch)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from dr_resnet.config import is_pretrained
from dr_resnet.results.metrics import METRICS, collapse, majority_baseline
from dr_resnet.results.predictions import Predictions, read_predictions
from dr_resnet.results.rundir import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    FINAL_PREDICTIONS_FILE,
    LAST_CHECKPOINT,
    PREDICTIONS_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    read_metrics,
    selected_on,
    selected_row,
)
from dr_resnet.results.stats import RESAMPLES, bootstrap_intervals, paired_comparison

SEED_FOLDER = re.compile(r"seed\d+")  # launch.sweep --seeds: SWEEP_DIR/<arm>/seed<k>/


@dataclass
class RunRecord:
    name: str
    path: Path
    depth: int
    weights: str
    epochs_planned: int
    rows: list[dict]
    launch_status: str = ""  # "not run: <reason>" or "failed: <reason>", from the launcher
    select_by: str = "qwk"  # the run's train.select_by
    arm: str = ""  # the arm a seed replicate belongs to (SWEEP_DIR/<arm>/seed<k>/); else the run's own name
    seed: int = 0  # train.seed

    @property
    def pretrained(self) -> bool:
        return is_pretrained(self.weights)

    @property
    def label(self) -> str:
        return "pretrained" if self.pretrained else "scratch"

    @property
    def has_val(self) -> bool:
        """Whether the run held out part of its training split (data.val_fraction) to choose epochs on."""
        return bool(self.rows) and selected_on(self.rows[-1]) == "val"

    def chosen(self) -> dict | None:
        """The epoch the run itself selects (its checkpoint_best.pt): by its train.select_by on its
        held-out set, else its final epoch."""
        return selected_row(self.rows, self.select_by) if self.rows else None

    @property
    def collapsed(self) -> str:
        """Why the selected epoch looks collapsed ('' when it does not, or before any epoch)."""
        return collapse(np.array(self.chosen()["confusion_matrix"])) if self.rows else ""

    def predictions(self, epoch: str = "selected") -> Predictions | None:
        """The selected (or `epoch="final"`: the final planned) epoch's per-image test predictions,
        predictions.csv or predictions_final.csv, if the run wrote them; each read once (the comparisons,
        the intervals and the calibration figure all ask)."""
        return self._selected_predictions if epoch == "selected" else self._final_predictions

    @cached_property
    def _selected_predictions(self) -> Predictions | None:
        return self._read(PREDICTIONS_FILE)

    @cached_property
    def _final_predictions(self) -> Predictions | None:
        return self._read(FINAL_PREDICTIONS_FILE)

    def _read(self, name: str) -> Predictions | None:
        path = self.path / name
        return read_predictions(path) if path.is_file() else None

    def intervals(self) -> dict | None:
        """Bootstrap 95% intervals of the selected epoch's metrics: the run summary's, else computed from
        its predictions.csv; None without either."""
        summary = self.path / SUMMARY_FILE
        if summary.is_file():
            recorded = json.loads(summary.read_text()).get("intervals")
            if recorded:
                return recorded
        found = self.predictions()
        return bootstrap_intervals(found.labels, found.grades, found.referable_scores, found.names) if found else None

    @property
    def baseline(self) -> float | None:
        return majority_baseline(np.array(self.rows[-1]["confusion_matrix"])) if self.rows else None


def find_runs(root: Path) -> list[RunRecord]:
    """Run directories under root (root itself, or up to two levels down), sorted by depth then name."""
    candidates = [root] + sorted(p for p in root.glob("*") if p.is_dir()) + sorted(p for p in root.glob("*/*") if p.is_dir())
    runs = []
    for path in candidates:
        config_file, status_file = path / CONFIG_FILE, path / STATUS_FILE
        if not config_file.is_file():
            continue
        cfg = yaml.safe_load(config_file.read_text()) or {}
        rows = read_metrics(path)
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
        reason = f"{status.get('status', 'failed')}: {status.get('reason', '')}" if status else ""
        replicate = SEED_FOLDER.fullmatch(path.name) is not None and path != root
        name = f"{path.parent.name}/{path.name}" if replicate else path.name
        runs.append(RunRecord(name, path, int(cfg["model"]["depth"]), str(cfg["model"]["weights"]),
                              int(cfg["train"]["epochs"]), rows, reason, str(cfg["train"].get("select_by", "qwk")),
                              path.parent.name if replicate else path.name, int(cfg["train"].get("seed", 0))))
    return sorted(runs, key=lambda r: (r.depth, not r.pretrained, r.arm, r.seed))


COMPARED = ("accuracy", "qwk", "referable_auc")  # the paired comparisons' and the seed table's metrics
PAIR_METRICS = tuple((name, METRICS[name].label) for name in COMPARED)


def arm_pairs(runs: list[RunRecord]) -> list[tuple[str, list[RunRecord], list[RunRecord], str, str]]:
    """The core experiment's pairs: pretrained vs scratch at each depth, ResNet18 vs ResNet50 at each
    initialisation, as (question, A's runs, B's runs, A's name, B's name); an arm's runs are its seeds
    (none when it has no run)."""
    def find(depth: int, pretrained: bool) -> list[RunRecord]:
        return [r for r in runs if r.depth == depth and r.pretrained == pretrained]

    depths = sorted({r.depth for r in runs})
    pairs = [(f"pretraining at ResNet{d}", find(d, True), find(d, False), f"resnet{d} pretrained", f"resnet{d} scratch")
             for d in depths]
    for shallow, deep in zip(depths, depths[1:]):
        for init in (True, False):
            label = "pretrained" if init else "scratch"
            pairs.append((f"depth {deep} vs {shallow}, {label}", find(deep, init), find(shallow, init),
                          f"resnet{deep} {label}", f"resnet{shallow} {label}"))
    return pairs


def _why_not(name: str, runs: list[RunRecord], epoch: str) -> str:
    file = PREDICTIONS_FILE if epoch == "selected" else FINAL_PREDICTIONS_FILE
    if not runs:
        return f"{name} has no run"
    run = runs[0]
    if run.launch_status or not run.rows:
        return f"{name} has no {file} ({run.launch_status or 'no selected epoch yet'})"
    if epoch == "final" and run.rows[-1]["epoch"] < run.epochs_planned:
        return f"{name} has no {file} (epoch {run.rows[-1]['epoch']} of {run.epochs_planned}: not finished)"
    checkpoint, since = (BEST_CHECKPOINT, "0.2") if epoch == "selected" else (LAST_CHECKPOINT, "0.3.1")
    return (f"{name} has no {file} (trained before dr-resnet {since} wrote one: python -m dr_resnet.evaluate "
            f"--checkpoint {run.path / checkpoint} --out DIR writes DIR/{PREDICTIONS_FILE}; copy it to "
            f"{run.path / file})")


COMPARED_EPOCHS = ("selected", "final")  # compare_arms(epoch=...): the report compares the arms at both


def compare_arms(runs: list[RunRecord], resamples: int = RESAMPLES, epoch: str = "selected") -> list[dict]:
    """For each pair of arm_pairs: A - B in accuracy, QWK and referable AUC at each run's selected epoch
    (predictions.csv) or `epoch="final"` its final planned epoch (predictions_final.csv), with
    paired-bootstrap 95% intervals and McNemar's test; arms with seeds are paired seed by seed and pooled
    (the mean difference over the seeds they share); or why not."""
    if epoch not in COMPARED_EPOCHS:
        raise ValueError(f"epoch must be one of {', '.join(COMPARED_EPOCHS)}, got {epoch!r}")
    results = []
    for question, side_a, side_b, name_a, name_b in arm_pairs(runs):
        entry = {"comparison": question, "epoch": epoch, "a": name_a, "b": name_b}
        done_a = {r.seed: r for r in side_a if r.predictions(epoch) is not None}
        done_b = {r.seed: r for r in side_b if r.predictions(epoch) is not None}
        missing = [_why_not(n, side, epoch) for n, side, done in ((name_a, side_a, done_a), (name_b, side_b, done_b))
                   if not done]
        seeds = sorted(set(done_a) & set(done_b))
        if missing or not seeds:
            reason = "; ".join(missing) or f"no seed in common ({sorted(done_a)} and {sorted(done_b)})"
            results.append({**entry, "status": f"not compared: {reason}"})
            continue
        found_a, found_b = ([done_a[k].predictions(epoch) for k in seeds],
                            [done_b[k].predictions(epoch) for k in seeds])
        first = found_a[0]
        different = [(r.name, len(p.names)) for r, p in zip([done_a[k] for k in seeds] + [done_b[k] for k in seeds],
                                                            found_a + found_b)
                     if p.names != first.names or not np.array_equal(p.labels, first.labels)]
        if different:
            name, count = different[0]
            results.append({**entry, "status": f"not compared: {done_a[seeds[0]].name} and {name} were evaluated on "
                                               f"different images ({len(first.names)} and {count}): a paired "
                                               f"comparison needs the same test set"})
            continue
        paired = paired_comparison(first.labels, [(p.grades, p.referable_scores) for p in found_a],
                                   [(p.grades, p.referable_scores) for p in found_b], first.names, resamples=resamples)
        mcnemar = paired["mcnemar"] if isinstance(paired["mcnemar"], list) else [paired["mcnemar"]]
        results.append({**entry, "status": "compared", "images": len(first.names), "resampled": paired["unit"],
                        "seeds": seeds, **{m: paired[m] for m, _ in PAIR_METRICS}, "mcnemar": mcnemar})
    return results


SEED_COLUMNS = (*PAIR_METRICS, *((f"final_{name}", f"final-epoch {METRICS[name].label}") for name in ("accuracy", "qwk")))
# seed_summary's columns that the tables show


def seed_summary(runs: list[RunRecord]) -> list[dict]:
    """Per arm: its seeds' test accuracy, QWK and referable AUC at the selected epoch and (final_*) at the
    final epoch, mean and standard deviation; and the seeds whose selected epoch collapsed."""
    arms: dict[str, list[RunRecord]] = {}
    for run in runs:
        if run.rows:
            arms.setdefault(run.arm, []).append(run)
    table = []
    for arm, group in arms.items():
        epochs = {"": [r.chosen() for r in group], "final_": [r.rows[-1] for r in group]}
        row = {"arm": arm, "seeds": [r.seed for r in group], "collapsed": [r.seed for r in group if r.collapsed]}
        for prefix, rows in epochs.items():
            for key, name in (("test_acc", "accuracy"), ("test_qwk", "qwk"), ("test_referable_auc", "referable_auc")):
                values = np.array([c.get(key, math.nan) for c in rows], dtype=float)
                row[prefix + name] = {"mean": float(values.mean()), "values": values.tolist(),
                                      "sd": float(values.std(ddof=1)) if len(values) > 1 else None}
        table.append(row)
    return table
