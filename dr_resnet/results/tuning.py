"""Tuning at equal budgets, read from run folders (torch-free): each arm's winner among its trials, chosen
on held-out figures only, and the expected best held-out score over k trials (Dodge et al. 2019, "Show your
work"), whose curve says how far a comparison of arms depends on the tuning budget.

The winner rule sees a trial's metrics with every test figure removed (`held_out_view`): it cannot choose
on the test split even by mistake.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from dr_resnet.results.arms import RunRecord, read_run
from dr_resnet.results.rundir import CONFIG_FILE, FINAL, MetricsError, selected_on, selected_row, selection_value

TUNE_DIR = "tune"  # SWEEP_DIR/tune/<arm>/<trial>/: phase 1 of launch.sweep --tune
TUNING_FILE = "tuning.json"  # SWEEP_DIR/tuning.json: each arm's trials, held-out figures and winner


def held_out_view(rows: list[dict]) -> list[dict]:
    """The metrics rows without any test figure (keys test_*, the confusion matrix of the test split)."""
    return [{k: v for k, v in row.items() if not k.startswith("test_") and k != "confusion_matrix"} for row in rows]


def held_out_score(run: RunRecord) -> tuple[float, int] | None:
    """(the run's selection metric on its held-out part at its selected epoch, that epoch), higher is
    better (minus the loss for select_by=loss); None for a run without a held-out part or an epoch."""
    rows = held_out_view(run.rows)
    if not rows or selected_on(rows[-1]) == FINAL:
        return None
    chosen = selected_row(rows, run.select_by, on="val")
    return selection_value(chosen, run.select_by, "val"), int(chosen["epoch"])


def choose(tune_dir: Path, arm_trials: dict[str, dict[str, dict[str, str]]]) -> dict:
    """Each arm's trials (arm -> {trial folder name: its values}, in tune_dir/<arm>/<trial>/) with their
    held-out scores, and its winner: the finished trial with the best held-out score (ties: the earlier
    trial). An arm without a finished trial that held images out has no winner, and a reason."""
    found: dict = {"arms": {}}
    for arm, trials in arm_trials.items():
        entries = []
        for name, values in trials.items():
            path = Path(tune_dir) / arm / name
            entry = {"trial": name, "values": values, "run_dir": str(path)}
            run = read_run(path) if (path / CONFIG_FILE).is_file() else None
            if run is None or not run.complete:
                entry["status"] = "not finished" if run is None or not run.launch_status else run.launch_status
            else:
                score = held_out_score(run)
                entry.update(status="finished", metric=f"held-out {run.select_by}")
                if score is None:
                    entry["status"] = "no held-out part (data.val_fraction=0): cannot be chosen"
                else:
                    entry["held_out"], entry["epoch"] = (-score[0] if run.select_by == "loss" else score[0]), score[1]
                    entry["score"] = score[0]
            entries.append(entry)
        scored = [e for e in entries if "score" in e]
        result = {"trials": entries, "finished": sum(e["status"] == "finished" for e in entries),
                  "metric": scored[0]["metric"] if scored else ""}
        if scored:
            best = max(range(len(scored)), key=lambda i: (scored[i]["score"], -i))
            result["winner"] = {k: scored[best][k] for k in ("trial", "values", "held_out", "epoch", "run_dir")}
        else:
            result["reason"] = "no trial finished with a held-out part to choose on"
        found["arms"][arm] = result
    return found


def expected_best(scores: Sequence[float], k: int, replace: bool = True) -> tuple[float, float]:
    """The expected maximum of k trials' scores, and its standard deviation, from the N observed ones.
    replace=True: Dodge et al. 2019's estimator (k draws with replacement from the empirical distribution:
    P(max <= v_(i)) = (i/N)^k), defined for any k; replace=False: k distinct trials (every k-subset equally
    likely: P(max = v_(i)) = C(i-1, k-1) / C(N, k)), unbiased for k <= N."""
    v = np.sort(np.asarray(scores, dtype=float))
    n = len(v)
    if n == 0 or k < 1 or (not replace and k > n):
        raise ValueError(f"expected best of k={k} from {n} scores" + ("" if replace else " without replacement"))
    i = np.arange(1, n + 1)
    if replace:
        weights = (i / n) ** k - ((i - 1) / n) ** k
    else:
        weights = np.array([math.comb(j - 1, k - 1) for j in i], dtype=float) / math.comb(n, k)
    mean = float(weights @ v)
    return mean, math.sqrt(max(0.0, float(weights @ v**2) - mean**2))


def expected_best_curve(scores: Sequence[float]) -> list[dict]:
    """{k, mean, std} for k = 1..N (Dodge et al.'s estimator)."""
    return [dict(zip(("k", "mean", "std"), (k, *expected_best(scores, k)))) for k in range(1, len(scores) + 1)]


def ranking_at(curves: dict[str, list[dict]], k: int) -> list[str]:
    """The arms ordered by expected best held-out score at k trials, best first."""
    return sorted(curves, key=lambda arm: -curves[arm][min(k, len(curves[arm])) - 1]["mean"])


def read_choice(root: Path) -> dict | None:
    """root/tuning.json (launch.sweep --tune), or None."""
    path = Path(root) / TUNING_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise MetricsError(f"{path}: not the tuning.json launch.sweep --tune writes ({exc}): run the sweep again") from None


def curves_of(choice: dict) -> dict[str, list[dict]]:
    """Each arm's expected-best curve over its finished trials' held-out scores."""
    found = {}
    for arm, entry in choice["arms"].items():
        scores = [t["score"] for t in entry["trials"] if "score" in t]
        if scores:
            found[arm] = expected_best_curve(scores)
    return found


def ranking_note(curves: dict[str, list[dict]]) -> str:
    """Whether the arms' order by expected best held-out score is the same at a third of the trials and at
    all of them."""
    if len(curves) < 2:
        return ""
    n = min(len(c) for c in curves.values())
    few = max(1, round(n / 3))
    at_few, at_all = ranking_at(curves, few), ranking_at(curves, n)
    verdict = "the same order" if at_few == at_all else "the order CHANGES with the tuning budget"
    return f"Order at k={few}: {' > '.join(at_few)}; at k={n}: {' > '.join(at_all)}: {verdict}."
