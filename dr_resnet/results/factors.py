"""Runs along a factor: learning curves (data.train_fraction, train.epochs / train.length) and any ablation
(model.head, train.sampler, data.image_size, train.ema, ...). Torch-free, read from the arms.

For each key that tells arms of one depth and initialisation apart (Arm.factors), `points` gives each
(depth, initialisation) line's test QWK at the selected epoch per value, over its finished seeds; `differences`
lists, per value, the paired comparisons of initialisations and depth made at that value (compare_arms), marking
where the interval excludes 0; `convergence` the epochs each arm needs to reach 95% of its final held-out QWK.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dr_resnet.results.arms import QUESTION_FACTORS, Arm, numeric, over_seeds_and_patients
from dr_resnet.results.rundir import MetricsError, selected_on
from dr_resnet.results.stats import LEVEL, t_quantile

REACHED = 0.95  # convergence: the share of its final held-out QWK an arm must reach


def factor_keys(arms: list[Arm]) -> list[str]:
    return sorted({k for a in arms for k in a.factors})


def spread(values: list[float]) -> dict:
    """Mean, and a 95% t-interval over seeds (None with one seed)."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(v)}
    half = t_quantile(LEVEL, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(v)}


def line_of(arm: Arm, key: str) -> str:
    """The line an arm is a point of along `key`: its depth, initialisation and every other factor."""
    return Arm(arm.depth, arm.initialisation, {k: v for k, v in arm.factors.items() if k != key}, []).name


def lines_along(arms: list[Arm], key: str) -> dict[str, list[Arm]]:
    """The arms that have `key`, grouped by the line they are points of (line_of)."""
    lines: dict[str, list[Arm]] = {}
    for arm in arms:
        if key in arm.factors:
            lines.setdefault(line_of(arm, key), []).append(arm)
    return lines


def points(arms: list[Arm], key: str, metric: str = "test_qwk") -> dict[str, list[dict]]:
    """Per line (depth, initialisation and any other factor), per value of `key`: the selected epoch's
    `metric` over the arm's finished seeds with a 95% band, and the mean number of training images its runs
    used, sorted by value (numerically where it can be). The band of test QWK counts the seeds and the shared
    test set's patients (arms.over_seeds_and_patients: the answer table's interval) where every seed has its
    predictions; otherwise, and for held-out scores, the seeds' t-interval alone ("band" says which)."""
    lines: dict[str, list[dict]] = {}
    for arm in arms:
        if key not in arm.factors or not arm.finished:
            continue
        line = line_of(arm, key)
        values = [row[metric] for row in (r.chosen() for r in arm.finished) if metric in row]
        images = [r.effective["training_images"] for r in arm.finished if "training_images" in r.effective]
        if values:
            point = {"value": arm.factors[key], **spread(values), "band": "seeds",
                     "images": float(np.mean(images)) if images else None}
            tested = over_seeds_and_patients(arm.finished, ("qwk",))[0] if metric == "test_qwk" else None
            if tested is not None:  # the test set's patients count too, as in the answer table
                point.update(mean=tested["qwk"]["mean"], low=tested["qwk"]["low"], high=tested["qwk"]["high"],
                             band="seeds and test patients")
                if point["n"] < 2:
                    point["band"] = "test patients (one seed)"
            lines.setdefault(line, []).append(point)
    for entries in lines.values():
        entries.sort(key=lambda e: float(e["value"]) if numeric([e["value"]]) else str(e["value"]))
    return lines


FRACTION = "data.train_fraction"


def realised_shares(lines: dict[str, list[dict]]) -> dict[str, list[float]] | None:
    """Along data.train_fraction: each point's training images as a share of its line's images at fraction 1
    (the nested draw keeps whole patients and every grade, so a small fraction holds more than its share of
    images, rare grades most); None unless every line has a point at 1 and image counts."""
    found = {}
    for line, entries in lines.items():
        whole = next((e["images"] for e in entries if float(e["value"]) == 1.0 and e["images"]), None)
        if whole is None or any(e["images"] is None for e in entries):
            return None
        found[line] = [e["images"] / whole for e in entries]
    return found


def declared_searched(root: Path) -> set[str]:
    """The keys launch.sweep was told are searched (root/sweep.json's "searched"): chosen on held-out figures,
    where any other varied key is a factor, every value of it reported."""
    manifest = Path(root) / "sweep.json"
    if not manifest.is_file():
        return set()
    try:
        return set(json.loads(manifest.read_text()).get("searched", []))
    except ValueError as exc:
        raise MetricsError(f"{manifest}: not the sweep.json launch.sweep writes ({exc}): run the sweep again") from None


def differences(comparisons: list[dict], key: str, families: list[dict] = ()) -> list[dict]:
    """The initialisation and depth comparisons at the selected epoch, per value of `key` (their shared
    setting): A - B in QWK with the interval its verdict is read from (the family's simultaneous one; the
    test set's alone, and no verdict, with one seed a side)."""
    sizes = {f["family"]: f["m"] for f in families}
    found = []
    for c in comparisons:
        if (c.get("epoch") != "selected" or c.get("factor") not in QUESTION_FACTORS
                or key not in c.get("setting", {}) or c.get("absent")):  # an arm with no run: the comparisons table says so
            continue
        entry = {"value": c["setting"][key], "comparison": c["comparison"], "a": c["a"], "b": c["b"],
                 "m": sizes.get(c.get("family", ""))}
        if c["status"] != "compared":
            found.append({**entry, "status": c["status"]})
            continue
        q = c["qwk"]
        if "verdict" in q:
            low, high, holds = q.get("family_low", math.nan), q.get("family_high", math.nan), q["verdict"]
        else:
            low, high, holds = q["low"], q["high"], "no verdict: " + q["over"]
        found.append({**entry, "status": "compared", "difference": q["difference"], "low": low, "high": high,
                      "seeds": len(c["seeds"]), "holds": holds})
    found.sort(key=lambda e: (float(e["value"]) if numeric([e["value"]]) else 0, str(e["value"]), e["comparison"]))
    return found


def epochs_to_reach(rows: list[dict], share: float = REACHED) -> int | None:
    """The first epoch whose held-out QWK reaches `share` of the final epoch's (None without a held-out
    part, or a final held-out QWK <= 0: nothing learnt to reach)."""
    if not rows or selected_on(rows[-1]) != "val" or not math.isfinite(rows[-1]["val_qwk"]) or rows[-1]["val_qwk"] <= 0:
        return None  # nothing learnt to reach (or a diverged final epoch: NaN)
    target = share * rows[-1]["val_qwk"]
    return next((r["epoch"] for r in rows if r["val_qwk"] >= target), None)


def convergence(arms: list[Arm]) -> list[dict]:
    """Per arm with finished runs that held images out: epochs to reach 95% of the final held-out QWK (mean
    over seeds, and each seed's), of the epochs planned."""
    found = []
    for arm in arms:
        reached = [(r.seed, epochs_to_reach(r.rows)) for r in arm.finished]
        reached = [(s, e) for s, e in reached if e is not None]
        if reached:
            found.append({"arm": arm.name, "epochs": arm.finished[0].epochs_planned,
                          "mean": float(np.mean([e for _, e in reached])), "per_seed": dict(reached),
                          "final_val_qwk": float(np.mean([r.rows[-1]["val_qwk"] for r in arm.finished
                                                          if selected_on(r.rows[-1]) == "val"]))})
    return found
