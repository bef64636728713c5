"""The runs under a folder and how they compare: each run directory's record (config, metrics log,
launcher status, predictions, intervals); arms, the runs grouped by what was trained (every config key
but the seed and where it ran: config.NOT_THE_ARM), named by depth, initialisation and any other key
that tells arms of the same depth and initialisation apart; and the paired comparisons between arms
that differ in one factor (one initialisation against another, ResNet50 vs ResNet18, or such a key), with
t-intervals over seed pairs and test patients (stats.seed_pair_test: the patient jackknife, no bootstrap)
and McNemar's test. Reads only run-directory files; numpy only (no torch)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from dr_resnet.config import (
    INITIALISATIONS,
    defines_the_arm,
    recorded_initialisation,
    schedule_multiple,
    schedule_of,
    settings_of,
)
from dr_resnet.results.cache import ResultsCache
from dr_resnet.results.metrics import METRICS, collapse, majority_baseline
from dr_resnet.results.predictions import Predictions, read_predictions
from dr_resnet.results.rundir import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    EVALUATIONS_DIR,
    FINAL_PREDICTIONS_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    PREDICTIONS_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    MetricsError,
    last_launch_error,
    pending_files,
    read_metrics,
    selected_on,
    selected_row,
)
from dr_resnet.results.scored import FileFacts, ScoredFile, facts_of, score_file, scored_of
from dr_resnet.results.stats import (
    RESAMPLES,
    bootstrap_intervals,
    clipped,
    compare_scored,
    detectable,
    resampling_units,
    seed_mean_test_of,
    seeds_needed,
    t_interval,
)

PREDICTION_FILES = {"selected": PREDICTIONS_FILE, "final": FINAL_PREDICTIONS_FILE}  # each compared epoch's file
# What the question's comparisons vary (Pair.factor): one initialisation against another at a depth, one depth
# against the next at an initialisation.
INITIALISATION, DEPTH = "initialisation", "depth"
QUESTION_FACTORS = (INITIALISATION, DEPTH)


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
    seed: int = 0  # train.seed
    settings: dict = field(default_factory=dict)  # its config.yaml, flat (config.settings_of)
    arm: str = ""  # the name of the arm it is a seed of (group_arms)
    effective: dict = field(default_factory=dict)  # config.yaml's `effective` section: what the run derived
    cache: ResultsCache = field(default_factory=ResultsCache, repr=False, compare=False)  # its costly results
    _known: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # FileFacts per epoch

    @cached_property
    def initialisation(self) -> str:
        """How it started (config.INITIALISATIONS): what its summary.json recorded, else what its weights say by
        config.recorded_initialisation (a run from before the record: pretrained for any weights, as it was read
        then; a run not run or before its first epoch: by its weights' sidecar)."""
        return self.summary.get("initialisation") or recorded_initialisation(self.weights)

    @property
    def pretraining(self) -> dict:
        """Its backbone's pretraining record (pretraining/run.py's backbone.json: method, pool, epochs, cost), as its
        summary or config.yaml's `effective` kept it; {} for a run that started from no such backbone."""
        return self.summary.get("pretraining") or self.effective.get("pretraining") or {}

    @property
    def complete(self) -> bool:
        """Whether it trained every planned epoch (a run still going would lend its last epoch as final)."""
        return bool(self.rows) and self.rows[-1]["epoch"] >= self.epochs_planned

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
        predictions.csv or predictions_final.csv, if the run wrote them (has_predictions), read from the
        file each time: nothing keeps them (200 runs of 50,000 images would fill the memory). What the
        comparisons and the calibration figure need of them, scored() and calibration() keep."""
        return read_predictions(self.path / PREDICTION_FILES[epoch]) if self.has_predictions(epoch) else None

    def has_predictions(self, epoch: str = "selected") -> bool:
        """Whether the selected (or final) epoch's predictions file is there and is that epoch's."""
        facts = self._facts(epoch)
        if facts is None:
            return False
        if epoch == "selected":
            return not self.predictions_problem
        return facts.epoch in (None, self.rows[-1]["epoch"] if self.rows else None)

    def scored(self, epoch: str = "selected") -> ScoredFile | None:
        """What the paired comparisons use of the selected (or final) epoch's predictions file (its test set,
        its stats.RunScores), from the results cache or read and scored; None where has_predictions is not."""
        return scored_of(self._entry(epoch)) if self.has_predictions(epoch) else None

    def calibration(self, epoch: str = "selected") -> dict | None:
        """metrics.expected_calibration_error of the selected (or final) epoch's grade probabilities (None for
        a head that gives a score, or without predictions)."""
        return self._facts(epoch).calibration if self.has_predictions(epoch) else None

    def _facts(self, epoch: str) -> FileFacts | None:
        if epoch not in self._known:
            self._known[epoch] = facts_of(self._entry(epoch)) if (self.path / PREDICTION_FILES[epoch]).is_file() else None
        return self._known[epoch]

    def _entry(self, epoch: str) -> dict:
        path = self.path / PREDICTION_FILES[epoch]
        return self.cache.get(f"scores of {','.join(COMPARED)}", path, lambda: score_file(path, COMPARED))

    @cached_property
    def failure(self) -> str:
        """Why its last launch ended with an error (its train.log), '' when it did not."""
        return last_launch_error(self.path)

    @cached_property
    def summary(self) -> dict:
        """Its summary.json ({} before the first epoch)."""
        path = self.path / SUMMARY_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    @cached_property
    def predictions_problem(self) -> str:
        """Why the selected epoch's predictions cannot be trusted to be that epoch's ('' when they can): a
        kill came between them and checkpoint_best.pt, or predictions.csv holds another epoch."""
        pending = pending_files(self.path)
        if pending:
            return (f"stopped while writing a newly selected epoch's files ({pending[0].name} is left): running its "
                    f"command again resumes the run and completes them")
        found = self._facts("selected")
        chosen = self.chosen()
        if found is not None and found.epoch is not None and chosen is not None and found.epoch != chosen["epoch"]:
            return (f"{PREDICTIONS_FILE} holds epoch {found.epoch}'s predictions but the run selects epoch "
                    f"{chosen['epoch']} ({METRICS_FILE}): not used; running its command again resumes the run and "
                    f"rewrites them")
        return ""

    def intervals(self) -> dict | None:
        """Bootstrap 95% intervals of the selected epoch's metrics: the run summary's, else computed from
        its predictions.csv (and kept in the results cache); None without either."""
        if self.predictions_problem:
            return None
        recorded = self.summary.get("intervals")
        if recorded:
            return recorded
        if not self.has_predictions():
            return None
        path = self.path / PREDICTIONS_FILE

        def compute() -> dict:
            found = read_predictions(path)
            units, _ = resampling_units(found.patients)
            drawn = self.cache.resamples(units, RESAMPLES, 0)
            return {"intervals": np.array(json.dumps(bootstrap_intervals(
                found.labels, found.grades, found.referable_scores, found.patients, drawn=drawn)))}
        return json.loads(str(self.cache.get(f"intervals of {RESAMPLES} resamples", path, compute)["intervals"]))

    def evaluations(self) -> list[dict]:
        """evaluate's results of this run on other datasets or splits (RUN/evaluations/<dataset>-<split>/
        metrics.json), by folder name."""
        found = []
        for path in sorted((self.path / EVALUATIONS_DIR).glob("*/metrics.json")):
            try:
                found.append(json.loads(path.read_text()))
            except ValueError as exc:
                raise MetricsError(f"{path}: not the metrics.json evaluate writes ({exc}): run evaluate again") from None
        return found

    @property
    def baseline(self) -> float | None:
        return majority_baseline(np.array(self.rows[-1]["confusion_matrix"])) if self.rows else None


# Folders of a sweep that hold runs the sweep's comparison is not about: --tune's trials (reported on their
# own and in the tuning section), an arm's earlier winners, submitit's logs. Reporting such a folder itself
# (python -m dr_resnet.report SWEEP/tune) reads its runs.
NOT_COMPARED = ("tune", "superseded", "submitit")


def find_runs(root: Path, cache: ResultsCache | None = None) -> list[RunRecord]:
    """Run directories at or under root (a folder with config.yaml; never looked into further), outside
    NOT_COMPARED folders and hidden ones, sorted by depth then name (its path under root); each keeps its
    costly results in `cache` (the report's; default: nowhere)."""
    cache = cache or ResultsCache()
    root = Path(root)
    runs = []
    for folder, subfolders, files in os.walk(root):
        path = Path(folder)
        if CONFIG_FILE in files:
            subfolders.clear()  # a run's own folders (evaluations, wandb) are not runs
            runs.append(read_run(path, path.relative_to(root).as_posix() if path != root else path.name, cache))
        else:
            subfolders[:] = sorted(s for s in subfolders if s not in NOT_COMPARED and not s.startswith("."))
    return sorted(runs, key=lambda r: (r.depth, initialisation_order(r.initialisation), r.name, r.seed))


def initialisation_order(initialisation: str) -> int:
    """Where an initialisation comes in lists and figures: config.INITIALISATIONS' order (one not there last)."""
    return INITIALISATIONS.index(initialisation) if initialisation in INITIALISATIONS else len(INITIALISATIONS)


def read_run(path: Path, name: str = "", cache: ResultsCache | None = None) -> RunRecord:
    """The run in `path` (its config.yaml, metrics, launcher status), named `name` (default: the folder's),
    its costly results kept in `cache`."""
    cfg = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    status_file = path / STATUS_FILE
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    reason = f"{status.get('status', 'failed')}: {status.get('reason', '')}" if status else ""
    settings = settings_of(cfg)
    # config.yaml keeps the epochs as given and train.length (older runs: the stretched epochs, length 1)
    multiple = schedule_multiple(float(settings["train.length"]), float(settings["data.train_fraction"]),
                                 str(settings["train.steps_at_fraction"]))
    planned, _ = schedule_of(int(settings["train.epochs"]), float(settings["train.warmup_epochs"]), multiple)
    return RunRecord(name or path.name, path, int(settings["model.depth"]), str(settings["model.weights"]),
                     planned, read_metrics(path), reason, str(settings["train.select_by"]),
                     int(settings["train.seed"]), settings, effective=cfg.get("effective") or {},
                     cache=cache or ResultsCache())


@dataclass
class Arm:
    """Runs that trained the same thing (every key but config.NOT_THE_ARM alike): its seeds."""

    depth: int
    initialisation: str  # config.INITIALISATIONS: scratch, pretrained (ImageNet), ssl, imagenet+ssl
    factors: dict  # the keys (beyond depth and initialisation) that tell it apart from the arms beside it
    runs: list[RunRecord]
    unavailable: str = ""  # why a planned arm has no runs to compare (a searched grid none of whose settings could be chosen)

    @property
    def label(self) -> str:
        """Its initialisation and its factors: how a ResNet{depth} figure tells its arms apart."""
        return ", ".join([self.initialisation, *(f"{k}={v}" for k, v in self.factors.items())])

    @property
    def name(self) -> str:
        return f"resnet{self.depth} {self.label}"

    @property
    def done(self) -> list[RunRecord]:
        """Its runs with at least one epoch."""
        return [r for r in self.runs if r.rows]

    @property
    def finished(self) -> list[RunRecord]:
        """Its runs that completed every planned epoch (a run still going would lend its last epoch as final)."""
        return [r for r in self.runs if r.complete]


SCORE_RANGE = {m: METRICS[m].bounds for m in ("qwk", "accuracy", "referable_auc")}  # what a score can be


def over_seeds_and_patients(runs: list[RunRecord], metrics: Sequence[str]) -> tuple[dict[str, dict] | None, str]:
    """The runs' (an arm's finished seeds') mean score per metric at the selected epoch with its t-interval over
    the seeds and the test patients both (stats.seed_mean_test_of, from the results cache), and the unit
    resampled; (None, why) where a run has no predictions.csv or the runs were scored on different images."""
    found = [r.scored() for r in runs if r.has_predictions()]
    if len(found) < len(runs) or not found:
        return None, "no predictions.csv for every seed"
    first = found[0].facts
    if any((f.facts.test_set, f.facts.patients) != (first.test_set, first.patients) for f in found):
        return None, "runs scored on different test images"
    tested = seed_mean_test_of([f.scores for f in found], metrics)
    for m, entry in tested.items():  # kept within what the score can be
        low, high = SCORE_RANGE.get(m, (-math.inf, math.inf))
        entry["low"], entry["high"] = max(entry["low"], low), min(entry["high"], high)
    return tested, found[0].scores.unit


def _identity(run: RunRecord) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in run.settings.items() if defines_the_arm(k)))


def group_arms(runs: list[RunRecord]) -> list[Arm]:
    """The runs grouped into arms, each run's `arm` set to its arm's name. A key that differs between arms
    is a factor (named in the arm's name) where arms of one depth and initialisation differ in it; a key
    that follows depth and initialisation (a per-arm learning rate, the head of an arm's recipe) is part
    of what those arms are and is not named."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(_identity(run), []).append(run)
    values = [dict(identity) for identity in groups]
    differing = sorted({k for v in values for k in v if len({str(o.get(k)) for o in values}) > 1})
    cells: dict[tuple, list[dict]] = {}
    for members, v in zip(groups.values(), values):
        cells.setdefault((members[0].depth, members[0].initialisation), []).append(v)
    factors = [k for k in differing if any(len({c.get(k) for c in cell}) > 1 for cell in cells.values())]
    arms = []
    for members, v in zip(groups.values(), values):
        arm = Arm(members[0].depth, members[0].initialisation, {k: v.get(k) for k in factors},
                  sorted(members, key=lambda r: r.seed))
        for run in members:
            run.arm = arm.name
        arms.append(arm)
    return sorted(arms, key=lambda a: (a.depth, initialisation_order(a.initialisation), tuple(a.factors.values())))


COMPARED = ("accuracy", "qwk", "referable_auc")  # the paired comparisons' and the seed table's metrics
PAIR_METRICS = tuple((name, METRICS[name].label) for name in COMPARED)


@dataclass
class Pair:
    """A paired comparison: arm A against arm B (None: no run of it), differing in one factor."""

    question: str
    a: Arm | None
    b: Arm | None
    name_a: str
    name_b: str
    factor: str = ""  # what differs: INITIALISATION or DEPTH (QUESTION_FACTORS), or a factor's key
    setting: dict = field(default_factory=dict)  # the factors both arms share


def arm_pairs(arms: list[Arm]) -> list[Pair]:
    """The comparisons between arms that differ in one factor: every pair of initialisations at each depth
    (ssl vs scratch, ssl vs pretrained, pretrained vs scratch, ...: the later in config.INITIALISATIONS first)
    and ResNet50 vs ResNet18 at each initialisation (the core experiment: an arm it lacks is named, with no
    run), for each setting of the other factors; and, per factor (an ablation: a head, a sampler, an EMA decay,
    an image size; a learning curve's fraction), each value against a reference value, with everything else
    alike: the first arm's value of a categorical factor, the smallest of a numeric one. Never every pair of
    values (that grows with their square): a numeric factor's answer is its curve with its band, these pairs
    describe it. The initialisations are those of the arms given (a planned arm that did not run is one): one
    the sweep never asked for at any depth is not missing. Arms whose searched keys the held-out score chose
    (answer.headline) come reduced to one per setting, so winners meet winners."""
    def find(depth: int, init: str, factors: dict) -> Arm | None:
        return next((a for a in arms if (a.depth, a.initialisation, a.factors) == (depth, init, factors)), None)

    def pair(question: str, a: tuple[int, str], b: tuple[int, str], factor: str, factors: dict) -> Pair:
        return Pair(question, find(*a, factors), find(*b, factors), Arm(*a, factors, []).name,
                    Arm(*b, factors, []).name, factor, factors)

    depths = sorted({a.depth for a in arms})
    inits = sorted({a.initialisation for a in arms}, key=lambda i: (initialisation_order(i), i))
    settings = []
    for arm in arms:
        if arm.factors not in settings:
            settings.append(arm.factors)
    pairs = []
    for factors in settings:
        where = "".join(f", {k}={v}" for k, v in factors.items())
        for d in depths:
            for index, later in enumerate(inits):
                for earlier in inits[:index]:
                    pairs.append(pair(f"{later} vs {earlier} at ResNet{d}{where}", (d, later), (d, earlier),
                                      INITIALISATION, factors))
        for shallow, deep in zip(depths, depths[1:]):
            for init in inits:
                pairs.append(pair(f"depth {deep} vs {shallow}, {init}{where}", (deep, init), (shallow, init), DEPTH,
                                  factors))
    for key in sorted({k for a in arms for k in a.factors}):
        values = [a.factors[key] for a in arms]
        # each value against one reference (the smallest of a numeric factor, the first arm's of a categorical
        # one): linear in the values, never every pair; descriptive, outside every family
        reference = min(values, key=float) if numeric(values) else values[0]
        for b in arms:
            if b.factors[key] == reference:
                continue
            # the same arm at the reference value: every other factor alike
            a = next((x for x in arms if (x.depth, x.initialisation) == (b.depth, b.initialisation)
                      and x.factors == {**b.factors, key: reference}), None)
            if a is not None:
                alike = Arm(b.depth, b.initialisation, {k: v for k, v in b.factors.items() if k != key}, [])
                pairs.append(Pair(f"{key}: {reference} vs {b.factors[key]} at {alike.name}", a, b, a.name, b.name,
                                  key, alike.factors))
    return pairs


def numeric(values: list) -> bool:
    """Whether every value of a factor reads as a number (a curve), else categorical (bars)."""
    try:
        [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return True


def _why_not(name: str, arm: Arm | None, epoch: str) -> str:
    file = PREDICTIONS_FILE if epoch == "selected" else FINAL_PREDICTIONS_FILE
    if arm is not None and arm.unavailable:
        return f"{name}: {arm.unavailable}"
    if arm is None or not arm.runs:
        return f"{name} has no run"
    runs = arm.runs
    run = runs[0]
    if epoch == "selected" and run.predictions_problem:
        return f"{name}: {run.predictions_problem}"
    if run.launch_status or not run.rows:
        return f"{name} has no {file} ({run.launch_status or 'no selected epoch yet'})"
    if not arm.finished:
        return f"{name} has no finished run yet (epoch {run.rows[-1]['epoch']} of {run.epochs_planned})"
    checkpoint, since = (BEST_CHECKPOINT, "0.2") if epoch == "selected" else (LAST_CHECKPOINT, "0.3.1")
    return (f"{name} has no {file} (trained before dr-resnet {since} wrote one: python -m dr_resnet.evaluate "
            f"--checkpoint {run.path / checkpoint} --out DIR writes DIR/{PREDICTIONS_FILE}; copy it to "
            f"{run.path / file})")


def collapsed_on_test(run: RunRecord, epoch: str) -> str:
    """Why the run's selected (or final) epoch looks collapsed on test ('' when it does not)."""
    return run.collapsed if epoch == "selected" else collapse(np.array(run.rows[-1]["confusion_matrix"]))


COMPARED_EPOCHS = ("selected", "final")  # compare_arms(epoch=...): the report compares the arms at both
ALIKE = ("precision", "global_batch")  # what the runs of one comparison must share beyond their config (effective)


def unlike(runs: list[RunRecord]) -> str:
    """What the runs of one comparison derived differently, though their configs agree (train.amp=auto on a
    mixed cluster, a global batch that follows the process count), naming the runs; '' when alike."""
    found = []
    for key in ALIKE:
        values: dict[str, list[str]] = {}
        for run in runs:
            if key in run.effective:
                values.setdefault(str(run.effective[key]), []).append(run.name)
        if len(values) > 1:
            found.append(f"{key.replace('_', ' ')} " + "; ".join(f"{v} ({', '.join(names)})" for v, names in values.items()))
    return "runs differ in " + " and ".join(found) if found else ""


def compare_arms(arms: list[Arm], epoch: str = "selected") -> list[dict]:
    """For each pair of arm_pairs: A - B in accuracy, QWK and referable AUC at each run's selected epoch
    (predictions.csv) or `epoch="final"` its final planned epoch (predictions_final.csv), paired seed by seed
    over the finished seeds both arms have (stats.paired_comparison: the mean difference, its standard error over
    seed pairs and test patients, 95% intervals) and McNemar's test; or why not."""
    if epoch not in COMPARED_EPOCHS:
        raise ValueError(f"epoch must be one of {', '.join(COMPARED_EPOCHS)}, got {epoch!r}")
    results = []
    for pair in arm_pairs(arms):
        entry = {"comparison": pair.question, "epoch": epoch, "a": pair.name_a, "b": pair.name_b, "factor": pair.factor,
                 "setting": pair.setting}
        # finished runs only, as the answer counts them: a run still going lends its best epoch so far
        done_a, done_b = ({r.seed: r for r in arm.finished if r.has_predictions(epoch)} if arm else {}
                          for arm in (pair.a, pair.b))
        missing = [_why_not(n, arm, epoch) for n, arm, done in ((pair.name_a, pair.a, done_a), (pair.name_b, pair.b, done_b))
                   if not done]
        seeds = sorted(set(done_a) & set(done_b))
        if missing or not seeds:
            reason = "; ".join(missing) or f"no seed in common ({sorted(done_a)} and {sorted(done_b)})"
            # an arm the sweep never ran is absent (no family member); one it ran but could not choose a setting of
            # still belonged to the question, and counts
            absent = [name for name, arm in ((pair.name_a, pair.a), (pair.name_b, pair.b))
                      if arm is None or (not arm.runs and not arm.unavailable)]
            results.append({**entry, "status": f"not compared: {reason}", **({"absent": absent} if absent else {})})
            continue
        found_a, found_b = ([done_a[k].scored(epoch) for k in seeds],  # read one comparison at a time
                            [done_b[k].scored(epoch) for k in seeds])
        first = found_a[0].facts
        different = [(r.name, p.facts.images) for r, p in zip([done_a[k] for k in seeds] + [done_b[k] for k in seeds],
                                                              found_a + found_b)
                     if (p.facts.test_set, p.facts.patients) != (first.test_set, first.patients)]
        if different:
            name, count = different[0]
            results.append({**entry, "status": f"not compared: {done_a[seeds[0]].name} and {name} were evaluated on "
                                               f"different images ({first.images} and {count}"
                                               f"{', or other patients' if count == first.images else ''}): a paired "
                                               f"comparison needs the same test set"})
            continue
        paired = compare_scored([p.scores for p in found_a], [p.scores for p in found_b])
        mcnemar = paired["mcnemar"] if isinstance(paired["mcnemar"], list) else [paired["mcnemar"]]
        warning = unlike([done_a[k] for k in seeds] + [done_b[k] for k in seeds])
        collapsed = [r.name for r in [done_a[k] for k in seeds] + [done_b[k] for k in seeds] if collapsed_on_test(r, epoch)]
        results.append({**entry, "status": "compared", "images": first.images, "resampled": paired["unit"],
                        "seeds": seeds, **{m: paired[m] for m, _ in PAIR_METRICS}, "mcnemar": mcnemar,
                        **({"warning": warning} if warning else {}), **({"collapsed": collapsed} if collapsed else {})})
    return results


ALPHA = 0.05  # each declared family's family-wise error rate
FAMILY_METRIC = "qwk"  # the metric the families' verdicts are about (the experiment's primary metric)
QUESTION = "the question"  # the primary family: each pair of initialisations at each depth, depth at each initialisation


def family_of(comparison: dict) -> str:
    """The declared family a comparison belongs to, '' for a descriptive one. Declared by the design, before
    any result is read: the question's comparisons (initialisations, depth) at each run's selected epoch form
    the primary family; made along factor keys (a learning curve's data fraction), one family per set of
    factor keys. Final-epoch comparisons, and those between values of one factor within an arm, describe."""
    if comparison["epoch"] != "selected" or comparison["factor"] not in QUESTION_FACTORS:
        return ""
    setting = comparison.get("setting") or {}
    return "along " + ", ".join(sorted(setting)) if setting else QUESTION


def declare_families(comparisons: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Mark each comparison's family and, for those made with several seed pairs, the simultaneous
    (Bonferroni, 1 - alpha/m) t-interval of its QWK difference and the verdict read from that same interval.
    m counts every planned member (made or not: an arm that did not run still belonged to the question) but
    those made with one seed a side, which stay outside the correction with no verdict (the seeds' variation
    is unknown). Returns the families: name, m, alpha, metric, members."""
    families: dict[str, list[dict]] = {}
    for c in comparisons:
        name = family_of(c)
        one_seed = c["status"] == "compared" and c[FAMILY_METRIC]["df"] is None
        # an arm the sweep never planned (--runs left it out: no folder at all) is no member; one planned that
        # could not run still is
        c["family"] = "" if one_seed or c.get("absent") else name
        if c["family"]:
            families.setdefault(name, []).append(c)
    declared = []
    for name, members in families.items():
        m = len(members)
        level = 1 - alpha / m
        for c in members:
            entry = c.get(FAMILY_METRIC)
            if c["status"] != "compared":
                continue
            if not entry["se"] > 0:  # NaN (one test patient) or 0 (e.g. both arms collapsed to one grade)
                entry["verdict"] = ("cannot be judged: " + ("no spread at all (every seed pair and patient gives the "
                                    "same difference: collapsed runs?)" if entry["se"] == 0 else
                                    "the difference's standard error is undefined on this test set"))
                continue
            low, high = clipped(FAMILY_METRIC, t_interval(entry, level))
            entry.update(family_level=level, family_low=low, family_high=high,
                         verdict=verdict(c["a"], c["b"], low, high),
                         detectable=detectable(entry["df"], level) * entry["se"])
        declared.append({"family": name, "m": m, "alpha": alpha, "metric": FAMILY_METRIC, "epoch": "selected",
                         "interval": f"simultaneous t-interval at 1 - {alpha}/{m} (Bonferroni)",
                         "members": [c["comparison"] for c in members]})
    return declared


def verdict(a: str, b: str, low: float, high: float) -> str:
    """What an interval of A - B says: which is better where it excludes 0, else the differences it rules out."""
    if low > 0:
        return f"{a} better"
    if high < 0:
        return f"{b} better"
    return f"no difference detected (differences below {low:+.3f} or above {high:+.3f} ruled out)"


PLANNING_DIFFERENCES = (0.02, 0.05)  # QWK differences the report says the seeds needed for


def smallest_detectable(comparisons: list[dict]) -> list[dict]:
    """Per compared family member: the smallest QWK difference its seeds could detect (80% power at the
    family's level), and the seed pairs that PLANNING_DIFFERENCES would need on this test set (None: none
    would do, the test set's own term is too large)."""
    found = []
    for c in comparisons:
        entry = c.get(FAMILY_METRIC) or {}
        if c.get("family") and "detectable" in entry:
            needed = {d: seeds_needed(d, entry["seed_variance"], entry["test_set_covariance"], entry["family_level"])
                      for d in PLANNING_DIFFERENCES}
            found.append({"comparison": c["comparison"], "family": c["family"], "seeds": len(c["seeds"]),
                          "detectable": entry["detectable"], "seeds_needed": needed})
    return found


SEED_COLUMNS = (*PAIR_METRICS, *((f"final_{name}", f"final-epoch {METRICS[name].label}") for name in ("accuracy", "qwk")))
# seed_summary's columns that the tables show


def seed_summary(arms: list[Arm]) -> list[dict]:
    """Per arm with a finished run: its finished seeds' test accuracy, QWK and referable AUC at the selected
    epoch and (final_*) at the final epoch, mean and standard deviation; the seeds whose selected epoch
    collapsed; and how many of its runs are still going (not counted)."""
    table = []
    for arm in arms:
        group = arm.finished
        if not group:
            continue
        epochs = {"": [r.chosen() for r in group], "final_": [r.rows[-1] for r in group]}
        row = {"arm": arm.name, "seeds": [r.seed for r in group], "collapsed": [r.seed for r in group if r.collapsed],
               "unfinished": len(arm.done) - len(group)}
        for prefix, rows in epochs.items():
            for name in COMPARED:
                values = np.array([c.get(METRICS[name].key("test"), math.nan) for c in rows], dtype=float)
                row[prefix + name] = {"mean": float(values.mean()), "values": values.tolist(),
                                      "sd": float(values.std(ddof=1)) if len(values) > 1 else None}
        table.append(row)
    return table
