"""Compare runs (see arms.py for what is compared): accuracy and QWK curves per depth (pretrained vs
scratch), confusion matrices side by side, calibration, and the results, seeds and comparison tables.
Works for any subset of runs; runs in progress are drawn up to their last epoch. Reads only the run
directories' own files (metrics.jsonl, config.yaml, predictions.csv), never W&B. Writes the figures,
results.md / results.csv, comparisons.json and report.html (all of it on one self-contained page).

    python -m dr_resnet.report RUNS_DIR [--out DIR] [--gallery]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

from dr_resnet.errors import run_command
from dr_resnet.results.arms import (
    COMPARED_EPOCHS,
    Arm,
    RunRecord,
    compare_arms,
    declare_families,
    find_runs,
    group_arms,
    seed_summary,
    smallest_detectable,
)
from dr_resnet.results.cache import CACHE_DIR, ResultsCache
from dr_resnet.results.factors import (
    FRACTION,
    convergence,
    declared_searched,
    differences,
    factor_keys,
    numeric,
    points,
    preferred,
    realised_shares,
)
from dr_resnet.results.html import write_html
from dr_resnet.results.plots import pyplot
from dr_resnet.results.rundir import BEST_CHECKPOINT, CONFIG_FILE, FINAL
from dr_resnet.results.tables import (
    COLUMNS,
    Table,
    comparisons_table,
    convergence_table,
    datasets_table,
    detectable_table,
    factor_scores_table,
    factor_table,
    markdown,
    operating_points_table,
    results_table,
    seeds_table,
    tuning_table,
)
from dr_resnet.results.tuning import (
    BAND_LABEL,
    DIVERGED,
    FAILED,
    FINISHED,
    curves_of,
    kind_of,
    ranking_note,
    read_choice,
)

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
# a depth's arms in order: pretrained first, so the core experiment is blue (pretrained) and orange (scratch)
COMPARISONS_FILE = "comparisons.json"
FIGURE_CAPTIONS = {"confusion_matrices.png": "confusion matrices at each run's selected epoch (row-normalised)",
                   "expected_best.png": "median best held-out score of k trials per arm, failures counted (after Dodge et al. "
                                        f"2019); band: {BAND_LABEL}; below, where a trial failed: the chance all k failed",
                   "calibration.png": "reliability diagram: top grade probability against the share graded right"}


def caption(figure: Path) -> str:
    if figure.name.startswith("accuracy_resnet"):
        return f"ResNet{figure.stem.removeprefix('accuracy_resnet')}: accuracy and QWK per epoch, per arm"
    if figure.name.startswith("factor_"):
        return (f"held-out QWK (what may choose) and test QWK (reported, not chosen on) at the selected epoch against "
                f"{figure.stem.removeprefix('factor_')}, per arm (mean, 95% CI over seeds)")
    if figure.name.startswith("slice_"):
        return (f"each tuning trial's held-out score against {figure.stem.removeprefix('slice_')}, per arm (failed and "
                f"diverged trials: crosses at the bottom; the winner ringed)")
    if figure.name.startswith("gallery_"):
        return f"{figure.stem.removeprefix('gallery_')}: test photos graded right and wrong, with Grad-CAM heat maps"
    return FIGURE_CAPTIONS.get(figure.name, figure.stem)
def plot_curves(arms: list[Arm], depth: int, path: Path) -> None:
    """Per arm of one depth: accuracy (train dashed, test solid, majority baseline dotted) and test QWK per
    epoch; an arm with several seeds as their mean with a band of +-1 standard deviation."""
    plt = pyplot()
    fig, (acc_ax, qwk_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    baselines = []
    for index, arm in enumerate(arms):
        group = arm.done
        if not group:
            continue
        colour, label = COLOURS[index % len(COLOURS)], arm.label
        epochs = list(range(1, min(len(r.rows) for r in group) + 1))
        curves = {k: np.array([[r.rows[e - 1].get(k, math.nan) for e in epochs] for r in group])
                  for k in ("train_acc", "test_acc", "test_qwk", "val_qwk")}
        if len(group) > 1:
            label = f"{label} (mean of {len(group)} seeds, band +-1 sd)"
            for ax, key, scale in ((acc_ax, "test_acc", 100), (qwk_ax, "test_qwk", 1)):
                mean, sd = curves[key].mean(axis=0), curves[key].std(axis=0, ddof=1)
                ax.fill_between(epochs, scale * (mean - sd), scale * (mean + sd), color=colour, alpha=0.2, lw=0)
        acc_ax.plot(epochs, 100 * curves["train_acc"].mean(axis=0), "--", color=colour, label=f"{label} train")
        acc_ax.plot(epochs, 100 * curves["test_acc"].mean(axis=0), "-o", ms=3, color=colour, label=f"{label} test")
        qwk_ax.plot(epochs, curves["test_qwk"].mean(axis=0), "-o", ms=3, color=colour, label=f"{label} test")
        if all(r.has_val for r in group):
            qwk_ax.plot(epochs, curves["val_qwk"].mean(axis=0), ":s", ms=3, color=colour, label=f"{label} held-out")
        baselines += [r.baseline for r in group]
    if baselines:
        acc_ax.axhline(100 * max(baselines), color="grey", ls=":", label=f"majority baseline ({100 * max(baselines):.1f}%)")
    acc_ax.set(title=f"ResNet{depth}: accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)")
    qwk_ax.set(title=f"ResNet{depth}: quadratic weighted kappa", xlabel="epoch", ylabel="QWK", ylim=(-0.05, 1.0))
    qwk_ax.axhline(0, color="grey", ls=":", label="chance (and always-grade-0)")
    not_run = sorted({f"{a.label}: {r.launch_status.split(':')[0]}" for a in arms for r in a.runs if r.launch_status})
    for ax in (acc_ax, qwk_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", title="\n".join(not_run) or None, title_fontsize=8)
        if not baselines:
            ax.text(0.5, 0.5, "\n".join(["no epoch finished yet", *not_run]), ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def legend_outside(ax, **kwargs) -> None:
    """The legend to the right of the axes, where it hides no point (the figure is saved with
    bbox_inches="tight" to keep it)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, **kwargs)


def below_the_scores(ax, rows: int) -> list[float]:
    """Room at the bottom of the axes for `rows` rows of "failed" markers, below every score drawn and
    without a tick (the axes fractions where they go): a failure has no score, so it is drawn at no fake one."""
    from matplotlib.patches import Rectangle  # matplotlib only where a figure is drawn (pyplot() chose its backend)

    share = 0.04 + 0.04 * rows
    low, high = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if low <= t <= high]
    ax.set_ylim(low - (high - low) * share / (1 - share), high)
    ax.set_yticks(ticks)
    ax.add_patch(Rectangle((0, 0), 1, share, transform=ax.transAxes, color="grey", alpha=0.12, lw=0))
    ax.text(-0.01, share / 2, "no score", transform=ax.transAxes, ha="right", va="center", fontsize=7, color="grey")
    return [0.025 + 0.04 * i for i in range(rows)]


def plot_expected_best(curves: dict[str, list[dict]], metric: str, path: Path, planned: dict[str, int] | None = None
                       ) -> None:
    """Per arm: the median best held-out score of k trials (failures counted, ranked lowest), with its band
    (the trials resampled), a cross at the bottom where the median is "failed"; below it, where any
    trial failed, the chance that all k trials failed."""
    plt = pyplot()
    failures = any(c["all_failed"] > 0 for curve in curves.values() for c in curve)
    fig, axes = plt.subplots(2 if failures else 1, 1, figsize=(7.5, 6.0 if failures else 4.4), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]} if failures else None)
    ax = axes[0, 0]
    bands = []
    for index, (arm, curve) in enumerate(curves.items()):
        k = np.array([c["k"] for c in curve])
        median, low, high = (np.array([math.nan if c[key] is None else c[key] for c in curve], dtype=float)
                             for key in ("median", "low", "high"))
        colour = COLOURS[index % len(COLOURS)]
        n = f"N={len(curve)}" if (planned or {}).get(arm, len(curve)) == len(curve) else \
            f"N={len(curve)} of {planned[arm]} planned: incomplete"
        ax.plot(k, median, "-o", ms=3, color=colour, label=f"{arm} ({n})")
        ax.plot(k, low, k, high, alpha=0)  # the axes' limits take in the band: it is filled below, once they are set
        bands.append((k, low, high, colour))
    failed = any(c["median"] is None or c["low"] is None for cs in curves.values() for c in cs)
    rows = below_the_scores(ax, len(curves)) if failed else []
    limits = ax.get_ylim()
    for k, low, high, colour in bands:  # a "failed" lower end reaches down to the failures
        ax.fill_between(k, np.where(np.isnan(low), limits[0], low), high, color=colour, alpha=0.15, lw=0)
    ax.set_ylim(*limits)
    for index, (arm, curve) in enumerate(curves.items()):
        failed = [c["k"] for c in curve if c["median"] is None]
        if failed and rows:
            ax.plot(failed, [rows[index]] * len(failed), "x", color=COLOURS[index % len(COLOURS)], clip_on=False,
                    transform=ax.get_xaxis_transform(), label=f"{arm}: median failed")
    ax.set(title="median best held-out score of k trials (failures counted)", ylabel=f"median best {metric}")
    ax.grid(alpha=0.3)
    legend_outside(ax, title=f"band: {BAND_LABEL}", title_fontsize=8)
    if failures:
        chance = axes[1, 0]
        for index, (arm, curve) in enumerate(curves.items()):
            chance.plot([c["k"] for c in curve], [100 * c["all_failed"] for c in curve], "-o", ms=3,
                        color=COLOURS[index % len(COLOURS)], label=arm)
        chance.set(ylabel="all k failed (%)", ylim=(-5, 105))
        chance.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("trials (k)")
    axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def searched_keys(choice: dict) -> list[str]:
    """The keys the trials' values name, in their first appearance's order."""
    return list(dict.fromkeys(k for entry in choice["arms"].values() for t in entry["trials"] for k in t["values"]))


def plot_slice(choice: dict, key: str, path: Path) -> None:
    """Per arm: each trial's held-out score against its value of `key` (a log axis where the values are
    positive numbers spanning 8x or more; categories side by side), the winner ringed, failed and diverged
    trials as crosses at the bottom (they have no score); trials to rerun are not drawn."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    arms = choice["arms"]
    values = [t["values"][key] for entry in arms.values() for t in entry["trials"] if key in t["values"]]
    as_number = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    categories = [] if as_number else sorted({str(v) for v in values})
    width = 0.6 / max(1, len(arms))

    def x_of(index: int, value: object) -> float:
        if as_number:
            return float(value)
        return categories.index(str(value)) + (index - (len(arms) - 1) / 2) * width

    failed: dict[int, list[float]] = {}
    for index, (arm, entry) in enumerate(arms.items()):
        colour = COLOURS[index % len(COLOURS)]
        trials = [t for t in entry["trials"] if key in t["values"]]
        scored = [t for t in trials if kind_of(t) == FINISHED]
        ax.plot([x_of(index, t["values"][key]) for t in scored], [t["held_out"] for t in scored], "o", ms=5,
                color=colour, alpha=0.8, label=f"{arm} ({len(scored)} of {entry['planned']} finished)")
        winner = entry.get("winner")
        if winner and key in winner["values"]:
            ax.plot([x_of(index, winner["values"][key])], [winner["held_out"]], "o", ms=12, mfc="none", mec=colour,
                    mew=1.5, label=f"{arm}: winner" + (" (tie: the first)" if winner.get("tie") else ""))
        failed[index] = [x_of(index, t["values"][key]) for t in trials if kind_of(t) in (FAILED, DIVERGED)]
    rows = below_the_scores(ax, len(arms)) if any(failed.values()) else []
    for index, xs in failed.items():
        if xs:
            ax.plot(xs, [rows[index]] * len(xs), "x", ms=7, mew=1.5, color=COLOURS[index % len(COLOURS)], clip_on=False,
                    transform=ax.get_xaxis_transform(), label=f"{list(arms)[index]}: failed or diverged ({len(xs)})")
    numbers = [float(v) for v in values] if as_number else []
    if numbers and min(numbers) > 0 and max(numbers) >= 8 * min(numbers):
        ax.set_xscale("log")
    if categories:
        ax.set_xticks(range(len(categories)), categories)
    metric = next((e["metric"] for e in arms.values() if e.get("metric")), "held-out score")
    ax.set(title=f"{metric} of each trial against {key}", xlabel=key, ylabel=metric)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_factor(key: str, held_out: dict[str, list[dict]], test: dict[str, list[dict]], path: Path,
                chosen: dict[str, str] | None = None, shares: dict[str, list[float]] | None = None,
                steps: str = "") -> None:
    """Per line (depth and initialisation) against one factor, held-out QWK first (what may choose) and test QWK
    beside it (reported, not chosen on): a curve for a numeric factor (a log axis where its values span 8x or
    more), bars for a categorical one; mean over seeds with its 95% interval. `chosen`: a searched key's value
    the held-out score prefers per line (ringed); `shares`: the realised share of training images per point
    (the x-axis of a learning curve over data.train_fraction); `steps`: what the schedule did at each fraction."""
    plt = pyplot()
    panels = [(held_out, "held-out QWK (what a choice may use)"), (test, "test QWK (reported, not chosen on)")]
    panels = [(lines, title) for lines, title in panels if lines]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.4, 4.4), squeeze=False)
    values = {str(e["value"]) for lines, _ in panels for entries in lines.values() for e in entries}
    as_curve = numeric(list(values))
    values = sorted(values, key=float) if as_curve else sorted(values)
    for ax, (lines, title) in zip(axes[0], panels):
        width = 0.8 / max(1, len(lines))
        for index, (line, entries) in enumerate(lines.items()):
            colour = COLOURS[index % len(COLOURS)]
            if as_curve:
                x = shares[line] if shares and line in shares else [float(e["value"]) for e in entries]
            else:
                x = [values.index(str(e["value"])) + (index - (len(lines) - 1) / 2) * width for e in entries]
            mean = np.array([e["mean"] for e in entries])
            errors = np.array([[e["mean"] - e["low"], e["high"] - e["mean"]] if e["low"] is not None else [0, 0]
                               for e in entries]).T
            label = f"{line} (n={max(e['n'] for e in entries)} seeds)"
            if as_curve:
                ax.errorbar(x, mean, yerr=errors, fmt="-o", ms=4, capsize=3, color=colour, label=label)
            else:
                ax.bar(x, mean, width, yerr=errors, capsize=3, color=colour, alpha=0.8, label=label)
            pick = [i for i, e in enumerate(entries) if chosen and str(e["value"]) == chosen.get(line)]
            if pick:
                ax.plot([x[i] for i in pick], [mean[i] for i in pick], "o", ms=13, mfc="none", mec=colour, mew=1.5,
                        label="ringed: the held-out score's choice" if ax is axes[0][-1] and index == 0 else None)
        if as_curve and 0 < float(values[0]) and float(values[-1]) >= 8 * float(values[0]):
            ax.set_xscale("log")
        if not as_curve:
            ax.set_xticks(range(len(values)), values)
        xlabel = key
        if shares:
            xlabel = f"share of training images used (realised; {key} sets patients)"
        ax.set(title=title, xlabel=xlabel, ylabel="QWK at the selected epoch")
        ax.grid(alpha=0.3)
    note = f"; steps at each fraction: {steps}" if steps else ""
    fig.suptitle(f"along {key}{note}", fontsize=10)
    legend_outside(axes[0][-1])
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def factor_tables(arms: list[Arm], comparisons: list[dict], families: list[dict], out: Path,
                  searched: set[str] = frozenset()) -> tuple[list[Table], list[Path]]:
    """Per factor (a key that tells arms of one depth and initialisation apart): its figure (held-out first),
    the scores at each value (a searched key's held-out choice marked) and the table of paired differences at
    each value; and the convergence table where runs held images out."""
    tables, written = [], []
    for key in factor_keys(arms):
        test, held_out = points(arms, key), points(arms, key, "val_qwk")
        if not test:
            continue
        chosen = preferred(held_out) if key in searched else None
        shares = realised_shares(test) if key == FRACTION else None
        steps = ", ".join(sorted({str(r.settings.get("train.steps_at_fraction")) for a in arms for r in a.finished
                                  if key in a.factors})) if key == FRACTION else ""
        path = out / f"factor_{key.replace('.', '_')}.png"
        plot_factor(key, held_out, test, path, chosen, shares, steps)
        written.append(path)
        tables.append(factor_scores_table(key, held_out, test, chosen, key in searched, shares))
        rows = differences(comparisons, key, families)
        if rows:
            tables.append(factor_table(key, rows))
    reached = convergence(arms)
    if reached:
        tables.append(convergence_table(reached))
    return tables, written


def tuning_tables(root: Path, out: Path) -> tuple[list[Table], list[Path]]:
    """--tune's section: each arm's trials, winner and best-of-k curve (a table, expected_best.png and a
    slice_<key>.png per searched key)."""
    choice = read_choice(root)
    if choice is None:
        return [], []
    curves = curves_of(choice)
    written = []
    if curves:
        metric = next((e["metric"] for e in choice["arms"].values() if e.get("metric")), "score")
        plot_expected_best(curves, metric, out / "expected_best.png",
                           {arm: entry["planned"] for arm, entry in choice["arms"].items()})
        written.append(out / "expected_best.png")
    for key in searched_keys(choice):
        path = out / f"slice_{key.replace('.', '_')}.png"
        plot_slice(choice, key, path)
        written.append(path)
    return [tuning_table(choice, curves, ranking_note(curves))], written


def plot_calibration(runs: list[RunRecord], path: Path) -> bool:
    """Reliability diagram: per run with grade probabilities in its predictions.csv, the accuracy of its
    images binned by their top probability against that probability (the diagonal is perfect
    calibration), with its expected calibration error. False (nothing drawn) when no run has any."""
    shown = [(r, r.calibration()) for r in runs if r.rows]
    shown = [(r, c) for r, c in shown if c is not None]
    if not shown:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.2))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfectly calibrated")
    for run, calibration in shown:
        points = calibration["bins"]
        before = run.chosen().get("test_ece_before")
        extra = f", {before:.3f} before temperature scaling" if before is not None else ""
        ax.plot([b["confidence"] for b in points], [b["accuracy"] for b in points], "-o", ms=3,
                label=f"{run.name}: ECE {calibration['ece']:.3f}{extra}")
    ax.set(title="Reliability at each run's selected epoch (test)", xlabel="top grade probability (binned)",
           ylabel="share graded right", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_confusion_matrices(runs: list[RunRecord], path: Path) -> None:
    """Each run's confusion matrix at its selected epoch (its train.select_by on the held-out set if it
    has one, else its final epoch: the epoch of its checkpoint_best.pt), row-normalised, two to a row."""
    from dr_resnet.results.plots import draw_confusion_matrix

    plt = pyplot()
    shown = [r for r in runs if r.rows]
    cols = min(2, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.6 * cols, 5.4 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, run in zip(axes.flat, shown):
        best = run.chosen()
        image = draw_confusion_matrix(ax, np.array(best["confusion_matrix"]),
                                      f"{run.arm} ({run.name})\nepoch {best['epoch']} "
                                      f"({f'best held-out {run.select_by}' if run.has_val else 'final'}), test: "
                                      f"accuracy {best['test_acc']:.1%}, QWK {best['test_qwk']:.3f}"
                                      + (" - COLLAPSED" if run.collapsed else ""))
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="share of the true grade's images")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def result_rows(runs: list[RunRecord]) -> list[dict]:
    """One row per run at its selected epoch (and its final epoch): nothing here is chosen on test."""
    table = []
    for run in runs:
        row = {"run": run.name, "depth": run.depth, "weights": run.weights, "epochs": f"{len(run.rows)}/{run.epochs_planned}"}
        if run.launch_status and (run.launch_status.startswith("not run") or not run.rows):
            table.append({**row, "status": run.launch_status})
            continue
        if not run.rows:
            table.append({**row, "status": f"failed: {run.failure}" if run.failure else "no epoch yet"})
            continue
        chosen, final = run.chosen(), run.rows[-1]
        progress = "done" if len(run.rows) >= run.epochs_planned else "in progress"
        how = f"held-out {run.select_by}" if run.has_val else FINAL
        status = run.launch_status or (f"failed: {run.failure}" if run.failure else progress)
        if run.predictions_problem:
            status += f"; predictions not used: {run.predictions_problem}"
        table.append({**row, "status": status, "selected_by": how, "selected_epoch": chosen["epoch"],
                      "held_out_qwk": chosen.get("val_qwk") if run.has_val else None,
                      "collapsed": run.collapsed or "no", "selected_test_acc": chosen["test_acc"],
                      "selected_qwk": chosen["test_qwk"], "selected_ece": chosen.get("test_ece"),
                      "ece_before_temperature": chosen.get("test_ece_before"),
                      "recall_at_selected": " ".join(f"{r:.2f}" for r in chosen["test_recall"]),
                      "referable_sens_at_selected": chosen.get("test_referable_sensitivity"),
                      "referable_spec_at_selected": chosen.get("test_referable_specificity"),
                      "final_test_acc": final["test_acc"], "final_qwk": final["test_qwk"], "majority_baseline": run.baseline,
                      "patients_in_train_and_test": run.summary.get("patients_in_train_and_test"),
                      "skipped_images": len(run.summary["skipped_images"]) if "skipped_images" in run.summary else None,
                      "final_qwk_95ci": (_with_interval(run.summary["final_intervals"]["qwk"])
                                         if "final_intervals" in run.summary and run.has_predictions("final") else None),
                      "train_minutes": sum(r["epoch_seconds"] for r in run.rows) / 60})
        intervals = run.intervals()
        if intervals:
            table[-1].update({f"selected_{short}_95ci": _with_interval(intervals[name])
                              for short, name in (("acc", "accuracy"), ("qwk", "qwk"), ("auc", "referable_auc"))},  # COLUMNS
                             ci_resampled=intervals["unit"])
    return table


def _with_interval(entry: dict) -> str:
    return f"{entry['value']:.3f} ({entry['low']:.3f}-{entry['high']:.3f})"


def dataset_rows(runs: list[RunRecord], rows: list[dict]) -> list[dict]:
    """For each run that evaluate scored on other datasets or splits: its own test split at the selected
    epoch, then each evaluation, with the same metrics and intervals."""
    own = {row["run"]: row for row in rows}
    table = []
    for run in runs:
        evaluations = run.evaluations()
        if not evaluations:
            continue
        row, chosen = own[run.name], run.chosen()
        if chosen is not None:
            table.append({"run": run.name, "dataset": Path(str(run.settings["data.root"])).name,
                          "split": f"{run.settings.get('data.test_split', 'test')} (its own)",
                          "images": int(np.sum(chosen["confusion_matrix"])), "epoch": chosen["epoch"],
                          "accuracy": row.get("selected_acc_95ci", chosen["test_acc"]),
                          "qwk": row.get("selected_qwk_95ci", chosen["test_qwk"]),
                          "referable_auc": row.get("selected_auc_95ci"),
                          "sensitivity": chosen.get("test_referable_sensitivity"),
                          "specificity": chosen.get("test_referable_specificity"), "majority_baseline": run.baseline})
        for found in evaluations:
            ci = found.get("intervals") or {}
            shown = {name: _with_interval(ci[name]) if name in ci else found.get(name)
                     for name in ("accuracy", "qwk", "referable_auc")}
            table.append({"run": run.name, "dataset": found.get("dataset", Path(found["data_root"]).name),
                          "split": found["split"], "images": found.get("num_samples"), "epoch": found["epoch"], **shown,
                          "sensitivity": found.get("referable_sensitivity"),
                          "specificity": found.get("referable_specificity"),
                          "majority_baseline": found.get("majority_baseline")})
    return table


def operating_rows(runs: list[RunRecord]) -> list[dict]:
    """Each run's referable-DR operating points (summary.json's, fitted on its held-out part)."""
    return [{"run": run.name, "points": run.summary["operating_points"]} for run in runs
            if run.summary.get("operating_points") and not run.predictions_problem]


def tables_of(rows: list[dict], comparisons: list[dict], seeds: list[dict], datasets: list[dict] = (),
              operating: list[dict] = (), families: list[dict] = ()) -> list[Table]:
    """The report's tables, the same for results.md and report.html: results; referable DR at screening
    operating points when a run has them; seeds when an arm has several; the paired comparisons when there
    are any; other datasets when evaluate scored a run on any."""
    tables = [results_table(rows)]
    if operating:
        tables.append(operating_points_table(operating))
    if any(len(row["seeds"]) + row["unfinished"] > 1 for row in seeds):
        tables.append(seeds_table(seeds))
    if comparisons:
        tables.append(comparisons_table(comparisons, families))
        detectable = smallest_detectable(comparisons)
        if detectable:
            tables.append(detectable_table(detectable))
    if datasets:
        tables.append(datasets_table(datasets))
    return tables


def write_tables(rows: list[dict], out: Path, tables: list[Table], comparisons: list[dict] = (),
                 families: list[dict] = ()) -> None:
    """results.csv (every value, unformatted), results.md (the tables) and comparisons.json (the declared
    families and every comparison)."""
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
    lines = []
    for table in tables:
        lines += (["" ] if lines else []) + markdown(table, level=1 if table.id == "results" else 2)
    if comparisons:
        found = {"families": list(families), "comparisons": comparisons}
        (out / COMPARISONS_FILE).write_text(json.dumps(found, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def galleries(runs: list[RunRecord], out: Path, per_cell: int = 2) -> list[Path]:
    """Per run with a checkpoint_best.pt: test photos per grade, graded right and wrong, with their heat maps."""
    from dr_resnet.serving.gallery import save_gallery  # torch: only when asked for

    written = []
    for run in runs:
        best = run.path / BEST_CHECKPOINT
        if not best.is_file():
            continue
        cfg = yaml.safe_load((run.path / CONFIG_FILE).read_text())
        path = out / f"gallery_{run.name}.png"
        save_gallery(best, cfg["data"]["root"], cfg["data"].get("test_split", "test"), path,
                     f"{run.name}: {cfg['data'].get('test_split', 'test')} photos graded right and wrong, with Grad-CAM "
                     f"heat maps (predicted grade)", per_cell)
        written.append(path)
    return written


def report(root: str | Path, out: str | Path | None = None, gallery: bool = False) -> list[Path]:
    """Write the figures and tables for every run under root (and with gallery, each run's gallery of
    heat maps); returns the files written."""
    root = Path(root)
    out = Path(out) if out else root
    cache = ResultsCache(out / CACHE_DIR)
    runs = find_runs(root, cache)
    if not runs:
        raise FileNotFoundError(f"no run directories (with config.yaml) under {root}")
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:  # one line each, also in the results table's status
        if run.predictions_problem:
            print(f"{run.name}: predictions not used: {run.predictions_problem}", file=sys.stderr)
    written = []
    arms = group_arms(runs)
    for depth in sorted({a.depth for a in arms}):
        path = out / f"accuracy_resnet{depth}.png"
        plot_curves([a for a in arms if a.depth == depth], depth, path)
        written.append(path)
    if any(r.rows for r in runs):
        plot_confusion_matrices(runs, out / "confusion_matrices.png")
        written.append(out / "confusion_matrices.png")
    if plot_calibration(runs, out / "calibration.png"):
        written.append(out / "calibration.png")
    comparisons = [c for epoch in COMPARED_EPOCHS for c in compare_arms(arms, epoch=epoch)]
    families = declare_families(comparisons)
    for warning in dict.fromkeys(f"{c['comparison']}: {c['warning']}" for c in comparisons if c.get("warning")):
        print(f"warning: {warning}", file=sys.stderr)
    rows = result_rows(runs)
    tables = tables_of(rows, comparisons, seed_summary(arms), dataset_rows(runs, rows), operating_rows(runs), families)
    more, figures = factor_tables(arms, comparisons, families, out, declared_searched(root))
    tuned, tuning_figures = tuning_tables(root, out)
    tables += more + tuned
    written += figures + tuning_figures
    write_tables(rows, out, tables, comparisons, families)
    if comparisons:
        written.append(out / COMPARISONS_FILE)
    if gallery:
        written += galleries(runs, out)
    figures = [(p, caption(p)) for p in [*(w for w in written if w.suffix == ".png" and not w.name.startswith("gallery_")),
                                         *sorted(out.glob("gallery_*.png"))]]  # a gallery drawn earlier is shown too
    page = write_html(out, f"dr-resnet report: {root.resolve().name}", tables, figures)
    print(cache.describe(), file=sys.stderr)
    return written + [out / "results.md", out / "results.csv", page]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dr_resnet.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", help="a run directory, or a folder of them (e.g. a sweep folder)")
    p.add_argument("--out", help="output folder (default: runs_dir)")
    p.add_argument("--gallery", action="store_true",
                   help="also draw, per run, test photos graded right and wrong with their Grad-CAM heat maps")
    args = p.parse_args(argv)

    def work() -> None:
        written = report(args.runs_dir, args.out, args.gallery)
        print("wrote " + ", ".join(str(p) for p in written))
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
