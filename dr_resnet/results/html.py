"""report.html: the report as one self-contained page (figures embedded as data URIs, no script or
style from the network), for a browser or an e-mail attachment. dr_resnet.report writes it beside
results.md from the same tables and figures."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from dr_resnet.results.arms import PAIR_METRICS, SEED_COLUMNS

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1, h2 { font-weight: 600; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.6em 0; }
.wide { overflow-x: auto; } td.nowrap { white-space: nowrap; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { color: #555; font-size: 0.9em; }
.notrun { color: #a40; }
"""

# Once loaded, the page notes how many of its figures the browser decoded (body data-figures-shown): a
# check for tests and for anyone who opens the page's source.
ON_LOAD = ("window.addEventListener('load', () => { document.body.dataset.figuresShown = "
           "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });")

# The results table's columns on the page: (column of results.csv, heading)
PAGE_COLUMNS = (("run", "run"), ("status", "status"), ("epochs", "epochs"), ("selected_by", "selected by"),
                ("selected_epoch", "epoch"), ("collapsed", "collapsed"), ("selected_acc_95ci", "accuracy (95% CI)"),
                ("selected_qwk_95ci", "QWK (95% CI)"), ("selected_auc_95ci", "referable AUC (95% CI)"),
                ("ci_resampled", "resampled"), ("selected_ece", "ECE"), ("majority_baseline", "majority baseline"),
                ("recall_at_selected", "recall per grade"), ("final_qwk", "final-epoch QWK"),
                ("train_minutes", "minutes"))


def _cell(value, nowrap: bool = False) -> str:
    if value is None or value == "":
        return "<td>-</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.3f}</td>'
    attribute = ' class="nowrap"' if nowrap else ""
    return f"<td{attribute}>{html.escape(str(value))}</td>"


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _results(table: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in PAGE_COLUMNS)
    rows = []
    for row in table:
        cls = ' class="notrun"' if str(row.get("status", "")).startswith(("not run", "failed")) else ""
        rows.append(f"<tr{cls}>" + "".join(_cell(row.get(k), nowrap=k.endswith(("95ci", "recall_at_selected")))
                                           for k, _ in PAGE_COLUMNS) + "</tr>")
    return f'<div class="wide"><table id="results"><tr>{head}</tr>{"".join(rows)}</table></div>'


def _comparisons(comparisons: list[dict]) -> str:
    head = ("<tr><th>comparison</th><th>A</th><th>B</th><th>images</th>"
            + "".join(f"<th>{html.escape(label)} A - B (95% CI)</th>" for _, label in PAIR_METRICS)
            + "<th>only A right / only B right</th><th>McNemar p</th></tr>")
    rows, epoch = [], None
    for c in comparisons:
        if c["epoch"] != epoch:
            epoch = c["epoch"]
            title = f"at each run's {html.escape(epoch)} epoch"
            rows.append(f'<tr class="group"><th colspan="{6 + len(PAIR_METRICS)}">{title}</th></tr>')
        start = f"<td>{html.escape(c['comparison'])}</td><td>{html.escape(c['a'])}</td><td>{html.escape(c['b'])}</td>"
        if c["status"] != "compared":
            span = 3 + len(PAIR_METRICS)
            rows.append(f'<tr class="notrun">{start}<td colspan="{span}">{html.escape(c["status"])}</td></tr>')
            continue
        cells = "".join(f'<td class="num">{c[m]["difference"]:+.3f} ({c[m]["low"]:+.3f} to {c[m]["high"]:+.3f})</td>'
                        for m, _ in PAIR_METRICS)
        counts = ", ".join(f"{m['a_only_right']} / {m['b_only_right']}" for m in c["mcnemar"])
        p_values = ", ".join(f"{m['p_value']:.3g}" for m in c["mcnemar"])
        seeds = f", seeds {', '.join(map(str, c['seeds']))}" if len(c["seeds"]) > 1 else ""
        rows.append(f"<tr>{start}<td>{c['images']} ({html.escape(c['resampled'])}{seeds})</td>{cells}"
                    f'<td class="num">{counts}</td><td class="num">{p_values}</td></tr>')
    return f'<table id="comparisons">{head}{"".join(rows)}</table>'


def _seeds(seeds: list[dict]) -> str:
    rows = []
    for row in seeds:
        cells = "".join(f'<td class="num">{row[m]["mean"]:.3f}' + (f" &plusmn; {row[m]['sd']:.3f}" if row[m]["sd"] is not None
                                                                  else "") + "</td>"
                        for m, _ in SEED_COLUMNS)
        collapsed = ", ".join(map(str, row["collapsed"])) or "none"
        rows.append(f"<tr><td>{html.escape(row['arm'])}</td><td>{', '.join(map(str, row['seeds']))}</td>"
                    f"<td>{collapsed}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in SEED_COLUMNS)
    return (f'<table id="seeds"><tr><th>arm</th><th>seeds</th><th>collapsed seeds</th>{head}</tr>'
            + "".join(rows) + "</table>")


def write_html(out: Path, title: str, table: list[dict], comparisons: list[dict], seeds: list[dict],
               figures: list[tuple[Path, str]]) -> Path:
    """out/report.html from the results table, the paired comparisons, the seed summary and (figure, caption)s."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             '<p class="note">Each run at its selected epoch (its train.select_by on the held-out part of its training '
             "split if it has one, else its final epoch; never chosen on test), with bootstrap 95% intervals. "
             "Collapsed: one grade predicted for 95% of the test images or more, or accuracy below the majority "
             "baseline. QWK: quadratic weighted kappa; referable DR: grade &ge; 2; "
             "ECE: expected calibration error of the top grade probability. Accuracy means something only above the "
             "majority baseline.</p>",
             "<h2>Results</h2>", _results(table)]
    if any(len(row["seeds"]) > 1 for row in seeds):
        parts += ["<h2>Seeds</h2>", '<p class="note">Mean &plusmn; standard deviation over each arm\'s seeds.</p>',
                  _seeds(seeds)]
    if comparisons:
        parts += ["<h2>Paired comparisons</h2>",
                  '<p class="note">A - B on the same test images, at each run\'s selected epoch and at its final '
                  "epoch, paired bootstrap 95% intervals (both runs scored on "
                  "each resample; arms with seeds averaged seed by seed) and McNemar's exact test. An interval that "
                  "holds 0: the test set cannot tell the two apart.</p>", _comparisons(comparisons)]
    parts += ["<h2>Figures</h2>"] + [_figure(path, caption) for path, caption in figures if path.is_file()]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{ON_LOAD}</script></body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
