"""The report's tables, built once: results (a row per run), seeds (a row per arm) and the paired
comparisons, each a Table of formatted cells that two renderers draw: results.md (markdown) and
report.html (HTML). Adding a column or a table touches the builder here, not the renderers."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from dr_resnet.results.arms import PAIR_METRICS, PLANNING_DIFFERENCES, SEED_COLUMNS
from dr_resnet.results.stats import MCNEMAR_CLUSTERED, ONE_SEED
from dr_resnet.results.tuning import BAND_LABEL, BAND_RESAMPLES

NOT_RUN = ("not run", "failed")  # a results row whose status starts so is drawn as not run


@dataclass(frozen=True)
class Column:
    key: str  # results.csv's column, or the builder's own name
    heading: str  # on the page (markdown shows `key` where it is a results.csv column, so both read alike)
    on_page: bool = True  # the page shows the columns a reader compares; results.md shows every one


@dataclass
class Row:
    cells: list[str]  # formatted; fewer than the columns: the last spans the rest
    kind: str = ""  # "" | "notrun" | "group" (a heading inside the table: one cell)


@dataclass
class Table:
    id: str
    title: str
    note: str
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    numeric: frozenset = frozenset()  # keys of the columns whose cells are numbers (right-aligned on the page)
    csv_headings: bool = False  # markdown headings are the column keys (results.csv's names)
    detail: bool = False  # a detail (a row per run): report.html shows it folded under its title; results.md in full
    note_below: bool = False  # the note after the table (the answer's tables: the numbers are the first thing read)


def number(value, places: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{places}f}"
    return str(value)


# The results table: (results.csv column, heading on the page or None: results.md and results.csv only)
RESULT_COLUMNS = (("run", "run"), ("depth", None), ("weights", None), ("status", "status"), ("epochs", "epochs"),
                  ("selected_by", "selected by"), ("selected_epoch", "epoch"),
                  ("held_out_qwk", "held-out QWK (what may choose)"), ("collapsed", "collapsed"),
                  ("selected_test_acc", None), ("selected_qwk", None),
                  ("selected_acc_95ci", "test accuracy (95% CI; reported, not chosen on)"),
                  ("selected_qwk_95ci", "test QWK (95% CI; reported, not chosen on)"),
                  ("selected_auc_95ci", "test referable AUC (95% CI; reported, not chosen on)"),
                  ("ci_resampled", "resampled"), ("selected_ece", "ECE"), ("ece_before_temperature", None),
                  ("recall_at_selected", "recall per grade"), ("referable_sens_at_selected", None),
                  ("referable_spec_at_selected", None), ("final_test_acc", None), ("final_qwk", None),
                  ("final_qwk_95ci", "final-epoch QWK (95% CI)"),
                  ("majority_baseline", "majority baseline"),
                  ("patients_in_train_and_test", "test patients also in training"),
                  ("skipped_images", "photos skipped"), ("train_minutes", "minutes"))
COLUMNS = [key for key, _ in RESULT_COLUMNS]  # results.csv

RESULTS_NOTE = (
    "selected_epoch is each run's own choice, never made on the test split: the best epoch by its train.select_by on "
    "the held-out part of its training split (selected_by: held-out ...), or its final epoch when nothing was held "
    "out (selected_by: final); it is the epoch of its checkpoint_best.pt. collapsed: why the selected epoch looks "
    "collapsed (one grade predicted for 95% of the test images or more, or accuracy below the majority baseline). "
    "held_out_qwk: the selected epoch's QWK on the held-out part, the only figure a choice between runs (a learning "
    "rate, a setting) may be made on; every test column is reported, never chosen on. "
    "QWK = quadratic weighted kappa; recall per grade 0..4 at the selected epoch; referable DR = grade >= 2 vs < 2 "
    "(sensitivity, specificity, ROC AUC). Accuracy is only meaningful above the majority baseline. selected_*_95ci: "
    "the selected epoch's accuracy, QWK and referable AUC with bootstrap 95% intervals (ci_resampled: patients when "
    "image names carry a patient id, else images). selected_ece: the selected epoch's expected calibration error of "
    "its top grade probability (0 = calibrated); ece_before_temperature: the same without its fitted temperature "
    "(train.calibration=temperature). final_qwk_95ci: the final planned epoch's QWK with its bootstrap interval "
    "(predictions_final.csv). patients_in_train_and_test: test patients with images in training too (the "
    "other eye, or a second visit): where above 0, the test figures may be optimistic; split by patient "
    "(python -m dr_resnet.split). skipped_images: photos left out because they cannot be decoded or are blank "
    "(data.bad_images=skip; summary.json names each).")


ANSWER_NOTE = (
    "Each arm at the setting that stands for it (never chosen on test: its --tune winner, or the searched setting "
    "with the best held-out score), at each run's selected epoch; along a curve (a numeric factor of many values, "
    "none chosen) one row per line with its first and last values. Test QWK, accuracy and referable AUC (grade >= 2 "
    "against the rest): the mean over the arm's "
    "finished seeds, with a 95% t-interval that counts both the seeds and the test patients (S - 1 degrees of "
    "freedom; the test set's jackknife alone, normal, with one seed); sd: the seeds' standard deviation. Accuracy "
    "means something only above the majority baseline (always answering the commonest grade). Runs: every run "
    "behind the arm's answer (its searched settings' seeds, or its --tune trials and final seeds), and their "
    "training minutes: the compute its place in the table cost.")


def _estimate(entry: dict | None) -> str:
    if not entry:
        return "-"
    if entry.get("low") is None:
        return f"{entry['mean']:.3f} (no interval)"
    alone = ", test set only" if "df" in entry and entry["df"] is None else ""  # one seed: the seeds' spread unknown
    return f"{entry['mean']:.3f} ({entry['low']:.3f} to {entry['high']:.3f}{alone})"


def answer_table(rows: list[dict]) -> Table:
    metrics = {row["held_out_metric"] for row in rows if row.get("held_out") is not None}
    one = next(iter(metrics)) if len(metrics) == 1 else ""  # the same for every arm: said once, in the heading
    columns = [Column("arm", "arm"), Column("how", "setting (how chosen)"),
               Column("held_out", f"{one} that chose it" if one else "held-out score"),
               Column("qwk", "test QWK (95% CI)"), Column("accuracy", "test accuracy (95% CI)"),
               Column("referable_auc", "test referable AUC (95% CI)"),
               Column("sd", "seeds' sd (QWK)"), Column("baseline", "majority baseline"), Column("seeds", "seeds"),
               Column("runs", "runs behind it"), Column("minutes", "training minutes"),
               Column("pretraining", "pretraining (its backbone's cost)")]
    table = Table("answer", "Answer", ANSWER_NOTE, columns, note_below=True,
                  numeric=frozenset(["held_out", "qwk", "accuracy", "referable_auc", "sd", "baseline", "seeds", "runs",
                                     "minutes"]))
    for row in rows:
        if "curve" in row:
            table.rows.append(curve_row(row))
            continue
        held = ("-" if row.get("held_out") is None else f"{row['held_out']:.3f}" if one else
                f"{row['held_out']:.3f} ({row['held_out_metric']})")
        if "qwk" not in row:
            table.rows.append(Row([row["arm"], row["how"], held, row["status"]], "notrun"))
            continue
        arm = row["arm"] + (f" (collapsed: seed {', '.join(map(str, row['collapsed']))})" if row.get("collapsed") else "")
        arm += f" ({row['status']})" if row.get("status", "finished") != "finished" else ""
        arm += f" ({row['no_interval']})" if row.get("no_interval") else ""
        sd = row["qwk"].get("sd")
        table.rows.append(Row([arm, row["how"], held, _estimate(row["qwk"]), _estimate(row["accuracy"]),
                               _estimate(row.get("referable_auc")),
                               f"{sd:.3f}" if sd is not None else "-", number(row.get("baseline"), 3), str(row["seeds"]),
                               str(row["trials"]), f"{row['minutes']:.1f}", pretraining_cost(row.get("pretraining"))]))
    return table


def pretraining_cost(record: dict | None) -> str:
    """A backbone's cost as the answer says it beside its arm: GPU- or CPU-hours, its method, epochs and photos;
    '-' for an arm without one (ImageNet's weights cost this experiment nothing; scratch has none)."""
    if not record:
        return "-"
    kind, hours = ("GPU", record["gpu_hours"]) if record.get("gpu_hours") else ("CPU", record.get("cpu_hours") or 0.0)
    hours = f"{hours:.1f} {kind}-h" if hours >= 1 else f"{hours * 60:.1f} {kind}-min"  # the training column's minutes
    unfinished = "" if record.get("finished", True) else ", unfinished"
    return (f"{hours} ({record.get('method', '?')}, {record.get('epochs', '?')} epochs on {record.get('images', '?')} "
            f"photos{unfinished})")


def backbones_table(rows: list[dict]) -> Table | None:
    """The backbones the arms fine-tuned from: each one's pool (every source with its photos and patients), method,
    epochs, settings' hash and cost; None when no arm started from one."""
    found = [row for row in rows if row.get("pretraining")]
    if not found:
        return None
    columns = [Column("arm", "arm"), Column("initialisation", "initialisation"), Column("pool", "pool (photos, patients)"),
               Column("pretraining", "pretraining"), Column("hash", "settings' hash")]
    table = Table("backbones", "Backbones",
                  "Each arm's self-supervised backbone (python -m dr_resnet.pretrain): the photos it learned from, "
                  "their grades unread, none of them in the test split (the pool is refused otherwise), and what it "
                  "cost. The seeds of an arm share its backbone: they vary the fine-tuning, not the pretraining.",
                  columns)
    for row in found:
        record = row["pretraining"]
        pool = "; ".join(f"{s.get('root', '?')}:{s.get('split', '?')} ({s.get('images', '?')}, {s.get('patients', '?')})"
                         for s in record.get("pool", [])) or "-"
        table.rows.append(Row([row["arm"], str(record.get("initialisation", "-")), pool,
                               pretraining_cost(record), str(record.get("config_hash", "-"))]))
    return table


def curve_row(row: dict) -> Row:
    """One line of a curve (answer.fold_curves): its first and last values' test scores; every value's in the
    section 'Scores along key'."""
    key, points = row["curve"], row["points"]
    scored = [(value, found) for value, found in points if "qwk" in found]
    ends = [scored[0], scored[-1]] if len(scored) > 1 else scored

    def at(metric: str) -> str:
        return "; ".join(f"{key}={value}: {_estimate(found.get(metric))}" for value, found in ends) or "-"
    seeds = sorted({found["seeds"] for _, found in points})
    return Row([f"{row['arm']} along {key}", f"a curve of {len(points)} values of {key}, every one reported (section "
                f"'Scores along {key}'; none chosen)", "-", at("qwk"), at("accuracy"), at("referable_auc"), "-",
                number(next((found.get("baseline") for _, found in scored), None), 3),
                " to ".join(map(str, dict.fromkeys([seeds[0], seeds[-1]]))), str(row["trials"]), f"{row['minutes']:.1f}",
                pretraining_cost(row.get("pretraining"))])


QUESTION_NOTE = (
    "The comparisons the experiment was designed to make, declared before any result is read: {families}. A - B in "
    "test QWK at each run's selected epoch, paired seed by seed; the interval is simultaneous within its family "
    "(Bonferroni, 1 - 0.05/m; t over seed pairs with the shared test set's covariance) and the verdict is read from "
    "that same interval. 'No difference detected' is not 'no difference': it names the differences the interval "
    "rules out.")


def question_table(members: list[dict], families: list[dict]) -> Table:
    columns = [Column("comparison", "comparison"), Column("qwk", "QWK A - B"), Column("interval", "simultaneous interval"),
               Column("verdict", "verdict"), Column("seeds", "seed pairs")]
    table = Table("question", "The question: comparisons with a verdict", QUESTION_NOTE.format(
        families=family_text(families)), columns, numeric=frozenset(["qwk", "seeds"]), note_below=True)
    sizes = {f["family"]: f["m"] for f in families}
    for c in members:
        if "folded" in c:
            table.rows.append(folded_row(c, sizes))
            continue
        name = f"{c['a']} - {c['b']}"
        if c["status"] != "compared":
            table.rows.append(Row([name, c["status"]], "notrun"))
            continue
        q = c["qwk"]
        if "family_low" in q:
            interval = (f"{q['family_low']:+.3f} to {q['family_high']:+.3f} ({100 * q['family_level']:.2f}%, "
                        f"{c['family']}, m = {sizes[c['family']]})")
        elif not c.get("family"):  # one seed a side: outside every family
            interval = f"{q['low']:+.3f} to {q['high']:+.3f} (95%, test set only)"
        else:
            interval = "-"
        verdict = q.get("verdict") or f"no verdict: {q['over']}"
        table.rows.append(Row([name, f"{q['difference']:+.3f}", interval, verdict, str(len(c["seeds"]))]))
    return table


def folded_row(group: dict, sizes: dict[str, int]) -> Row:
    """One question along a curve in one row (answer.fold_question): the range of its differences over the
    values, and at which values its family's intervals found A or B better; every comparison is in the section
    'Along key'."""
    key, members = group["key"], group["members"]
    made = [c for c in members if c["status"] == "compared"]
    values = {side: [str(c["setting"][key]) for c in made if c["qwk"].get("verdict") == f"{c[side]} better"]
              for side in ("a", "b")}
    counted = [f"{group[side]} better at {len(v)} ({_listed(v)})" for side, v in values.items() if v]
    undecided = len(made) - len(values["a"]) - len(values["b"])
    counted += [f"no difference detected at {undecided}"] if undecided else []
    differences = [c["qwk"]["difference"] for c in made]
    m = sizes.get(group["family"])
    seeds = sorted({len(c["seeds"]) for c in made})
    return Row([f"{group['a']} - {group['b']} along {key} ({len(members)} values; section 'Along {key}')",
                f"{min(differences):+.3f} to {max(differences):+.3f}" if differences else "-",
                f"simultaneous within {group['family']} (m = {m})" if m else "test set only (one seed a side)",
                (f"of {len(made)} values made: " + "; ".join(counted)) if made else "none made",
                " to ".join(map(str, dict.fromkeys(seeds[:1] + seeds[-1:]))) or "-"])


def _listed(values: list[str]) -> str:
    return ", ".join(values) if len(values) <= 4 else f"{', '.join(values[:3])}, ... {values[-1]}"


def weigh_table(lines: list[tuple[str, str]]) -> Table:
    table = Table("weigh", "What the answer rests on", "What a reviewer weighs the answer by (after Dodge et al. 2019, "
                  "'Show your work'): the seeds and the test set behind every interval, what chose the settings, and "
                  "what the seeds could have found.", [Column("what", "what"), Column("value", "value")],
                  note_below=True)
    table.rows += [Row([what, value]) for what, value in lines]
    return table


def results_table(rows: list[dict]) -> Table:
    columns = [Column(key, heading or key, heading is not None) for key, heading in RESULT_COLUMNS]
    table = Table("results", "Results", RESULTS_NOTE, columns, csv_headings=True, detail=True,
                  numeric=frozenset(k for k in COLUMNS if not k.endswith(("95ci", "recall_at_selected"))
                                    and k not in ("run", "weights", "status", "epochs", "selected_by", "collapsed",
                                                  "ci_resampled")))
    for row in rows:
        kind = "notrun" if str(row.get("status", "")).startswith(NOT_RUN) else ""
        table.rows.append(Row([number(row.get(k)) for k in COLUMNS], kind))
    return table


def seeds_table(seeds: list[dict]) -> Table:
    columns = [Column("arm", "arm"), Column("seeds", "seeds"), Column("collapsed", "collapsed seeds"),
               *(Column(key, label) for key, label in SEED_COLUMNS)]
    note = "Each arm's selected and final epochs: mean +- standard deviation over its seeds that finished every epoch."
    unfinished = sum(row["unfinished"] for row in seeds)
    if unfinished:
        note += f" {unfinished} run(s) still going are not counted (seeds column)."
    table = Table("seeds", "Seeds", note, columns, numeric=frozenset(key for key, _ in SEED_COLUMNS))
    for row in seeds:
        cells = [f"{row[m]['mean']:.3f}" + (f" +- {row[m]['sd']:.3f}" if row[m]["sd"] is not None else "")
                 for m, _ in SEED_COLUMNS]
        collapsed = f"{len(row['collapsed'])} (seed {', '.join(map(str, row['collapsed']))})" if row["collapsed"] else "0"
        going = f" ({row['unfinished']} more still going)" if row["unfinished"] else ""
        table.rows.append(Row([row["arm"], ", ".join(map(str, row["seeds"])) + going, collapsed, *cells]))
    return table


COMPARISONS_NOTE = (
    "A - B on the same test images, paired seed by seed over the seeds both arms have, at each run's selected epoch "
    "(chosen on its held-out part, else its final epoch) and at its final epoch. The difference is the mean of the "
    "seed pairs' differences; its standard error counts both sources of uncertainty: the seeds (the pairs' variance / "
    "S) and the shared test set (the mean covariance between different pairs' differences, from a jackknife that "
    "leaves one patient out at a time: arms right on different patients differ alike in every pair), with Student's t "
    "at S - 1 degrees of freedom. Families, declared before any result is read: {families}. Within a family the QWK "
    "interval is simultaneous (Bonferroni: 1 - 0.05/m) and the verdict is read from that same interval; 'no "
    "difference detected' names the differences the interval rules out. Everything else is descriptive, with "
    "marginal 95% intervals and no verdict: accuracy and referable AUC, final-epoch figures, comparisons between "
    "values of one factor, McNemar's tests ({mcnemar} where patients have several images, exact otherwise; one per "
    "seed pair). One seed a side: the interval is the test set's alone ({one_seed}), with no verdict and outside "
    "every family.")
EPOCH_TITLES = {"selected": "each run's selected epoch", "final": "each run's final epoch"}


FOLDED_FAMILY = 6  # a family of more members is summed up in one row (or its size alone) in the answer's tables


def family_text(families: list[dict]) -> str:
    """The families and their members (a family of more than six: its size alone; comparisons.json lists all)."""
    return "; ".join(f"{f['family']} (m = {f['m']}" + (f": {', '.join(f['members'])})" if f["m"] <= FOLDED_FAMILY else ")")
                     for f in families) or "none"


def comparisons_table(comparisons: list[dict], families: list[dict]) -> Table:
    columns = [Column("comparison", "comparison"), Column("a", "A"), Column("b", "B"), Column("images", "images"),
               Column("qwk", "QWK A - B"), Column("interval", "QWK interval"), Column("verdict", "verdict"),
               *(Column(key, f"{label} A - B (95% CI)") for key, label in PAIR_METRICS if key != "qwk"),
               Column("agree", "seeds agree"), Column("counts", "only A right / only B right"),
               Column("p", "McNemar p")]
    note = COMPARISONS_NOTE.format(families=family_text(families), mcnemar=MCNEMAR_CLUSTERED, one_seed=ONE_SEED)
    table = Table("comparisons", "Paired comparisons (A - B on the same test images)", note, columns,
                  numeric=frozenset(["qwk", *(key for key, _ in PAIR_METRICS), "agree", "counts", "p"]))
    # Comparisons an arm with no run at all rules out: one line for all of them, not one per pair and epoch.
    absent = list(dict.fromkeys(name for c in comparisons for name in c.get("absent", ())))
    if absent:
        table.rows.append(Row(["not compared: no run of " + ", ".join(absent)], "notrun"))
    comparisons = [c for c in comparisons if not c.get("absent")]
    sizes = {f["family"]: f["m"] for f in families}
    for epoch, title in EPOCH_TITLES.items():
        shown = [c for c in comparisons if c["epoch"] == epoch]
        if shown:
            table.rows.append(Row([f"at {title}"], "group"))
        for c in shown:
            start = [c["comparison"] + (f" (warning: {c['warning']})" if c.get("warning") else "")
                     + (f" (collapsed: {len(c['collapsed'])} of {2 * len(c.get('seeds') or [])} runs; "
                        f"comparisons.json names them)" if c.get("collapsed") else ""), c["a"], c["b"]]
            if c["status"] != "compared":
                table.rows.append(Row([*start, c["status"]], "notrun"))
                continue
            several = len(c["seeds"]) > 1
            q = c["qwk"]
            seeds = f", seeds {', '.join(map(str, c['seeds']))}" if several else ", one seed"
            if "verdict" in q and "family_low" not in q:  # no interval to read a verdict from
                interval, judged = "-", q["verdict"]
            elif "verdict" in q:
                interval = (f"{q['family_low']:+.3f} to {q['family_high']:+.3f} ({100 * q['family_level']:g}% simultaneous, "
                            f"{c['family']}, m = {sizes[c['family']]})")
                judged = q["verdict"]
            else:
                over = "test set only: " + ONE_SEED if not several else "seeds and patients"
                interval, judged = f"{q['low']:+.3f} to {q['high']:+.3f} (95%, {over})", "descriptive"
            cells = [f"{c[m]['difference']:+.3f} ({c[m]['low']:+.3f} to {c[m]['high']:+.3f})"
                     for m, _ in PAIR_METRICS if m != "qwk"]
            agree = f"{q['seeds_agree']} of {len(c['seeds'])}" if several and q["difference"] else "-"
            counts = ", ".join(f"{m['a_only_right']} / {m['b_only_right']}" for m in c["mcnemar"])
            p_values = ", ".join(f"{m['p_value']:.3g}" for m in c["mcnemar"])
            table.rows.append(Row([*start, f"{c['images']} ({c['resampled']}{seeds})", f"{q['difference']:+.3f}",
                                   interval, judged, *cells, agree, counts, p_values]))
    return table


def detectable_table(rows: list[dict]) -> Table:
    columns = [Column("comparison", "comparison"), Column("family", "family"), Column("seeds", "seed pairs"),
               Column("detectable", "smallest detectable QWK difference"),
               *(Column(f"needed_{d}", f"seed pairs for {d}") for d in PLANNING_DIFFERENCES)]
    table = Table("detectable", "What these seeds can detect", (
        "Per comparison of a family: the QWK difference its test finds with 80% chance at the family's corrected level, "
        "given the spread its seeds and test set showed; and how many seed pairs a difference of "
        f"{' or '.join(map(str, PLANNING_DIFFERENCES))} would need on this test set ('not on this test set': the test "
        "set's own share of the uncertainty, which more seeds do not shrink, is too large: a larger test set is needed)."),
        columns, numeric=frozenset(["seeds", "detectable", *(f"needed_{d}" for d in PLANNING_DIFFERENCES)]),
        note_below=True)
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    for family, members in families.items():
        if len(members) > FOLDED_FAMILY:  # a family along a curve: its range in one row
            low, high = min(r["detectable"] for r in members), max(r["detectable"] for r in members)
            seeds = sorted({r["seeds"] for r in members})
            needed = [[r["seeds_needed"][d] for r in members] for d in PLANNING_DIFFERENCES]
            table.rows.append(Row([f"{len(members)} comparisons", family, " to ".join(map(str, dict.fromkeys(
                seeds[:1] + seeds[-1:]))), f"{low:.3f} to {high:.3f}", *(
                "not on this test set" if None in n else " to ".join(map(str, dict.fromkeys([min(n), max(n)])))
                for n in needed)]))
            continue
        for row in members:
            table.rows.append(Row([row["comparison"], row["family"], str(row["seeds"]), f"{row['detectable']:.3f}",
                                   *(str(n) if n else "not on this test set" for n in row["seeds_needed"].values())]))
    return table


OPERATING_NOTE = (
    "Referable DR (grade >= 2) at the screening operating points Gulshan et al. (2016) report: for each target "
    "specificity, the referral threshold on the referable score is fitted on the run's held-out part "
    "(predictions_val.csv; its specificity there is shown), then the test split's sensitivity and specificity at that "
    "threshold, with patient-bootstrap 95% intervals. Nothing is fitted on test; a run without a held-out part has no "
    "row. A threshold needs about 10 / (1 - target) held-out negatives (100 for 90%, 500 for 98%) to rest on some 10 "
    "images above it: with fewer, the row carries a warning.")


def operating_points_table(rows: list[dict]) -> Table:
    columns = [Column("run", "run"), Column("target", "target specificity"), Column("threshold", "threshold"),
               Column("held_out", "held-out specificity"), Column("negatives", "held-out negatives"),
               Column("sensitivity", "test sensitivity (95% CI)"), Column("specificity", "test specificity (95% CI)")]
    table = Table("operating_points", "Referable DR at screening operating points", OPERATING_NOTE, columns, detail=True,
                  numeric=frozenset(("target", "threshold", "held_out", "negatives", "sensitivity", "specificity")))
    for row in rows:
        for point in row["points"]:
            negatives = point.get("held_out_negatives")
            warning = f" (warning: {point['warning']})" if point.get("warning") else ""
            shown = "-" if negatives is None else f"{negatives}{warning}"
            table.rows.append(Row([row["run"], f"{point['target_specificity']:.0%}", f"{point['threshold']:.4g}",
                                   f"{point['held_out_specificity']:.3f}", shown,
                                   *(f"{point[k]['value']:.3f} ({point[k]['low']:.3f}-{point[k]['high']:.3f})"
                                     for k in ("sensitivity", "specificity"))]))
    return table


DATASET_COLUMNS = (("run", "run"), ("dataset", "dataset"), ("split", "split"), ("images", "images"),
                   ("epoch", "epoch"), ("accuracy", "accuracy (95% CI)"), ("qwk", "QWK (95% CI)"),
                   ("referable_auc", "referable AUC (95% CI)"), ("sensitivity", "referable sensitivity"),
                   ("specificity", "referable specificity"), ("majority_baseline", "majority baseline"))
DATASETS_NOTE = (
    "Each run's selected epoch (checkpoint_best.pt, or the checkpoint evaluate was given) on its own test split and on "
    "every dataset and split `dr-evaluate` scored it on (RUN/evaluations/): the same metrics and bootstrap intervals, "
    "side by side. A drop from the run's own test split to another dataset is the domain shift a model meets in a new "
    "clinic.")


def datasets_table(rows: list[dict]) -> Table:
    columns = [Column(key, heading) for key, heading in DATASET_COLUMNS]
    table = Table("datasets", "Test results on other datasets (external validation)", DATASETS_NOTE, columns,
                  numeric=frozenset(("images", "epoch", "accuracy", "qwk", "referable_auc", "sensitivity", "specificity",
                                     "majority_baseline")))
    for row in rows:
        table.rows.append(Row([number(row.get(key), 3) for key, _ in DATASET_COLUMNS]))
    return table


FACTOR_NOTE = (
    "{key}: at each value, the paired comparisons of initialisations and depth (QWK A - B on the same test images at each "
    "run's selected epoch, chosen on its held-out part). They form one declared family (m = {m}): each interval is "
    "simultaneous over it (Bonferroni) and the verdict is read from it; one seed a side gives the test set's interval "
    "alone and no verdict. The figure factor_{file}.png draws each arm's held-out QWK (what a choice may use) and test "
    "QWK (reported, not chosen on) against {key} (mean over seeds with the 95% band of the scores table).")


def factor_scores_table(key: str, held_out: dict[str, list[dict]], test: dict[str, list[dict]],
                        chosen: dict[str, str] | None, searched: bool, shares: dict[str, list[float]] | None) -> Table:
    """Per line and value of a factor: the held-out QWK first, then the test QWK (reported, not chosen on)."""
    columns = [Column("line", "arm"), Column("value", key), *([Column("share", "share of images")] if shares else []),
               Column("held_out", "held-out QWK (mean, 95% CI)"), Column("test", "test QWK (reported, not chosen on)"),
               Column("seeds", "seeds"), Column("choice", "held-out's choice")]
    kind = ("a searched key: the held-out score's choice is marked; comparing the arms at their choices on the same "
            "seeds favours the noisier arm, so run the choice on fresh seeds (launch.sweep --tune)") if searched else \
        "a factor: every value is the experiment, none is chosen"
    bands = sorted({e.get("band", "seeds") for entries in test.values() for e in entries})
    table = Table(f"scores_{key}", f"Scores along {key}", f"{key} is {kind}. Mean over each arm's finished seeds at "
                  f"their selected epochs, with 95% t-intervals: held-out QWK over the seeds; test QWK over "
                  f"{' or '.join(bands)} (the answer table's interval where every seed has its predictions).", columns,
                  numeric=frozenset(("share", "held_out", "test", "seeds")))

    def shown(e: dict | None) -> str:
        if e is None:
            return "-"
        return f"{e['mean']:.3f}" + (f" ({e['low']:.3f} to {e['high']:.3f})" if e["low"] is not None else "")
    for line, entries in test.items():
        by_value = {str(e["value"]): e for e in held_out.get(line, [])}
        for index, e in enumerate(entries):
            value = str(e["value"])
            mark = "chosen" if chosen and chosen.get(line) == value else ""
            share = [f"{shares[line][index]:.1%}"] if shares else []
            table.rows.append(Row([line, value, *share, shown(by_value.get(value)), shown(e), str(e["n"]), mark]))
    return table


def factor_table(key: str, rows: list[dict]) -> Table:
    columns = [Column("value", key), Column("comparison", "comparison"), Column("qwk", "QWK A - B (interval)"),
               Column("seeds", "seeds"), Column("holds", "verdict")]
    m = next((row["m"] for row in rows if row.get("m")), len(rows))
    table = Table(f"factor_{key}", f"Along {key}", FACTOR_NOTE.format(key=key, file=key.replace(".", "_"), m=m),
                  columns, numeric=frozenset(("qwk", "seeds")))
    for row in rows:
        if row["status"] != "compared":
            table.rows.append(Row([str(row["value"]), row["comparison"], row["status"]], "notrun"))
            continue
        table.rows.append(Row([str(row["value"]), row["comparison"],
                               f"{row['difference']:+.3f} ({row['low']:+.3f} to {row['high']:+.3f})", str(row["seeds"]),
                               row["holds"]]))
    return table


def convergence_table(rows: list[dict]) -> Table:
    columns = [Column("arm", "arm"), Column("epochs", "epochs planned"), Column("reach", "epochs to 95% (mean)"),
               Column("per_seed", "per seed"), Column("final", "final held-out QWK")]
    table = Table("convergence", "Epochs to reach 95% of the final held-out QWK",
                  "The first epoch whose held-out QWK reaches 95% of the final epoch's, per seed and its mean: how fast "
                  "each arm converges (He et al. 2019: from scratch needs longer).", columns,
                  numeric=frozenset(("epochs", "reach", "final")))
    for row in rows:
        table.rows.append(Row([row["arm"], str(row["epochs"]), f"{row['mean']:.1f}",
                               ", ".join(f"seed {s}: {e}" for s, e in row["per_seed"].items()),
                               f"{row['final_val_qwk']:.3f}"]))
    return table


TUNING_NOTE = (
    "launch.sweep --tune: each arm's trials (the same number for every arm, drawn from the sweep file's search:) "
    "trained on one seed; the winner is the finished trial with the best held-out figure at its selected epoch, "
    "chosen without reading any test figure (tuning.json; equal scores: the earlier trial, marked as a tie); phase 2 "
    "ran the winner's settings on every seed. Every planned trial counts: a failed or diverged trial ranks below "
    "every finished one; a trial the infrastructure lost is 'to rerun' (running the sweep again reruns it) and "
    "leaves N incomplete. 'collapsed': the winner's selected epoch predicts one grade for most images or is below "
    "the majority baseline (a flag, not a choice). Best of k (after Dodge et al. 2019): the median, over every set "
    "of k distinct trials of the N, of the set's best held-out score ('failed' where half the sets or more failed "
    "entirely; at k = N the observed best), with the chance that all k failed; in brackets a 95% band from {band} "
    "({resamples} bootstrap resamples of the N trials, the median recomputed on each): not an uncertainty over "
    "tuning seeds. The curve describes the trials; verdicts on the arms come from the seed-level comparison of "
    "phase 2.")
SHOWN_K = 8  # up to this many trials the table has a column for every k; beyond, k = 1, 2, N/3, N/2 and N


def shown_k(n: int) -> list[int]:
    """The k whose best-of-k columns the table shows for N = n trials."""
    return list(range(1, n + 1)) if n <= SHOWN_K else sorted({1, 2, max(1, round(n / 3)), max(1, round(n / 2)), n})


def best_of_k_cell(point: dict) -> str:
    """'0.812 [0.700, 0.850]', 'failed [...]', and the chance that all k trials failed where there is one."""
    def score(value: float | None) -> str:
        return "failed" if value is None else f"{value:.3f}"

    cell = f"{score(point['median'])} [{score(point['low'])}, {score(point['high'])}]"
    return cell + (f"; all failed {point['all_failed']:.0%}" if point["all_failed"] > 0 else "")


def winner_cell(winner: dict) -> str:
    """The winner's trial and values, or the tie it was picked from."""
    values = ", ".join(f"{k}={v}" for k, v in winner["values"].items())
    if winner.get("tie"):
        tied = winner.get("tied", [])
        return f"tie among {len(tied)} trials ({', '.join(tied)}): the first, {winner['trial']} ({values}), is run"
    return f"{winner['trial']} ({values})"


def tuning_table(choice: dict, curves: dict[str, list[dict]], ranking: str) -> Table:
    """Per arm: planned trials, finished, failed / diverged, to rerun, the winner (or the tie), its held-out
    score and epoch, whether it looks collapsed, and the median best of k with its band."""
    ks = sorted({k for curve in curves.values() for k in shown_k(len(curve))})
    columns = [Column("arm", "arm"), Column("planned", "trials planned (N)"), Column("finished", "finished"),
               Column("failed", "failed / diverged"), Column("to_rerun", "to rerun"), Column("winner", "winner"),
               Column("held_out", "held-out"), Column("epoch", "epoch"), Column("collapsed", "collapsed"),
               *(Column(f"k{k}", f"best of k={k}: median [band]") for k in ks)]
    note = f"{TUNING_NOTE.format(band=BAND_LABEL, resamples=BAND_RESAMPLES)} {ranking}".strip()
    if choice.get("repeats"):
        distinct = choice.get("distinct_configurations") or {}
        note += (f" The search space holds fewer distinct configurations than trials ({distinct}): whole configurations "
                 f"repeat, each repeat an independent run in a folder of its own, and each counts as one trial in N and "
                 f"in the best of k.")
    table = Table("tuning", "Tuning (phase 1 of --tune) and the best held-out score of k trials", note, columns,
                  numeric=frozenset(["planned", "finished", "held_out", "epoch", *(f"k{k}" for k in ks)]))
    for arm, entry in choice["arms"].items():
        rerun = entry["to_rerun"]
        counts = [arm, str(entry["planned"]), str(entry["finished"]), f"{entry['failed']} / {entry['diverged']}",
                  f"{len(rerun)} ({', '.join(rerun)}): N incomplete" if rerun else "0"]
        if "winner" not in entry:
            table.rows.append(Row([*counts, entry.get("reason", "no winner")], "notrun"))
            continue
        w = entry["winner"]
        collapsed = f"yes: {w['collapsed']} ({w.get('collapsed_on', 'held-out')} confusion matrix)" if w.get("collapsed") \
            else "no" if "collapsed" in w else "-"
        curve = {c["k"]: c for c in curves.get(arm, [])}
        table.rows.append(Row([*counts, winner_cell(w), f"{w['held_out']:.4f}", str(w["epoch"]), collapsed,
                               *(best_of_k_cell(curve[k]) if k in curve else "-" for k in ks)]))
    return table


def markdown(table: Table, level: int = 2) -> list[str]:
    """The table as markdown lines: its title, its note, the columns shown on the page (results.csv holds every
    one of the results table's)."""
    shown = [i for i, c in enumerate(table.columns) if c.on_page]
    width = len(shown)
    headings = [table.columns[i].key if table.csv_headings else table.columns[i].heading for i in shown]
    lines = [f"{'#' * level} {table.title}", "", *([] if table.note_below else [table.note, ""]),
             "| " + " | ".join(headings) + " |", "|" + "---|" * width]
    for row in table.rows:
        if row.kind == "group":
            lines.append(f"| **{row.cells[0]}** |" + " |" * (width - 1))
        else:
            cells = [row.cells[i] for i in shown if i < len(row.cells)]
            lines.append("| " + " | ".join(cells) + " |" + " |" * (width - len(cells)))
    return lines + (["", table.note] if table.note_below else [])


def to_html(table: Table) -> str:
    """The table as an HTML section: its title, its note, the columns shown on the page; a detail table
    folded (<details>) under its title."""
    shown = [i for i, c in enumerate(table.columns) if c.on_page]
    head = "".join(f"<th>{html.escape(table.columns[i].heading)}</th>" for i in shown)
    rows = []
    for row in table.rows:
        if row.kind == "group":
            rows.append(f'<tr class="group"><th colspan="{len(shown)}">{html.escape(row.cells[0])}</th></tr>')
            continue
        cls = f' class="{row.kind}"' if row.kind else ""
        kept = [i for i in shown if i < len(row.cells)]
        cells = []
        for position, i in enumerate(kept):
            key, value = table.columns[i].key, row.cells[i]
            span = len(shown) - len(kept) + 1 if position == len(kept) - 1 and len(kept) < len(shown) else 1
            attributes = (' class="num"' if key in table.numeric and value != "-" else
                          ' class="nowrap"' if key.endswith(("95ci", "recall_at_selected")) else "")
            attributes += f' colspan="{span}"' if span > 1 else ""
            cells.append(f"<td{attributes}>{html.escape(value)}</td>")
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    title = f"<h2>{html.escape(table.title)}</h2>"
    note = f'<p class="note">{html.escape(table.note)}</p>'
    grid = f'<div class="wide"><table id="{table.id}"><tr>{head}</tr>{"".join(rows)}</table></div>'
    body = grid + note if table.note_below else note + grid
    if table.detail:  # folded: the title and its row count show, a click opens it
        return (f'<details><summary>{title}<span class="rows">{len(table.rows)} rows: click to show</span>'
                f"</summary>{body}</details>")
    return title + body
