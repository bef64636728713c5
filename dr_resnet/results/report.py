"""Compare runs (see arms.py for what is compared): accuracy and QWK curves per depth (an arm per
initialisation), confusion matrices side by side, calibration, and the results, seeds and comparison tables.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from dr_resnet.errors import run_command
from dr_resnet.results.answer import (
    Headline,
    answer_rows,
    compared_arms,
    curve_ends,
    curve_keys,
    fold_curves,
    fold_question,
    headline,
    question,
    weigh,
)
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
    line_of,
    numeric,
    points,
    realised_shares,
)
from dr_resnet.results.html import write_html
from dr_resnet.results.metrics import pooled_calibration
from dr_resnet.results.plots import (
    COLOURS,
    INITIALISATION_COLOURS,
    colour_bar,
    colour_scale,
    draw_confusion_matrix,
    grid_shape,
    line_colours,
    new_figure,
    save,
    wrapped,
)
from dr_resnet.results.rundir import BEST_CHECKPOINT, CONFIG_FILE, FINAL, missing_checkpoint, pruned_note
from dr_resnet.results.tables import (
    COLUMNS,
    Table,
    answer_table,
    backbones_table,
    comparisons_table,
    convergence_table,
    datasets_table,
    detectable_table,
    factor_scores_table,
    factor_table,
    markdown,
    operating_points_table,
    question_table,
    results_table,
    seeds_table,
    tuning_table,
    weigh_table,
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

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COMPARISONS_FILE = "comparisons.json"
FIGURE_CAPTIONS = {"confusion_matrices.png": "confusion matrices of the answer's arms (each at its chosen setting) at "
                                              "each run's selected epoch, its seeds pooled "
                                              "(counts summed, then row-normalised; each run's own: confusion_matrix.png "
                                              "in its folder)",
                   "expected_best.png": "median best held-out score of k trials per arm, failures counted (after Dodge et al. "
                                        f"2019); band: {BAND_LABEL}; below, where a trial failed: the chance all k failed",
                   "calibration.png": "reliability diagram per arm of the answer, its seeds pooled: top grade probability "
                                      "against the share graded right"}


def caption(figure: Path) -> str:
    if figure.name.startswith("accuracy_resnet"):
        return (f"ResNet{figure.stem.removeprefix('accuracy_resnet')}: accuracy and QWK per epoch, per arm (mean over "
                f"seeds, band +-1 sd)")
    if figure.name.startswith("factor_"):
        return (f"held-out QWK (what may choose) and test QWK (reported, not chosen on) at the selected epoch against "
                f"{figure.stem.removeprefix('factor_')}, per arm (mean, 95% CI over seeds)")
    if figure.name.startswith("slice_"):
        return (f"each tuning trial's held-out score against {figure.stem.removeprefix('slice_')}, per arm (failed and "
                f"diverged trials: crosses at the bottom; the winner ringed)")
    if figure.name.startswith("gallery_"):
        return f"{figure.stem.removeprefix('gallery_')}: test photos graded right and wrong, with Grad-CAM heat maps"
    return FIGURE_CAPTIONS.get(figure.name, figure.stem)


@dataclass
class Panels:
    """How a figure of arms is laid out: panels (a title and the arms drawn in it) and each arm's colour. A
    few arms share one panel, a colour each. More share a panel per depth and initialisation: along a numeric
    factor (a learning rate, a data fraction, train.length) coloured by a colour map over it (`key`, `scale`),
    else a colour per combination of the other factors, the same in every panel (`legend`)."""

    groups: list[tuple[str, list[Arm]]]
    colours: dict[str, object]  # arm name -> colour
    key: str | None = None
    scale: object = None  # plots.colour_scale over the key's values
    legend: dict[str, object] = field(default_factory=dict)  # the factors' combination -> its colour

    def colour_key(self, fig, axes) -> None:
        if self.key:
            colour_bar(fig, self.scale, axes, self.key,
                       [float(a.factors[self.key]) for _, members in self.groups for a in members])


def continuous_key(arms: list[Arm]) -> str | None:
    """The numeric factor with the most values among the arms (None: no factor is a number)."""
    found = []
    for key in sorted({k for a in arms for k in a.factors}):
        values = {str(a.factors.get(key)) for a in arms}
        if len(values) > 1 and numeric(list(values)):
            found.append((-len(values), key))
    return min(found)[1] if found else None


def arrange(arms: list[Arm], title=lambda arm: arm.name, together: int = len(COLOURS)) -> Panels:
    """The panels for `arms` (see Panels): up to `together` arms without a numeric factor in one panel;
    `title` names a panel from an arm with the factors it does not tell apart."""
    key = continuous_key(arms)
    if key is None and len(arms) <= together:
        return Panels([("", arms)], few_colours(arms))
    groups: dict[str, list[Arm]] = {}
    for arm in arms:
        rest = {k: v for k, v in arm.factors.items() if k != key} if key else {}
        groups.setdefault(title(Arm(arm.depth, arm.initialisation, rest, arm.runs)), []).append(arm)
    if key:
        for members in groups.values():
            members.sort(key=lambda a: float(a.factors[key]))
        scale = colour_scale([float(a.factors[key]) for a in arms])
        return Panels(list(groups.items()), {a.name: scale.to_rgba(float(a.factors[key])) for a in arms}, key, scale)
    combinations = list(dict.fromkeys(combination(a) for a in arms))
    legend = dict(zip(combinations, line_colours(len(combinations))))
    return Panels(list(groups.items()), {a.name: legend[combination(a)] for a in arms}, legend=legend)


def few_colours(arms: list[Arm]) -> dict[str, object]:
    """A colour per arm of a few in one panel: its initialisation's (plots.INITIALISATION_COLOURS) where each
    arm is another initialisation, the same in every figure; else (two depths, or factors) one each in turn."""
    inits = [a.initialisation for a in arms]
    if len(set(inits)) == len(inits) and all(i in INITIALISATION_COLOURS for i in inits):
        return {a.name: INITIALISATION_COLOURS[a.initialisation] for a in arms}
    return {a.name: COLOURS[i] for i, a in enumerate(arms)}


def combination(arm: Arm) -> str:
    """The arm's factors (beyond depth and initialisation), as a legend names them."""
    return ", ".join(f"{k}={v}" for k, v in arm.factors.items()) or arm.name


def seeds_note(arms: list[Arm], key: str | None) -> str:
    """How many seeds a panel's lines are the mean of."""
    counts = sorted({len(a.done) for a in arms})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    seeds = "1 seed" if seeds == "1" else f"mean of {seeds} seeds, band +-1 sd"
    return f"{len(arms)} values of {key}, {seeds} each" if key else seeds


def not_run_note(arms: list[Arm]) -> str:
    """The arms' runs the launcher could not run or that failed, named (a few) or counted."""
    found = sorted({f"{a.label}: {r.launch_status.split(':')[0]}" for a in arms for r in a.runs if r.launch_status})
    if len(found) > 4:
        return f"{len(found)} arms with runs not run or failed (see the results table)"
    return "\n".join(found)


def plot_curves(arms: list[Arm], depth: int, path: Path) -> Figure:
    """Per arm of one depth: accuracy (train dashed, test solid) and QWK (test solid, held-out dotted) per
    epoch, each arm's seeds as their mean with a band of +-1 standard deviation, the majority baseline and
    chance dash-dotted; laid out by `arrange` (a colour map along a numeric factor, a pair of panels per
    initialisation), the key outside the axes. Returns the figure (saved to `path`)."""
    layout = arrange(arms, lambda a: a.label)
    groups = layout.groups
    per_row = 1 if len(groups) <= 3 else 2
    rows = math.ceil(len(groups) / per_row)
    fig = new_figure((9.6 if per_row == 1 else 8.2) * per_row + (1.3 if layout.key else 0), 3.3 * rows + 1.3)
    axes = fig.subplots(rows, 2 * per_row, squeeze=False)
    baselines, with_val = [], False
    for index, (title, members) in enumerate(groups):
        acc_ax, qwk_ax = axes[index // per_row, 2 * (index % per_row):2 * (index % per_row) + 2]
        drawn = [a for a in members if a.done]
        markers = "o" if len(members) <= 4 else ""
        for arm in drawn:
            colour, group = layout.colours[arm.name], arm.done
            epochs = list(range(1, min(len(r.rows) for r in group) + 1))
            curves = {k: np.array([[r.rows[e - 1].get(k, math.nan) for e in epochs] for r in group])
                      for k in ("train_acc", "test_acc", "test_qwk", "val_qwk")}
            if len(group) > 1:
                for ax, key, scale in ((acc_ax, "test_acc", 100), (qwk_ax, "test_qwk", 1)):
                    mean, sd = curves[key].mean(axis=0), curves[key].std(axis=0, ddof=1)
                    ax.fill_between(epochs, scale * (mean - sd), scale * (mean + sd), color=colour, lw=0,
                                    alpha=0.2 if len(members) <= 4 else 0.08)
            acc_ax.plot(epochs, 100 * curves["train_acc"].mean(axis=0), "--", color=colour, lw=1)
            acc_ax.plot(epochs, 100 * curves["test_acc"].mean(axis=0), "-", marker=markers, ms=3, color=colour)
            qwk_ax.plot(epochs, curves["test_qwk"].mean(axis=0), "-", marker=markers, ms=3, color=colour)
            if all(r.has_val for r in group):
                with_val = True
                qwk_ax.plot(epochs, curves["val_qwk"].mean(axis=0), ":", marker="s" if markers else "", ms=3,
                            color=colour)
        baseline = [r.baseline for a in drawn for r in a.done]
        if baseline:
            baselines.append(max(baseline))
            acc_ax.axhline(100 * max(baseline), color="grey", ls="-.", lw=1)
        qwk_ax.axhline(0, color="grey", ls="-.", lw=1)
        note = seeds_note(drawn, layout.key) if drawn and (title or layout.key) else ""
        head = f"{title}: " if title else ""
        acc_ax.set_title(f"{head}accuracy" + (f"\n{note}" if note else ""), fontsize=9)
        qwk_ax.set_title(f"{head}quadratic weighted kappa" + (f"\n{note}" if note else ""), fontsize=9)
        acc_ax.set(xlabel="epoch", ylabel="accuracy (%)")
        qwk_ax.set(xlabel="epoch", ylabel="QWK", ylim=(-0.05, 1.0))
        for ax in (acc_ax, qwk_ax):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if not drawn:
                ax.text(0.5, 0.5, "no epoch finished yet", ha="center", va="center", transform=ax.transAxes,
                        color="grey")
    for ax in list(axes.flat)[2 * len(groups):]:
        ax.set_visible(False)
    shown = [ax for ax in axes.flat if ax.get_visible()]
    accuracy_axes = shown[0::2]
    low = min(ax.get_ylim()[0] for ax in accuracy_axes)
    high = max(ax.get_ylim()[1] for ax in accuracy_axes)
    for ax in accuracy_axes:
        ax.set_ylim(low, high)
    fig.suptitle(f"ResNet{depth}: accuracy and quadratic weighted kappa per epoch", fontsize=11)
    layout.colour_key(fig, shown)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, lw=2, label=label) for label, colour in layout.legend.items()]
    if not layout.key and len(groups) == 1:  # a few arms in one pair of panels: a colour each
        handles += [Line2D([], [], color=layout.colours[a.name], lw=2,
                           label=f"{a.label} ({seeds_note([a], None)})" if a.done else f"{a.label} (no epoch yet)")
                    for a in groups[0][1]]
    handles += [Line2D([], [], color="black", ls="--", lw=1, label="train"),
                Line2D([], [], color="black", ls="-", label="test")]
    if with_val:
        handles.append(Line2D([], [], color="black", ls=":", label="held-out (what chooses the epoch)"))
    baseline = (f"majority baseline ({100 * baselines[0]:.1f}%)" if len(set(baselines)) == 1 else
                "majority baseline (each panel's)") if baselines else ""
    handles.append(Line2D([], [], color="grey", ls="-.", lw=1,
                          label=f"{baseline + ' on accuracy; ' if baseline else ''}chance (and always grade 0) on QWK"))
    note = not_run_note(arms)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=8,
               title=note or None, title_fontsize=8)
    save(fig, path)
    return fig


def legend_outside(ax, **kwargs) -> None:
    """The legend to the right of the axes, where it hides no point (the figure is saved cropped to what is
    drawn, so it is kept), in columns of at most 20 entries."""
    entries = len(ax.get_legend_handles_labels()[0])
    if entries:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  ncols=math.ceil(entries / 20), **kwargs)


def below_the_scores(ax, rows: int) -> list[float]:
    """Room at the bottom of the axes for `rows` rows of "failed" markers, below every score drawn and
    without a tick (the axes fractions where they go): a failure has no score, so it is drawn at no fake one."""
    from matplotlib.patches import Rectangle  # matplotlib only where a figure is drawn

    share = 0.04 + 0.04 * rows
    low, high = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if low <= t <= high]
    ax.set_ylim(low - (high - low) * share / (1 - share), high)
    ax.set_yticks(ticks)
    ax.add_patch(Rectangle((0, 0), 1, share, transform=ax.transAxes, color="grey", alpha=0.12, lw=0))
    ax.text(-0.01, share / 2, "no score", transform=ax.transAxes, ha="right", va="center", fontsize=7, color="grey")
    return [0.025 + 0.04 * i for i in range(rows)]


def plot_expected_best(curves: dict[str, list[dict]], metric: str, path: Path,
                       planned: dict[str, int] | None = None) -> Figure:
    """Per arm: the median best held-out score of k trials (failures counted, ranked lowest), with its band
    (the trials resampled), a cross at the bottom where the median is "failed"; below it, where any
    trial failed, the chance that all k trials failed. Returns the figure (saved to `path`)."""
    failures = any(c["all_failed"] > 0 for curve in curves.values() for c in curve)
    fig = new_figure(7.5, 6.0 if failures else 4.4)
    axes = fig.subplots(2 if failures else 1, 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [3, 1]} if failures else None)
    ax = axes[0, 0]
    bands = []
    colours = line_colours(len(curves))
    for index, (arm, curve) in enumerate(curves.items()):
        k = np.array([c["k"] for c in curve])
        median, low, high = (np.array([math.nan if c[key] is None else c[key] for c in curve], dtype=float)
                             for key in ("median", "low", "high"))
        colour = colours[index]
        n = f"N={len(curve)}" if (planned or {}).get(arm, len(curve)) == len(curve) else \
            f"N={len(curve)} of {planned[arm]} planned: incomplete"
        ax.plot(k, median, "-o", ms=3, color=colour, label=f"{arm} ({n})")
        ax.plot(k, low, k, high, alpha=0)  # the axes' limits take in the band: it is filled below, once they are set
        bands.append((k, low, high, colour))
    failed = any(c["median"] is None or c["low"] is None for cs in curves.values() for c in cs)
    rows = below_the_scores(ax, len(curves)) if failed else []
    limits = ax.get_ylim()
    for k, low, high, colour in bands:  # a "failed" lower end reaches down to the failures
        ax.fill_between(k, np.where(np.isnan(low), limits[0], low), high, color=colour, lw=0,
                        alpha=0.15 if len(bands) <= 4 else 0.06)
    ax.set_ylim(*limits)
    for index, (arm, curve) in enumerate(curves.items()):
        failed = [c["k"] for c in curve if c["median"] is None]
        if failed and rows:
            ax.plot(failed, [rows[index]] * len(failed), "x", color=colours[index], clip_on=False,
                    transform=ax.get_xaxis_transform(), label=f"{arm}: median failed")
    ax.set(title="median best held-out score of k trials (failures counted)", ylabel=f"median best {metric}")
    ax.grid(alpha=0.3)
    legend_outside(ax, title=f"band: {BAND_LABEL}", title_fontsize=8)
    if failures:
        chance = axes[1, 0]
        for index, (arm, curve) in enumerate(curves.items()):
            chance.plot([c["k"] for c in curve], [100 * c["all_failed"] for c in curve], "-o", ms=3,
                        color=colours[index], label=arm)
        chance.set(ylabel="all k failed (%)", ylim=(-5, 105))
        chance.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("trials (k)")
    axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
    save(fig, path)
    return fig


def searched_keys(choice: dict) -> list[str]:
    """The keys the trials' values name, in their first appearance's order."""
    return list(dict.fromkeys(k for entry in choice["arms"].values() for t in entry["trials"] for k in t["values"]))


def plot_slice(choice: dict, key: str, path: Path) -> Figure:
    """Per arm: each trial's held-out score against its value of `key` (a log axis where the values are
    positive numbers spanning 8x or more; categories side by side), the winner ringed, failed and diverged
    trials as crosses at the bottom (they have no score); trials to rerun are not drawn. Returns the figure
    (saved to `path`)."""
    fig = new_figure(7.5, 4.4)
    ax = fig.subplots()
    arms = choice["arms"]
    colours = line_colours(len(arms))
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
        colour = colours[index]
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
            ax.plot(xs, [rows[index]] * len(xs), "x", ms=7, mew=1.5, color=colours[index], clip_on=False,
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
    save(fig, path)
    return fig


def plot_factor(key: str, held_out: dict[str, list[dict]], test: dict[str, list[dict]], path: Path,
                chosen: dict[str, str] | None = None, shares: dict[str, list[float]] | None = None,
                steps: str = "") -> Figure:
    """Per line (depth and initialisation) against one factor, held-out QWK first (what may choose) and test QWK
    beside it (reported, not chosen on): a curve for a numeric factor (a log axis where its values span 8x or
    more), bars for a categorical one; mean over seeds with its 95% interval. `chosen`: a searched key's value
    the held-out score prefers per line (ringed); `shares`: the realised share of training images per point
    (the x-axis of a learning curve over data.train_fraction); `steps`: what the schedule did at each fraction.
    Returns the figure (saved to `path`)."""
    panels = [(held_out, "held-out QWK (what a choice may use)"), (test, "test QWK (reported, not chosen on)")]
    panels = [(lines, title) for lines, title in panels if lines]
    fig = new_figure(5.2 * len(panels) + 2.4, 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False)
    values = {str(e["value"]) for lines, _ in panels for entries in lines.values() for e in entries}
    as_curve = numeric(list(values))
    values = sorted(values, key=float) if as_curve else sorted(values)
    for ax, (lines, title) in zip(axes[0], panels):
        width = 0.8 / max(1, len(lines))
        colours = line_colours(len(lines))
        for index, (line, entries) in enumerate(lines.items()):
            colour = colours[index]
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
    save(fig, path)
    return fig


def factor_tables(arms: list[Arm], comparisons: list[dict], families: list[dict], out: Path,
                  heads: list[Headline] = (), searched: set[str] = frozenset()) -> tuple[list[Table], list[Path]]:
    """Per factor (a key that tells arms of one depth and initialisation apart): its figure (held-out first),
    the scores at each value (a searched key's held-out choice marked) and the table of paired differences at
    each value; and the convergence table where runs held images out."""
    tables, written = [], []
    for key in factor_keys(arms):
        test, held_out = points(arms, key), points(arms, key, "val_qwk")
        if not test:
            continue
        chosen = {line_of(c, key): str(c.factors[key]) for h in heads if h.arm for c in h.candidates
                  if c.runs is h.arm.runs and key in c.factors and key not in h.arm.factors} or None
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


def plot_calibration(arms: list[Arm], path: Path) -> Figure | None:
    """Reliability diagram per arm, its seeds pooled: the accuracy of the images binned by their top grade
    probability against that probability (the diagonal is perfect calibration), with the pooled expected
    calibration error; laid out by `arrange` (one line per arm: a colour each when few, a colour map along a
    numeric factor, a panel per initialisation). Only runs with grade probabilities in their predictions.csv
    count; None (nothing drawn) when no arm has any, else the figure (saved to `path`)."""
    pooled = {}
    for arm in arms:
        # each run's own reliability, kept in the results cache, pooled exactly: no predictions file read again
        found = [(r, c) for r, c in ((r, r.calibration()) for r in arm.done) if c is not None]
        if found:
            calibration = pooled_calibration([c for _, c in found])
            before = [r.chosen().get("test_ece_before") for r, _ in found]
            before = [b for b in before if b is not None]
            pooled[arm.name] = (calibration, len(found), float(np.mean(before)) if before else None)
    if not pooled:
        return None
    layout = arrange([a for a in arms if a.name in pooled])
    rows, columns = grid_shape(len(layout.groups), 4)
    fig = new_figure(4.0 * columns + (1.3 if layout.key else 0), 3.8 * rows + 0.9)
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    for ax, (title, members) in zip(axes.flat, layout.groups):
        ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfectly calibrated")
        for arm in members:
            calibration, seeds, before = pooled[arm.name]
            extra = f", {before:.3f} before temperature scaling" if before is not None else ""
            ax.plot([b["confidence"] for b in calibration["bins"]], [b["accuracy"] for b in calibration["bins"]],
                    "-", marker="o" if len(members) <= 4 else "", ms=3, color=layout.colours[arm.name],
                    label=f"{arm.name} ({seeds} seed{'s' * (seeds > 1)} pooled): ECE {calibration['ece']:.3f}{extra}")
        if title:
            eces = [pooled[a.name][0]["ece"] for a in members]
            spread = f"{min(eces):.3f}" if len(eces) == 1 else f"{min(eces):.3f} to {max(eces):.3f}"
            seeds = sorted({pooled[a.name][1] for a in members})
            counted = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
            ax.set_title(f"{wrapped(title)}\n{counted} seed{'s' * (seeds[-1] > 1)} pooled; ECE {spread}", fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layout.groups):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("top grade probability (binned)")
    for ax in axes[:, 0]:
        ax.set_ylabel("share graded right")
    shown = [ax for ax in axes.flat if ax.get_visible()]
    fig.suptitle("Reliability at each run's selected epoch (test), each arm's seeds pooled", fontsize=11)
    layout.colour_key(fig, shown)
    handles, labels = shown[0].get_legend_handles_labels()
    if len(layout.groups) > 1 or layout.key:  # the panels' titles and the colour bar or legend name the lines
        from matplotlib.lines import Line2D

        handles = handles[:1] + [Line2D([], [], color=colour, lw=2) for colour in layout.legend.values()]
        labels = labels[:1] + list(layout.legend)
    fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=1 + len(labels) // 8)
    save(fig, path)
    return fig


def plot_confusion_matrices(arms: list[Arm], path: Path, which: str = "") -> Figure:
    """Per arm: its confusion matrix at its runs' selected epochs (each run's train.select_by on its held-out
    part, else its final epoch: the epoch of its checkpoint_best.pt), its seeds pooled (counts summed), then
    row-normalised; a near-square grid of at most 5 columns, so many arms stay one readable image (each run's
    own is its folder's confusion_matrix.png, and its counts are in its summary.json). `arms`: the arms to
    draw (those with no epoch yet are left out); `which`: what chose them, in the title (along a curve, its
    ends). Returns the figure (saved to `path`)."""
    shown = [a for a in arms if a.done]
    rows, columns = grid_shape(len(shown), 5)
    fig = new_figure(2.75 * columns + 1.6, 2.85 * rows + 0.5)
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    for index, (ax, arm) in enumerate(zip(axes.flat, shown)):
        runs = arm.done
        chosen = [r.chosen() for r in runs]
        matrix = np.sum([np.array(c["confusion_matrix"]) for c in chosen], axis=0)
        how = ", ".join(sorted({f"held-out {r.select_by}" if r.has_val else "final" for r in runs}))
        going = sum(not r.complete for r in runs)
        collapsed = sum(bool(r.collapsed) for r in runs)
        mean = " (mean)" if len(runs) > 1 else ""
        title = (f"{wrapped(arm.name, 40)}\n{len(runs)} seed{'s' * (len(runs) > 1)} pooled"
                 + (f", {going} still going" if going else "") + f"; {how}\n"
                 f"accuracy {np.mean([c['test_acc'] for c in chosen]):.1%}, QWK "
                 f"{np.mean([c['test_qwk'] for c in chosen]):.3f}{mean}"
                 + (f"\nCOLLAPSED: {collapsed} of {len(runs)}" if collapsed else ""))
        image = draw_confusion_matrix(ax, matrix, title, fontsize=6.5, totals=False)
        last_row = index + columns >= len(shown)  # nothing below it: the grade names go here
        if index % columns:
            ax.set_yticklabels([])
            ax.set_ylabel("")
        if not last_row:
            ax.set_xticklabels([])
            ax.set_xlabel("")
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=[ax for ax in axes.flat if ax.get_visible()], shrink=min(0.8, 3.0 / (2.85 * rows)),
                     label="share of the true grade's images")
    fig.suptitle("Test confusion matrices at each run's selected epoch, each arm's seeds pooled (counts summed, "
                 "then row-normalised)" + (f"\n{which} (every run's own is in its folder)" if which else ""), fontsize=10)
    save(fig, path)
    return fig


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


def answer_tables(heads: list[Headline], comparisons: list[dict], families: list[dict], detectable: list[dict],
                  root: Path, curves: list[str] = ()) -> list[Table]:
    """The report's opening: each arm at its chosen setting with its test scores, the declared families'
    comparisons with their verdicts, what the answer rests on, and what the seeds could detect; `curves`
    (answer.curve_keys): the factors shown one row per line."""
    rows = answer_rows(heads, root)
    if curves:  # a curve's line in one row (one curve: rows of arms along two curves are a grid, left as they are)
        rows = fold_curves(rows, heads, curves[0])
    tables = [answer_table(rows)]
    backbones = backbones_table(rows)
    members = question(comparisons)
    if members:
        tables.append(question_table(fold_question(members, curves), families))
    tables.append(weigh_table(weigh(heads, root, detectable)))
    if detectable:
        tables.append(detectable_table(detectable))
    if backbones is not None:  # what the ssl arms learned from and what it cost, after what the answer rests on
        tables.append(backbones)
    return tables


def tables_of(rows: list[dict], comparisons: list[dict], seeds: list[dict], datasets: list[dict] = (),
              operating: list[dict] = (), families: list[dict] = ()) -> list[Table]:
    """The details after the answer, the same for results.md and report.html: every paired comparison made
    (descriptive ones too); seeds when an arm has several; every run's row; referable DR at screening
    operating points for the answer's runs; other datasets when evaluate scored a run on any."""
    tables = []
    if comparisons:
        tables.append(comparisons_table(comparisons, families))
    if any(len(row["seeds"]) + row["unfinished"] > 1 for row in seeds):
        tables.append(seeds_table(seeds))
    tables.append(results_table(rows))
    if operating:
        tables.append(operating_points_table(operating))
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
        lines += (["" ] if lines else []) + markdown(table, level=1 if table.id == "answer" else 2)
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
            if pruned_note(run.path):  # its weights are gone on purpose: say so rather than leave it out unsaid
                print(f"{run.name}: no gallery: {missing_checkpoint(best)}", file=sys.stderr)
            continue
        cfg = yaml.safe_load((run.path / CONFIG_FILE).read_text())
        path = out / f"gallery_{run.name}.png"
        save_gallery(best, cfg["data"]["root"], cfg["data"].get("test_split", "test"), path,
                     f"{run.name}: {cfg['data'].get('test_split', 'test')} photos graded right and wrong, with Grad-CAM "
                     f"heat maps (predicted grade)", per_cell)
        written.append(path)
    return written


FOLDED_ROWS = 20  # report.html folds a section after the answer with more rows than this (results.md shows all)


def report(root: str | Path, out: str | Path | None = None, gallery: bool = False) -> list[Path]:
    """Write the figures and tables for every run under root (and with gallery, each run's gallery of
    heat maps); returns the files written."""
    root = Path(root)
    out = Path(out) if out else root
    if gallery:  # its heat maps need captum: say so before any work, not after the figures and tables
        from dr_resnet.serving.cam import require_captum

        require_captum()
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
    searched = declared_searched(root)
    heads = headline(arms, searched, read_choice(root))
    answered = [h.arm for h in heads if h.arm]  # winners meet winners: a searched key's settings are not compared
    curves = curve_keys(heads)
    if any(r.rows for a in answered for r in a.runs):  # the answer's arms: every other run's matrix is in its folder
        plot_confusion_matrices(curve_ends(heads, curves[0]) if curves else answered, out / "confusion_matrices.png",
                                f"{curves[0]}: each line's first and last values" if curves else "")
        written.append(out / "confusion_matrices.png")
    if plot_calibration(answered, out / "calibration.png") is not None:
        written.append(out / "calibration.png")
    comparisons = [c for epoch in COMPARED_EPOCHS for c in compare_arms(compared_arms(heads), epoch=epoch)]
    families = declare_families(comparisons)
    for warning in dict.fromkeys(f"{c['comparison']}: {c['warning']}" for c in comparisons if c.get("warning")):
        print(f"warning: {warning}", file=sys.stderr)
    rows = result_rows(runs)
    detectable = smallest_detectable(comparisons)
    tables = answer_tables(heads, comparisons, families, detectable, root, curves)
    more, figures = factor_tables(arms, comparisons, families, out, heads, searched)
    tuned, tuning_figures = tuning_tables(root, out)
    details = more + tuned + tables_of(rows, comparisons, seed_summary(arms), dataset_rows(runs, rows),
                                       operating_rows([r for a in answered for r in a.runs]), families)
    for table in details:  # after the answer, a long table (a row per arm, value or comparison) is folded on the page
        table.detail = table.detail or len(table.rows) > FOLDED_ROWS
    tables += details
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


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    p = argparse.ArgumentParser(prog="python -m dr_resnet.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", help="a run directory, or a folder of them (e.g. a sweep folder)")
    p.add_argument("--out", help="output folder (default: runs_dir)")
    p.add_argument("--gallery", action="store_true",
                   help="also draw, per run, test photos graded right and wrong with their Grad-CAM heat maps")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    def work() -> None:
        written = report(args.runs_dir, args.out, args.gallery)
        print("wrote " + ", ".join(str(p) for p in written))
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
