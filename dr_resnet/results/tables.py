"""The report's tables, built once: results (a row per run), seeds (a row per arm) and the paired
comparisons, each a Table of formatted cells that two renderers draw: results.md (markdown) and
report.html (HTML). Adding a column or a table touches the builder here, not the renderers."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from dr_resnet.results.arms import PAIR_METRICS, SEED_COLUMNS

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


def number(value, places: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{places}f}"
    return str(value)


# The results table: (results.csv column, heading on the page or None: results.md and results.csv only)
RESULT_COLUMNS = (("run", "run"), ("depth", None), ("weights", None), ("status", "status"), ("epochs", "epochs"),
                  ("selected_by", "selected by"), ("selected_epoch", "epoch"), ("collapsed", "collapsed"),
                  ("selected_test_acc", None), ("selected_qwk", None), ("selected_acc_95ci", "accuracy (95% CI)"),
                  ("selected_qwk_95ci", "QWK (95% CI)"), ("selected_auc_95ci", "referable AUC (95% CI)"),
                  ("ci_resampled", "resampled"), ("selected_ece", "ECE"), ("ece_before_temperature", None),
                  ("recall_at_selected", "recall per grade"), ("referable_sens_at_selected", None),
                  ("referable_spec_at_selected", None), ("final_test_acc", None), ("final_qwk", "final-epoch QWK"),
                  ("majority_baseline", "majority baseline"), ("train_minutes", "minutes"))
COLUMNS = [key for key, _ in RESULT_COLUMNS]  # results.csv

RESULTS_NOTE = (
    "selected_epoch is each run's own choice, never made on the test split: the best epoch by its train.select_by on "
    "the held-out part of its training split (selected_by: held-out ...), or its final epoch when nothing was held "
    "out (selected_by: final); it is the epoch of its checkpoint_best.pt. collapsed: why the selected epoch looks "
    "collapsed (one grade predicted for 95% of the test images or more, or accuracy below the majority baseline). "
    "QWK = quadratic weighted kappa; recall per grade 0..4 at the selected epoch; referable DR = grade >= 2 vs < 2 "
    "(sensitivity, specificity, ROC AUC). Accuracy is only meaningful above the majority baseline. selected_*_95ci: "
    "the selected epoch's accuracy, QWK and referable AUC with bootstrap 95% intervals (ci_resampled: patients when "
    "image names carry a patient id, else images). selected_ece: the selected epoch's expected calibration error of "
    "its top grade probability (0 = calibrated); ece_before_temperature: the same without its fitted temperature "
    "(train.calibration=temperature).")


def results_table(rows: list[dict]) -> Table:
    columns = [Column(key, heading or key, heading is not None) for key, heading in RESULT_COLUMNS]
    table = Table("results", "Results", RESULTS_NOTE, columns, csv_headings=True,
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
    table = Table("seeds", "Seeds", "Each arm's selected and final epochs: mean +- standard deviation over its seeds.",
                  columns, numeric=frozenset(key for key, _ in SEED_COLUMNS))
    for row in seeds:
        cells = [f"{row[m]['mean']:.3f}" + (f" +- {row[m]['sd']:.3f}" if row[m]["sd"] is not None else "")
                 for m, _ in SEED_COLUMNS]
        collapsed = f"{len(row['collapsed'])} (seed {', '.join(map(str, row['collapsed']))})" if row["collapsed"] else "0"
        table.rows.append(Row([row["arm"], ", ".join(map(str, row["seeds"])), collapsed, *cells]))
    return table


COMPARISONS_NOTE = (
    "A - B on the same test images, at each run's selected epoch (chosen on its held-out part, else its final epoch) "
    "and at its final epoch (predictions_final.csv). 95% intervals from a paired bootstrap (both runs scored on each "
    "resample); McNemar's exact test on the images one run graded right and the other wrong (one per seed pair). Arms "
    "with several seeds are compared seed by seed and averaged: the interval is the test set's uncertainty about that "
    "mean; the seeds' own spread is in the Seeds table. An interval that holds 0 means the test set cannot tell the "
    "two apart.")
EPOCH_TITLES = {"selected": "each run's selected epoch", "final": "each run's final epoch"}


def comparisons_table(comparisons: list[dict]) -> Table:
    columns = [Column("comparison", "comparison"), Column("a", "A"), Column("b", "B"), Column("images", "images"),
               *(Column(key, f"{label} A - B (95% CI)") for key, label in PAIR_METRICS),
               Column("counts", "only A right / only B right"), Column("p", "McNemar p")]
    table = Table("comparisons", "Paired comparisons (A - B on the same test images)", COMPARISONS_NOTE, columns,
                  numeric=frozenset([*(key for key, _ in PAIR_METRICS), "counts", "p"]))
    for epoch, title in EPOCH_TITLES.items():
        shown = [c for c in comparisons if c["epoch"] == epoch]
        if shown:
            table.rows.append(Row([f"at {title}"], "group"))
        for c in shown:
            start = [c["comparison"], c["a"], c["b"]]
            if c["status"] != "compared":
                table.rows.append(Row([*start, c["status"]], "notrun"))
                continue
            seeds = f", seeds {', '.join(map(str, c['seeds']))}" if len(c["seeds"]) > 1 else ""
            cells = [f"{c[m]['difference']:+.3f} ({c[m]['low']:+.3f} to {c[m]['high']:+.3f})" for m, _ in PAIR_METRICS]
            counts = ", ".join(f"{m['a_only_right']} / {m['b_only_right']}" for m in c["mcnemar"])
            p_values = ", ".join(f"{m['p_value']:.3g}" for m in c["mcnemar"])
            table.rows.append(Row([*start, f"{c['images']} ({c['resampled']}{seeds})", *cells, counts, p_values]))
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


def markdown(table: Table, level: int = 2) -> list[str]:
    """The table as markdown lines: its title, its note, every column."""
    width = len(table.columns)
    headings = [c.key if table.csv_headings else c.heading for c in table.columns]
    lines = [f"{'#' * level} {table.title}", "", table.note, "", "| " + " | ".join(headings) + " |", "|" + "---|" * width]
    for row in table.rows:
        if row.kind == "group":
            lines.append(f"| **{row.cells[0]}** |" + " |" * (width - 1))
        else:
            lines.append("| " + " | ".join(row.cells) + " |" + " |" * (width - len(row.cells)))
    return lines


def to_html(table: Table) -> str:
    """The table as an HTML section: its title, its note, the columns shown on the page."""
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
    return (f"<h2>{html.escape(table.title)}</h2><p class=\"note\">{html.escape(table.note)}</p>"
            f'<div class="wide"><table id="{table.id}"><tr>{head}</tr>{"".join(rows)}</table></div>')
