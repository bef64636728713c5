"""Tuning at equal budgets, read from run folders (torch-free): each arm's winner among its trials, chosen
on held-out figures only, and the median best held-out score of k of its trials, whose curve shows how far
a comparison of arms depends on the tuning budget (after Dodge et al. 2019, "Show your work").

Every planned trial counts: a failed or diverged trial ranks below every finished one (dropping it would
flatter the arm whose worst trials broke), and a trial the infrastructure lost is "to rerun", with the
arm's N marked incomplete. The winner rule sees a trial's metrics with every test figure removed
(`held_out_view`): it cannot choose on the test split even by mistake.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from dr_resnet.results.arms import RunRecord, read_run
from dr_resnet.results.metrics import collapse
from dr_resnet.results.rundir import (
    CONFIG_FILE,
    FINAL,
    MetricsError,
    selectable,
    selected_on,
    selected_row,
    selection_value,
)
from dr_resnet.seeds import derive_seed

TUNE_DIR = "tune"  # SWEEP_DIR/tune/<arm>/<trial>/: phase 1 of launch.sweep --tune
TUNING_FILE = "tuning.json"  # SWEEP_DIR/tuning.json: each arm's trials, held-out figures and winner

# A trial's status in tuning.json. FAILED and DIVERGED rank below every finished trial; NOT_FINISHED (no
# folder, still running, preempted, or not started by the launcher) is the infrastructure's loss, rerun by
# the next launch of the sweep and left out of N until then; NO_HELD_OUT cannot be ranked at all.
FINISHED, FAILED, DIVERGED, NOT_FINISHED = "finished", "failed", "diverged", "not finished"
NO_HELD_OUT = "no held-out part (data.val_fraction=0): cannot be chosen"
BAND_RESAMPLES = 400  # bootstrap resamples of an arm's trials for the curve's band
BAND_LABEL = "one tuning seed's trials resampled"


def typed(value: object) -> object:
    """An override's text as the int, float or truth value it spells, else unchanged (categorical values, and
    values already typed): how tuning.json stores a trial's values; older files held text."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            number = kind(text)
        except ValueError:
            continue
        return number if math.isfinite(number) else value  # JSON has no NaN: "nan" stays text
    return value


def held_out_view(rows: list[dict]) -> list[dict]:
    """The metrics rows without any test figure (keys test_*, the confusion matrix of the test split)."""
    return [{k: v for k, v in row.items() if not k.startswith("test_") and k != "confusion_matrix"} for row in rows]


def held_out_score(run: RunRecord) -> tuple[float, int] | None:
    """(the run's selection metric on its held-out part at its selected epoch, that epoch), higher is
    better (minus the loss for select_by=loss; NaN when no epoch has a finite one); None for a run without
    a held-out part or an epoch."""
    rows = held_out_view(run.rows)
    if not rows or selected_on(rows[-1]) == FINAL:
        return None
    chosen = selected_row(rows, run.select_by, on="val")
    value = selection_value(chosen, run.select_by, "val") if selectable(chosen, run.select_by, "val") else math.nan
    return value, int(chosen["epoch"])


def collapsed_at(run: RunRecord, epoch: int) -> tuple[str, str]:
    """(why the epoch looks collapsed, '' if not; whose confusion matrix says so): the held-out one where the
    metrics log has it (val_confusion_matrix), else the test split's. A flag only: nothing is chosen on it."""
    row = next(r for r in run.rows if r["epoch"] == epoch)
    if row.get("val_confusion_matrix") is not None:
        return collapse(np.array(row["val_confusion_matrix"])), "held-out"
    return collapse(np.array(row["confusion_matrix"])), "test (no held-out confusion matrix logged)"


def judge_trial(path: Path, name: str, values: dict) -> dict:
    """One trial's entry in tuning.json: its status, and for a finished one its held-out score, epoch and
    collapse flag."""
    entry = {"trial": name, "values": {k: typed(v) for k, v in values.items()}, "run_dir": str(path)}
    run = read_run(path) if (path / CONFIG_FILE).is_file() else None
    if run is None:
        return {**entry, "status": NOT_FINISHED, "reason": "no run folder yet"}
    if not run.complete:
        if run.launch_status.startswith(FAILED) or run.failure:
            return {**entry, "status": FAILED, "reason": run.launch_status.removeprefix(f"{FAILED}: ") or run.failure}
        done = f"epoch {run.rows[-1]['epoch']} of {run.epochs_planned}" if run.rows else "no epoch yet"
        return {**entry, "status": NOT_FINISHED, "reason": run.launch_status or f"{done} (stopped or still running)"}
    score = held_out_score(run)
    if score is None:
        return {**entry, "status": NO_HELD_OUT}
    value, epoch = score
    metric = f"held-out {run.select_by}"
    if not math.isfinite(value):
        return {**entry, "status": DIVERGED, "metric": metric,
                "reason": f"no epoch has a finite held-out {run.select_by} (NaN or infinite)"}
    collapsed, seen_on = collapsed_at(run, epoch)
    return {**entry, "status": FINISHED, "metric": metric, "held_out": -value if run.select_by == "loss" else value,
            "epoch": epoch, "score": value, "collapsed": collapsed, "collapsed_on": seen_on}


def kind_of(trial: dict) -> str:
    """A trial's status, also from tuning.json files before failures counted ('failed: <reason>', 'not run:
    <reason>')."""
    status = trial.get("status", "")
    if "score" in trial:
        return FINISHED
    if status.startswith(FAILED):
        return FAILED
    if status in (DIVERGED, NO_HELD_OUT):
        return status
    return NOT_FINISHED


def tally(trials: list[dict]) -> dict:
    """An arm's counts: planned trials, finished, failed, diverged, those to rerun (N is incomplete until
    they are back) and those without a held-out part."""
    kinds = [kind_of(t) for t in trials]
    to_rerun = [t["trial"] for t, k in zip(trials, kinds) if k == NOT_FINISHED]
    return {"planned": len(trials), "finished": kinds.count(FINISHED), "failed": kinds.count(FAILED),
            "diverged": kinds.count(DIVERGED), "to_rerun": to_rerun, "unranked": kinds.count(NO_HELD_OUT),
            "complete": not to_rerun}


def winner_of(trials: list[dict]) -> dict | None:
    """The finished trial with the best held-out score (ties: the earlier trial, with `tie` and the tied
    trials recorded), or None."""
    scored = [t for t in trials if kind_of(t) == FINISHED]
    if not scored:
        return None
    top = max(t["score"] for t in scored)
    tied = [t for t in scored if t["score"] == top]
    found = {k: tied[0][k] for k in ("trial", "values", "held_out", "epoch", "run_dir", "collapsed", "collapsed_on")
             if k in tied[0]}
    return {**found, "tie": len(tied) > 1, **({"tied": [t["trial"] for t in tied]} if len(tied) > 1 else {})}


def choose(tune_dir: Path, arm_trials: dict[str, dict[str, dict[str, str]]]) -> dict:
    """Each arm's trials (arm -> {trial folder name: its values}, in tune_dir/<arm>/<trial>/) with their
    status and held-out scores, its counts (tally) and its winner (winner_of); an arm without a finished
    trial that held images out has no winner, and a reason."""
    found: dict = {"arms": {}}
    for arm, trials in arm_trials.items():
        entries = [judge_trial(Path(tune_dir) / arm / name, name, values) for name, values in trials.items()]
        result = {"trials": entries, **tally(entries),
                  "metric": next((e["metric"] for e in entries if kind_of(e) == FINISHED), "")}
        winner = winner_of(entries)
        if winner is not None:
            result["winner"] = winner
        else:
            lost = ", ".join(f"{n} {what}" for n, what in ((result["failed"], "failed"), (result["diverged"], "diverged"),
                                                            (len(result["to_rerun"]), "to rerun"),
                                                            (result["unranked"], "without a held-out part")) if n)
            result["reason"] = "no trial finished with a held-out part to choose on" + (f" ({lost})" if lost else "")
        found["arms"][arm] = result
    return found


def median_positions(n: int, k: int) -> tuple[int, int]:
    """The 0-based places in n sorted trials whose mean is the median best of a random k-subset: the best
    is at place i or below with chance C(i+1, k) / C(n, k) (order statistics; exact integers)."""
    if not 1 <= k <= n:
        raise ValueError(f"best of k={k} from {n} trials: k must be 1..{n}")
    subsets = math.comb(n, k)
    i = next(i for i in range(k, n + 1) if 2 * math.comb(i, k) >= subsets)
    # Exactly half the subsets at or below place i: the median lies halfway to the next place, as
    # numpy's median of every subset's best would put it.
    return i - 1, i if 2 * math.comb(i, k) == subsets else i - 1


def median_best_of_k(values: Sequence[float], k: int) -> float | None:
    """The median, over every k-subset of the trials, of the subset's best score; a failed trial is -inf
    (below every finished one). None ("failed") when half the subsets or more hold failures only."""
    v = np.sort(np.asarray(values, dtype=float))
    lo, hi = median_positions(len(v), k)
    middle = (v[lo] + v[hi]) / 2
    return float(middle) if math.isfinite(middle) else None


def all_failed_chance(failures: int, n: int, k: int) -> float:
    """The chance that k distinct trials drawn from n, `failures` of which failed, all failed."""
    return math.comb(failures, k) / math.comb(n, k)


def best_of_k_curve(values: Sequence[float], resamples: int = BAND_RESAMPLES, seed: int = 0) -> list[dict]:
    """For k = 1..N (N: every finished, failed or diverged trial, each failure -inf): the median best of k
    (None: "failed"), the chance that all k failed, and a 95% band (low, high; None: "failed") from
    bootstrap resamples of the N trials, the median recomputed on each."""
    v = np.asarray(values, dtype=float)
    n, failures = len(v), int(np.isneginf(v).sum())
    if n == 0 or np.isnan(v).any() or np.isposinf(v).any():
        raise ValueError(f"best of k: need finite scores or -inf for failures, got {list(values)}")
    rng = np.random.default_rng(derive_seed(seed, "bootstrap"))
    draws = np.sort(v[rng.integers(0, n, size=(resamples, n))], axis=1)
    ordered = np.sort(v)
    curve = []
    for k in range(1, n + 1):
        lo, hi = median_positions(n, k)
        # The places depend on n and k only, so each resample's median is read at the same two places.
        band = np.quantile((draws[:, lo] + draws[:, hi]) / 2, [0.025, 0.975], method="inverted_cdf")
        middle = (ordered[lo] + ordered[hi]) / 2
        curve.append({"k": k, "median": _finite(middle), "all_failed": all_failed_chance(failures, n, k),
                      "low": _finite(band[0]), "high": _finite(band[1])})
    return curve


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def ranked_values(entry: dict) -> list[float]:
    """An arm's trials that count in its curve, in trial order: each finished trial's held-out score
    (higher is better), -inf for each failed or diverged one."""
    return [t["score"] if kind_of(t) == FINISHED else -math.inf for t in entry["trials"]
            if kind_of(t) in (FINISHED, FAILED, DIVERGED)]


def curves_of(choice: dict) -> dict[str, list[dict]]:
    """Each arm's best-of-k curve (best_of_k_curve) over its finished, failed and diverged trials."""
    found = {}
    for arm, entry in choice["arms"].items():
        values = ranked_values(entry)
        if values:
            found[arm] = best_of_k_curve(values)
    return found


def ranking_at(curves: dict[str, list[dict]], k: int) -> list[list[str]]:
    """The arms by median best-of-k held-out score at k trials, highest first, in groups of equal medians
    ("failed" medians together, last)."""
    def median(arm: str) -> float:
        value = curves[arm][min(k, len(curves[arm])) - 1]["median"]
        return -math.inf if value is None else value

    groups: list[list[str]] = []
    for arm in sorted(curves, key=lambda a: -median(a)):
        if groups and median(groups[-1][0]) == median(arm):
            groups[-1].append(arm)
        else:
            groups.append([arm])
    return groups


def ranking_note(curves: dict[str, list[dict]]) -> str:
    """The arms' order by median best-of-k held-out score at a third of the trials and at all of them, or
    "tie": a description of the curve, no verdict."""
    if len(curves) < 2:
        return ""
    n = min(len(c) for c in curves.values())

    def shown(k: int) -> str:
        groups = ranking_at(curves, k)

        def value(arm: str) -> str:
            m = curves[arm][min(k, len(curves[arm])) - 1]["median"]
            return "failed" if m is None else f"{m:.3f}"

        if len(groups) == 1:
            return f"k={k}: tie ({', '.join(groups[0])}: {value(groups[0][0])})"
        return f"k={k}: " + " > ".join(" = ".join(group) + f" ({value(group[0])})" for group in groups)

    few = max(1, round(n / 3))
    at = [shown(k) for k in dict.fromkeys((few, n))]
    return f"Median best-of-k held-out score, {'; '.join(at)}."


def upgraded(choice: dict) -> dict:
    """A tuning.json in the current layout: values typed, every arm's counts and the winner's tie flag
    (older files: values as text, failures under 'failed: <reason>', no counts)."""
    for entry in choice.get("arms", {}).values():
        for trial in entry.get("trials", []):
            trial["values"] = {k: typed(v) for k, v in trial.get("values", {}).items()}
        for key, value in tally(entry.get("trials", [])).items():
            entry.setdefault(key, value)
        if "winner" in entry:
            entry["winner"]["values"] = {k: typed(v) for k, v in entry["winner"].get("values", {}).items()}
            if "tie" not in entry["winner"]:
                again = winner_of(entry["trials"]) or {}
                entry["winner"]["tie"] = again.get("tie", False)
                if again.get("tied"):
                    entry["winner"]["tied"] = again["tied"]
    return choice


def read_choice(root: Path) -> dict | None:
    """root/tuning.json (launch.sweep --tune) in the current layout (upgraded), or None."""
    path = Path(root) / TUNING_FILE
    if not path.is_file():
        return None
    try:
        return upgraded(json.loads(path.read_text()))
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise MetricsError(f"{path}: not the tuning.json launch.sweep --tune writes ({exc}): run the sweep again") from None
