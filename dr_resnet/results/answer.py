"""What the report leads with: the answer to the question the runs were made for, and what a reviewer weighs it
by. Torch-free, read from the arms.

Per arm, the setting that stands for it, never chosen on test: its --tune winner (the sweep's folder holds only
winners), or, where a searched key's values were run side by side (a grid over `searched:` keys), the arm whose
held-out score is best over its seeds; `headline` reduces the arms to those, so that the comparisons meet winner
against winner and grow with the arms, not with the trials. A factor (a learning curve's data fraction, an
ablation's head) is never reduced: each of its values stays an arm of its own, and a numeric one with many
values (a curve) opens the report one row per line (`fold_curves`, `fold_question`), every value in the sections
after. `answer_rows` scores each headline arm on test with intervals over its seeds and the test patients
(stats.seed_mean_test), and `weigh`
says what the answer rests on: seeds, test and held-out sizes, the search space, trials and compute per arm
(Dodge et al. 2019, "Show your work"), and the smallest difference the seeds could detect.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dr_resnet.results.arms import FAMILY_METRIC, QUESTION, QUESTION_FACTORS, Arm, numeric, over_seeds_and_patients
from dr_resnet.results.factors import line_of, lines_along
from dr_resnet.results.rundir import METRICS_FILE, read_metrics
from dr_resnet.results.tuning import TUNE_DIR, held_out_score

ANSWER_METRICS = ("qwk", "accuracy", "referable_auc")  # the answer's test scores, with intervals over seeds and patients


@dataclass
class Headline:
    """One arm of the answer: the arm at its chosen setting (None when nothing could choose one)."""

    name: str  # the arm's name without its searched keys
    arm: Arm | None
    how: str  # how its setting was chosen, in words
    candidates: list[Arm] = field(default_factory=list)  # every searched setting of it (itself alone without any)
    tuning: dict | None = None  # its --tune entry (tuning.json), where the sweep tuned it
    held_out: float | None = None  # the mean held-out score (train.select_by) over its finished seeds
    metric: str = ""  # what held_out is
    unchosen: Arm | None = None  # with no arm: the planned arm, runless, with why (it still counts in its family)

    @property
    def stands_for(self) -> Arm | None:
        """The arm this headline is: the chosen one, else the planned arm no setting could be chosen for."""
        return self.arm or self.unchosen


def compared_arms(headlines: list[Headline]) -> list[Arm]:
    """The arms the comparisons are made between: each headline's chosen arm, and in place of a searched grid
    none of whose settings could be chosen, the arm it stood for with no runs and the reason, so that its
    comparisons are made "not compared" members of their family (m counts them) rather than left out."""
    return [h.stands_for for h in headlines if h.stands_for]


def held_out_mean(arm: Arm) -> tuple[float | None, str]:
    """The arm's held-out score at each finished seed's selected epoch (higher is better; the loss itself for
    select_by=loss), averaged over the seeds that have a finite one; None without any, and its name."""
    found = [(held_out_score(r), r.select_by) for r in arm.finished]
    scores = [(value, by) for score, by in found if score is not None for value in [score[0]] if math.isfinite(value)]
    if not scores:
        return None, ""
    by = scores[0][1]
    mean = float(np.mean([v for v, _ in scores]))
    return (-mean if by == "loss" else mean), f"held-out {by}"


def complete(arm: Arm) -> bool:
    """Whether every run of the arm finished with a finite held-out score."""
    scores = [held_out_score(r) for r in arm.runs] if arm.runs and len(arm.finished) == len(arm.runs) else [None]
    return all(s is not None and math.isfinite(s[0]) for s in scores)


def _tuned(arm: Arm, choice: dict | None) -> dict | None:
    """The --tune entry of the sweep arm whose folder holds this arm's runs (tuning.json's arms are folders)."""
    if not choice or not arm.runs:
        return None
    folders = {r.name.split("/")[0] for r in arm.runs}
    entries = [choice["arms"][f] for f in folders if f in choice.get("arms", {})]
    return entries[0] if len(entries) == 1 else None


def headline(arms: list[Arm], searched: set[str] = frozenset(), choice: dict | None = None) -> list[Headline]:
    """The arms the answer is about: arms alike but for searched keys become one, the one whose held-out score
    is best (the first of equals; none where no seed held images out or every score is NaN); every other arm
    as it is. `choice`: tuning.json (launch.sweep --tune) to say how a tuned arm's winner was chosen."""
    lines: dict[tuple, list[Arm]] = {}
    for arm in arms:
        kept = tuple((k, v) for k, v in arm.factors.items() if k not in searched)
        lines.setdefault((arm.depth, arm.initialisation, kept), []).append(arm)
    found = []
    for (depth, initialisation, kept), members in lines.items():
        name = Arm(depth, initialisation, dict(kept), []).name
        keys = sorted({k for a in members for k in a.factors if k in searched})
        if not keys:
            arm = members[0]
            entry = _tuned(arm, choice)
            score, metric = held_out_mean(arm)
            if entry and entry.get("winner"):
                values = ", ".join(f"{k}={v}" for k, v in entry["winner"]["values"].items())
                how = f"--tune: best held-out score of {entry['planned']} trials ({values})"
                # the score that chose it: the winning trial's, not its fresh seeds'
                score, metric = entry["winner"]["held_out"], entry.get("metric") or metric
            else:
                how = "its only setting"
            found.append(Headline(name, arm, how, [arm], entry, score, metric))
            continue
        # A setting ranks once every one of its runs finished with a finite held-out score: one with a diverged
        # or unfinished seed never wins on its lucky ones (as --tune ranks failed trials below every finished one).
        scored = [(held_out_mean(a), a) for a in members if complete(a)]
        ranked = [(score, metric, a) for (score, metric), a in scored if score is not None]
        if not ranked:
            how = (f"not chosen: no setting of {', '.join(keys)} among its {len(members)} has every run finished "
                   f"with a finite held-out score (data.val_fraction=0, runs still going, or diverged)")
            found.append(Headline(name, None, how, members, unchosen=Arm(depth, initialisation, dict(kept), [], how)))
            continue
        sign = -1 if ranked[0][1].endswith("loss") else 1
        score, metric, best = max(ranked, key=lambda r: sign * r[0])  # max keeps the first of equals
        setting = ", ".join(f"{k}={best.factors[k]}" for k in keys)
        chosen = Arm(depth, initialisation, dict(kept), best.runs)
        found.append(Headline(name, chosen, f"held-out choice among {len(members)} settings of {', '.join(keys)} "
                                            f"({setting})", members, None, score, metric))
    return found


def answer_rows(headlines: list[Headline], root: Path) -> list[dict]:
    """Per headline arm: how its setting was chosen, the held-out score that chose it, its finished seeds' test
    QWK and accuracy at the selected epoch with t-intervals over seeds and patients (mean of the seeds alone
    where predictions are missing), the seeds' spread, the majority baseline, trials and training minutes, and
    its backbone's pretraining record (its cost said beside the arm: a backbone costs compute the minutes omit)."""
    rows = []
    for h in headlines:
        row = {"arm": h.name, "how": h.how, "held_out": h.held_out, "held_out_metric": h.metric,
               "trials": trials_of(h), "minutes": minutes_of(h, root)}
        arm = h.arm
        finished = arm.finished if arm else []
        row["seeds"] = len(finished)
        row["pretraining"] = next((r.pretraining for r in (arm.runs if arm else []) if r.pretraining), {})
        if not finished:
            row["status"] = (arm.runs[0].launch_status if arm and arm.runs and arm.runs[0].launch_status
                             else h.how if arm is None else "no finished run yet")
            rows.append(row)
            continue
        chosen = [r.chosen() for r in finished]
        row.update(baseline=finished[0].baseline, collapsed=[r.seed for r in finished if r.collapsed],
                   status="finished" if len(finished) == len(arm.runs) else
                   f"{len(arm.runs) - len(finished)} of {len(arm.runs)} runs not finished (not counted)")
        tested, unit = over_seeds_and_patients(finished, ANSWER_METRICS)  # from the results cache, scored once
        if tested is not None:
            for m in ANSWER_METRICS:
                row[m] = {k: tested[m][k] for k in ("mean", "low", "high", "sd", "over", "df")}
            row["resampled"] = unit
        else:
            for m, key in (("qwk", "test_qwk"), ("accuracy", "test_acc")):
                values = np.array([c[key] for c in chosen], dtype=float)
                row[m] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else None}
            row["no_interval"] = unit
        rows.append(row)
    return rows


def trials_of(h: Headline) -> int:
    """The runs this arm's answer cost: its --tune trials and final seeds, or every seed of every searched
    setting."""
    runs = sum(len(a.runs) for a in h.candidates)
    return runs + (h.tuning["planned"] if h.tuning else 0)


def minutes_of(h: Headline, root: Path) -> float:
    """Training minutes of every run behind this arm's answer (its searched settings' and --tune trials' too: a
    trial's folder found in the sweep's own layout, root/tune/<arm>/<trial>, so that a sweep copied elsewhere
    still counts them; tuning.json's recorded path where that layout lacks it)."""
    seconds = sum(row.get("epoch_seconds", 0.0) for a in h.candidates for r in a.runs for row in r.rows)
    folder = h.arm.runs[0].name.split("/")[0] if h.arm and h.arm.runs else ""
    for trial in (h.tuning or {}).get("trials", []) if folder else []:
        places = [Path(root) / TUNE_DIR / folder / trial["trial"], *([Path(trial["run_dir"])] if trial.get("run_dir") else [])]
        found = next((p for p in places if (p / METRICS_FILE).is_file()), None)
        if found is not None:
            seconds += sum(row.get("epoch_seconds", 0.0) for row in read_metrics(found))
    return seconds / 60


CURVE_VALUES = 4  # a numeric factor with this many values along one line is a curve: the answer gives the line one row


def curve_keys(headlines: list[Headline]) -> list[str]:
    """The factors the answer shows as curves, not arm by arm: numeric ones (a learning curve's fraction, a
    grid not declared searched) with CURVE_VALUES values or more along some line."""
    arms = compared_arms(headlines)
    found = []
    for key in sorted({k for a in arms for k in a.factors}):
        lines = lines_along(arms, key)
        if numeric([a.factors[key] for members in lines.values() for a in members]) and \
                max(len({a.factors[key] for a in members}) for members in lines.values()) >= CURVE_VALUES:
            found.append(key)
    return found


def fold_curves(rows: list[dict], headlines: list[Headline], key: str) -> list[dict]:
    """The answer rows with those along the curve `key` folded into one row per line: its values' rows in order
    (every value is reported in the section 'Scores along key'), their runs and minutes summed."""
    folded, lines = [], {}
    for row, h in zip(rows, headlines):
        arm = h.stands_for
        if arm is None or key not in arm.factors:
            folded.append(row)
            continue
        line = line_of(arm, key)
        if line not in lines:
            lines[line] = {"arm": line, "curve": key, "points": [], "trials": 0, "minutes": 0.0}
            folded.append(lines[line])
        entry = lines[line]
        entry["points"].append((arm.factors[key], row))
        entry["trials"] += row["trials"]
        entry["minutes"] += row["minutes"]
        entry["pretraining"] = entry.get("pretraining") or row.get("pretraining")  # the line's one backbone
    for entry in lines.values():
        entry["points"].sort(key=lambda point: float(point[0]))
    return folded


def curve_ends(headlines: list[Headline], key: str) -> list[Arm]:
    """The answer's arms with those along the curve `key` reduced to each line's first and last values: what
    the per-arm figures (confusion matrices) draw, so that they hold at any number of values."""
    arms = [h.arm for h in headlines if h.arm]
    ends = {id(a) for members in lines_along(arms, key).values()
            for a in (min(members, key=lambda a: float(a.factors[key])), max(members, key=lambda a: float(a.factors[key])))}
    return [a for a in arms if key not in a.factors or id(a) in ends]


def question(comparisons: list[dict]) -> list[dict]:
    """The declared families' comparisons at the selected epoch (the primary family first), as made; and the
    question's comparisons made with one seed a side (outside every family: shown with the test set's
    interval and no verdict)."""
    members = [c for c in comparisons if c.get("family") or (
        c["epoch"] == "selected" and c["factor"] in QUESTION_FACTORS and c["status"] == "compared")]
    return sorted(members, key=lambda c: (c["family"] != QUESTION, c["family"]))


def fold_question(members: list[dict], curves: list[str]) -> list[dict]:
    """The question's rows with the comparisons one question makes at each value of a curve (pretrained vs
    scratch at ResNet18 at each learning rate) folded into one row per question, its verdicts counted by value; every
    comparison stays in the section 'Along key'."""
    folded, groups = [], {}
    for c in members:
        setting = c.get("setting") or {}
        key = next((k for k in sorted(setting) if k in curves), None)
        if key is None:
            folded.append(c)
            continue
        suffix = f", {key}={setting[key]}"
        question = c["comparison"].replace(suffix, "")
        if question not in groups:
            groups[question] = {"folded": question, "key": key, "family": "along " + ", ".join(sorted(setting)),
                                "a": c["a"].replace(suffix, ""), "b": c["b"].replace(suffix, ""), "members": []}
            folded.append(groups[question])
        groups[question]["members"].append(c)
    return folded


def weigh(headlines: list[Headline], root: Path, detectable: list[dict]) -> list[tuple[str, str]]:
    """What the answer rests on, as (what, value) lines: seeds, the test set, the held-out part, the search
    space, and the smallest difference the primary family's seeds could detect."""
    runs = [r for h in headlines if h.arm for r in h.arm.finished]
    lines = []
    seeds = sorted({len(h.arm.finished) for h in headlines if h.arm and h.arm.finished})  # arms that ran
    if seeds:
        lines.append(("seeds per arm", " to ".join(map(str, dict.fromkeys([seeds[0], seeds[-1]])))
                      + (" (the answer's intervals count both the seeds and the test patients)" if seeds[0] > 1 else
                         " (with one seed an interval is the test set's alone: the seeds' variation is unknown)")))
    found = next((r.scored() for r in runs if r.has_predictions()), None)
    if runs:
        first = runs[0]
        where = f"split '{first.settings.get('data.test_split', 'test')}' of {Path(str(first.settings['data.root'])).name}"
        if found is not None:
            patients = f" of {len(found.scores.unit_sizes)} patients" if found.scores.unit == "patients" else ""
            lines.append(("test set", f"{found.facts.images} images{patients} ({where})"))
        else:
            lines.append(("test set", f"{int(np.sum(first.chosen()['confusion_matrix']))} images ({where})"))
        held: dict[str, list[str]] = {}
        for h in headlines:
            counts = sorted({int(r.effective["held_out_images"]) for r in (h.arm.finished if h.arm else [])
                             if "held_out_images" in r.effective})
            if counts:
                shown = "none (each run's final epoch)" if counts == [0] else \
                    " to ".join(map(str, dict.fromkeys([counts[0], counts[-1]]))) + " images of the training split"
                held.setdefault(shown, []).append(h.name)
        lines.append(("held-out part (what chose epochs and settings)",
                      next(iter(held)) if len(held) == 1 else
                      "; ".join(f"{shown} ({', '.join(names)})" for shown, names in held.items()) or "not recorded"))
    lines.append(("search space", search_space(headlines, root)))
    if any(h.how.startswith("held-out choice") for h in headlines):
        lines.append(("chosen on the seeds it is tested with", "a searched grid's setting was chosen on the same seeds "
                      "whose test scores the answer reports: the choice favours lucky seeds, the noisier arm most "
                      "(launch.sweep --tune chooses on its own seed and trains the winner on fresh ones)"))
    if seeds and seeds[-1] < 2:
        lines.append(("verdicts", "none: one seed per arm, so the variation between seeds is unknown and no "
                                  "comparison can be judged (launch.sweep --seeds 0,1,2 runs more)"))
    primary = [d for d in detectable if d["family"] == QUESTION]
    if primary:
        low, high = min(d["detectable"] for d in primary), max(d["detectable"] for d in primary)
        span = f"{low:.3f}" if math.isclose(low, high, abs_tol=5e-4) else f"{low:.3f} to {high:.3f}"
        lines.append(("smallest detectable difference", f"{span} {FAMILY_METRIC.upper()} (80% power at the primary "
                                                         f"family's level; per comparison below)"))
    return lines


def search_space(headlines: list[Headline], root: Path) -> str:
    """The searched keys and what was tried: a grid's values, or --tune's distributions and trials."""
    search, manifest = {}, Path(root) / "sweep.json"
    for manifest in (Path(root) / "sweep.json", Path(root) / TUNE_DIR / "sweep.json"):  # --tune's phase 1 holds the search
        record = json.loads(manifest.read_text()) if manifest.is_file() else {}
        if record.get("search"):
            search = record["search"]
            break
    if search.get("keys"):
        drawn: dict[str, list] = {}
        for h in headlines:
            for trial in (h.tuning or {}).get("trials", []):
                for k, v in trial.get("values", {}).items():
                    drawn.setdefault(k, []).append(v)
        shown = "; ".join(f"{k}: {_span(drawn.get(k, []))}" for k in search["keys"])
        return (f"--tune: {search.get('trials')} trials per arm (scrambled Sobol draws, seed {search.get('seed')}) of "
                f"{shown}")
    grids = {}
    for h in headlines:
        for arm in h.candidates:
            for k in set(arm.factors) - set(h.arm.factors if h.arm else {}):
                grids.setdefault(k, set()).add(str(arm.factors[k]))
    factors: dict[str, set] = {}
    for h in headlines:
        for k, v in (h.stands_for.factors.items() if h.stands_for else ()):
            factors.setdefault(k, set()).add(str(v))
    shown = [f"{k}: {len(v)} values ({', '.join(sorted(v, key=_order))})" for k, v in sorted(grids.items())]
    shown += [f"{k}: a factor of {len(v)} values ({_values(v)}), every one reported, none chosen"
              for k, v in sorted(factors.items())]
    return "; ".join(shown) or "none: every arm ran its one setting"


def _values(values: set) -> str:
    ordered = sorted(values, key=_order)
    return ", ".join(ordered) if len(ordered) <= 6 else f"{ordered[0]} to {ordered[-1]}"


def _order(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _span(values: list) -> str:
    """Drawn values as a range (numbers) or the distinct values (categories)."""
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return f"drawn {min(values):.4g} to {max(values):.4g}"
    return ", ".join(sorted({str(v) for v in values})) or "no trial on record"
