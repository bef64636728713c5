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
from dr_resnet.results.arms import COMPARED_EPOCHS, PAIR_METRICS, SEED_COLUMNS, RunRecord, compare_arms, find_runs, seed_summary
from dr_resnet.results.html import write_html
from dr_resnet.results.metrics import expected_calibration_error
from dr_resnet.results.plots import pyplot
from dr_resnet.results.rundir import BEST_CHECKPOINT, CONFIG_FILE, FINAL

COLOURS = {True: "tab:blue", False: "tab:orange"}  # pretrained, scratch
COMPARISONS_FILE = "comparisons.json"
FIGURE_CAPTIONS = {"confusion_matrices.png": "confusion matrices at each run's selected epoch (row-normalised)",
                   "calibration.png": "reliability diagram: top grade probability against the share graded right"}


def caption(figure: Path) -> str:
    if figure.name.startswith("accuracy_resnet"):
        return f"ResNet{figure.stem.removeprefix('accuracy_resnet')}: accuracy and QWK per epoch, pretrained and scratch"
    if figure.name.startswith("gallery_"):
        return f"{figure.stem.removeprefix('gallery_')}: test photos graded right and wrong, with Grad-CAM heat maps"
    return FIGURE_CAPTIONS.get(figure.name, figure.stem)
def plot_curves(runs: list[RunRecord], depth: int, path: Path) -> None:
    """Accuracy (train dashed, test solid, majority baseline dotted) and test QWK per epoch; an arm with
    several seeds as their mean with a band of +-1 standard deviation."""
    plt = pyplot()
    fig, (acc_ax, qwk_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    baselines = []
    for pretrained in (True, False):
        group = [r for r in runs if r.pretrained == pretrained and r.rows]
        if not group:
            continue
        colour, label = COLOURS[pretrained], group[0].label
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
    not_run = sorted({f"{r.label}: {r.launch_status.split(':')[0]}" for r in runs if r.launch_status})
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


def plot_calibration(runs: list[RunRecord], path: Path) -> bool:
    """Reliability diagram: per run with grade probabilities in its predictions.csv, the accuracy of its
    images binned by their top probability against that probability (the diagonal is perfect
    calibration), with its expected calibration error. False (nothing drawn) when no run has any."""
    shown = [(r, r.predictions()) for r in runs if r.rows]
    shown = [(r, p) for r, p in shown if p is not None and p.values.ndim == 2]
    if not shown:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.2))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfectly calibrated")
    for run, found in shown:
        calibration = expected_calibration_error(found.values, found.labels)
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
                                      f"ResNet{run.depth} {run.label} ({run.name})\nepoch {best['epoch']} "
                                      f"({f'best held-out {run.select_by}' if run.has_val else 'final'}), test: "
                                      f"accuracy {best['test_acc']:.1%}, QWK {best['test_qwk']:.3f}"
                                      + (" - COLLAPSED" if run.collapsed else ""))
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="share of the true grade's images")
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ["run", "depth", "weights", "status", "epochs", "selected_by", "selected_epoch", "collapsed", "selected_test_acc",
           "selected_qwk", "selected_acc_95ci", "selected_qwk_95ci", "selected_auc_95ci", "ci_resampled", "selected_ece",
           "ece_before_temperature", "recall_at_selected", "referable_sens_at_selected", "referable_spec_at_selected",
           "final_test_acc", "final_qwk", "majority_baseline", "train_minutes"]


def result_rows(runs: list[RunRecord]) -> list[dict]:
    """One row per run at its selected epoch (and its final epoch): nothing here is chosen on test."""
    table = []
    for run in runs:
        row = {"run": run.name, "depth": run.depth, "weights": run.weights, "epochs": f"{len(run.rows)}/{run.epochs_planned}"}
        if run.launch_status and (run.launch_status.startswith("not run") or not run.rows):
            table.append({**row, "status": run.launch_status})
            continue
        if not run.rows:
            table.append({**row, "status": "no epoch yet"})
            continue
        chosen, final = run.chosen(), run.rows[-1]
        progress = "done" if len(run.rows) >= run.epochs_planned else "in progress"
        how = f"held-out {run.select_by}" if run.has_val else FINAL
        table.append({**row, "status": run.launch_status or progress, "selected_by": how, "selected_epoch": chosen["epoch"],
                      "collapsed": run.collapsed or "no", "selected_test_acc": chosen["test_acc"],
                      "selected_qwk": chosen["test_qwk"], "selected_ece": chosen.get("test_ece"),
                      "ece_before_temperature": chosen.get("test_ece_before"),
                      "recall_at_selected": " ".join(f"{r:.2f}" for r in chosen["test_recall"]),
                      "referable_sens_at_selected": chosen.get("test_referable_sensitivity"),
                      "referable_spec_at_selected": chosen.get("test_referable_specificity"),
                      "final_test_acc": final["test_acc"], "final_qwk": final["test_qwk"], "majority_baseline": run.baseline,
                      "train_minutes": sum(r["epoch_seconds"] for r in run.rows) / 60})
        intervals = run.intervals()
        if intervals:
            table[-1].update({f"selected_{short}_95ci": _with_interval(intervals[name])
                              for short, name in (("acc", "accuracy"), ("qwk", "qwk"), ("auc", "referable_auc"))},
                             ci_resampled=intervals["unit"])
    return table


def _with_interval(entry: dict) -> str:
    return f"{entry['value']:.3f} ({entry['low']:.3f}-{entry['high']:.3f})"


def seed_lines(table: list[dict]) -> list[str]:
    lines = ["## Seeds (each arm's selected and final epochs, mean and standard deviation over its seeds)", "",
             "| arm | seeds | collapsed | " + " | ".join(label for _, label in SEED_COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(SEED_COLUMNS)]
    for row in table:
        cells = [f"{row[m]['mean']:.3f}" + (f" +- {row[m]['sd']:.3f}" if row[m]["sd"] is not None else "")
                 for m, _ in SEED_COLUMNS]
        collapsed = f"{len(row['collapsed'])} (seed {', '.join(map(str, row['collapsed']))})" if row["collapsed"] else "0"
        lines.append(f"| {row['arm']} | {', '.join(map(str, row['seeds']))} | {collapsed} | " + " | ".join(cells) + " |")
    return lines



EPOCH_TITLES = {"selected": "each run's selected epoch", "final": "each run's final epoch"}


def comparison_lines(comparisons: list[dict]) -> list[str]:
    lines = ["## Paired comparisons (A - B on the same test images)", "",
             "At each run's selected epoch (chosen on its held-out part, else its final epoch) and at its final "
             "epoch (predictions_final.csv). 95% intervals from a paired bootstrap (both runs scored on each "
             "resample); McNemar's exact test on the images one run graded right and the other wrong (one per "
             "seed pair). Arms with several seeds are "
             "compared seed by seed and averaged: the interval is the test set's uncertainty about that mean; the "
             "seeds' own spread is in the Seeds table. An interval that holds 0 means the test set cannot tell "
             "the two apart.", "",
             "| comparison | A | B | images | " + " | ".join(f"{label} A - B (95% CI)" for _, label in PAIR_METRICS)
             + " | only A right / only B right | McNemar p |", "|---" * (6 + len(PAIR_METRICS)) + "|"]
    for epoch, title in EPOCH_TITLES.items():
        shown = [c for c in comparisons if c["epoch"] == epoch]
        if shown:
            lines.append(f"| **at {title}** |" + " |" * (5 + len(PAIR_METRICS)))
        lines += _comparison_rows(shown)
    return lines


def _comparison_rows(comparisons: list[dict]) -> list[str]:
    lines = []
    for c in comparisons:
        if c["status"] != "compared":
            lines.append(f"| {c['comparison']} | {c['a']} | {c['b']} | {c['status']} |" + " |" * (2 + len(PAIR_METRICS)))
            continue
        cells = [f"{c[m]['difference']:+.3f} ({c[m]['low']:+.3f} to {c[m]['high']:+.3f})" for m, _ in PAIR_METRICS]
        counts = ", ".join(f"{m['a_only_right']} / {m['b_only_right']}" for m in c["mcnemar"])
        p_values = ", ".join(f"{m['p_value']:.3g}" for m in c["mcnemar"])
        seeds = f", seeds {', '.join(map(str, c['seeds']))}" if len(c["seeds"]) > 1 else ""
        lines.append(f"| {c['comparison']} | {c['a']} | {c['b']} | {c['images']} ({c['resampled']}{seeds}) | "
                     + " | ".join(cells) + f" | {counts} | {p_values} |")
    return lines


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_tables(table: list[dict], out: Path, comparisons: list[dict] = (), seeds: list[dict] = ()) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in table)
    lines = ["# Results", "",
             "selected_epoch is each run's own choice, never made on the test split: the best epoch by its "
             "train.select_by on the held-out part of its training split (selected_by: held-out ...), or its final "
             "epoch when nothing was held out (selected_by: final); it is the epoch of its checkpoint_best.pt. "
             "collapsed: why the selected epoch looks collapsed (one grade predicted for 95% of the test images or "
             "more, or accuracy below the majority baseline). QWK = quadratic weighted kappa; recall per grade 0..4 "
             "at the selected epoch; referable DR = grade >= 2 vs < 2 (sensitivity, specificity, ROC AUC). "
             "Accuracy is only meaningful above the majority baseline. selected_*_95ci: "
             "the selected epoch's accuracy, QWK and referable AUC with bootstrap 95% intervals (ci_resampled: "
             "patients when image names carry a patient id, else images). selected_ece: the selected epoch's "
             "expected calibration error of its top grade probability (0 = calibrated); ece_before_temperature: the "
             "same without its fitted temperature (train.calibration=temperature).",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in COLUMNS) + " |" for row in table]
    if any(len(row["seeds"]) > 1 for row in seeds):
        lines += [""] + seed_lines(seeds)
    if comparisons:
        lines += [""] + comparison_lines(comparisons)
        (out / COMPARISONS_FILE).write_text(json.dumps(comparisons, indent=2) + "\n")
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
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run directories (with config.yaml) under {root}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for depth in sorted({r.depth for r in runs}):
        path = out / f"accuracy_resnet{depth}.png"
        plot_curves([r for r in runs if r.depth == depth], depth, path)
        written.append(path)
    if any(r.rows for r in runs):
        plot_confusion_matrices(runs, out / "confusion_matrices.png")
        written.append(out / "confusion_matrices.png")
    if plot_calibration(runs, out / "calibration.png"):
        written.append(out / "calibration.png")
    comparisons = [c for epoch in COMPARED_EPOCHS for c in compare_arms(runs, epoch=epoch)]
    table, seeds = result_rows(runs), seed_summary(runs)
    write_tables(table, out, comparisons, seeds)
    if comparisons:
        written.append(out / COMPARISONS_FILE)
    if gallery:
        written += galleries(runs, out)
    figures = [(p, caption(p)) for p in [*(w for w in written if w.suffix == ".png" and not w.name.startswith("gallery_")),
                                         *sorted(out.glob("gallery_*.png"))]]  # a gallery drawn earlier is shown too
    page = write_html(out, f"dr-resnet report: {root.resolve().name}", table, comparisons, seeds, figures)
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
