"""Compare runs: accuracy and QWK curves per depth (pretrained vs scratch), confusion matrices side by
side, and a results table. Works for any subset of runs; runs in progress are drawn up to their last
epoch. Reads only the run directories' own files (metrics.jsonl, config.yaml), never W&B.

    python -m dr_resnet.report RUNS_DIR [--out DIR] [--gallery]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .metrics import majority_baseline
from .plots import pyplot
from .predictions import Predictions, read_predictions
from .rundir import (BEST_CHECKPOINT, CONFIG_FILE, PREDICTIONS_FILE, STATUS_FILE, SUMMARY_FILE, read_metrics, selected_on,
                     selected_row)
from .stats import RESAMPLES, bootstrap_intervals, paired_comparison

COLOURS = {True: "tab:blue", False: "tab:orange"}  # pretrained, scratch
COMPARISONS_FILE = "comparisons.json"


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

    @property
    def pretrained(self) -> bool:
        return self.weights.lower() != "none"

    @property
    def label(self) -> str:
        return "pretrained" if self.pretrained else "scratch"

    def best(self, key: str) -> dict | None:
        return max(self.rows, key=lambda r: (r[key], -r["epoch"])) if self.rows else None

    @property
    def has_val(self) -> bool:
        """Whether the run held out part of its training split (data.val_fraction) to choose epochs on."""
        return bool(self.rows) and selected_on(self.rows[-1]) == "val"

    def chosen(self) -> dict | None:
        """The epoch the run itself selects (its checkpoint_best.pt): by its train.select_by, on its
        held-out set, else on test."""
        return selected_row(self.rows, self.select_by) if self.rows else None

    def predictions(self) -> Predictions | None:
        """The selected epoch's per-image test predictions (predictions.csv), if the run wrote them."""
        path = self.path / PREDICTIONS_FILE
        return read_predictions(path) if path.is_file() else None

    def intervals(self) -> dict | None:
        """Bootstrap 95% intervals of the selected epoch's metrics: the run summary's, else computed from
        its predictions.csv; None without either."""
        summary = self.path / SUMMARY_FILE
        if summary.is_file():
            recorded = json.loads(summary.read_text()).get("intervals")
            if recorded:
                return recorded
        found = self.predictions()
        return bootstrap_intervals(found.labels, found.grades, found.referable_scores, found.names) if found else None

    @property
    def baseline(self) -> float | None:
        return majority_baseline(np.array(self.rows[-1]["confusion_matrix"])) if self.rows else None


def find_runs(root: Path) -> list[RunRecord]:
    """Run directories under root (root itself, or up to two levels down), sorted by depth then name."""
    candidates = [root] + sorted(p for p in root.glob("*") if p.is_dir()) + sorted(p for p in root.glob("*/*") if p.is_dir())
    runs = []
    for path in candidates:
        config_file, status_file = path / CONFIG_FILE, path / STATUS_FILE
        if not config_file.is_file():
            continue
        cfg = yaml.safe_load(config_file.read_text()) or {}
        rows = read_metrics(path)
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
        reason = f"{status.get('status', 'failed')}: {status.get('reason', '')}" if status else ""
        runs.append(RunRecord(path.name, path, int(cfg["model"]["depth"]), str(cfg["model"]["weights"]),
                              int(cfg["train"]["epochs"]), rows, reason, str(cfg["train"].get("select_by", "qwk"))))
    return sorted(runs, key=lambda r: (r.depth, not r.pretrained, r.name))


def plot_curves(runs: list[RunRecord], depth: int, path: Path) -> None:
    """Accuracy (train dashed, test solid, majority baseline dotted) and test QWK per epoch."""
    plt = pyplot()
    fig, (acc_ax, qwk_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    baselines = []
    for run in runs:
        if not run.rows:
            continue
        epochs = [r["epoch"] for r in run.rows]
        colour = COLOURS[run.pretrained]
        acc_ax.plot(epochs, [100 * r["train_acc"] for r in run.rows], "--", color=colour, label=f"{run.label} train")
        acc_ax.plot(epochs, [100 * r["test_acc"] for r in run.rows], "-o", ms=3, color=colour, label=f"{run.label} test")
        qwk_ax.plot(epochs, [r["test_qwk"] for r in run.rows], "-o", ms=3, color=colour, label=f"{run.label} test")
        if run.has_val:
            qwk_ax.plot(epochs, [r.get("val_qwk", math.nan) for r in run.rows], ":s", ms=3, color=colour,
                        label=f"{run.label} held-out")
        baselines.append(run.baseline)
    if baselines:
        acc_ax.axhline(100 * max(baselines), color="grey", ls=":", label=f"majority baseline ({100 * max(baselines):.1f}%)")
    acc_ax.set(title=f"ResNet{depth}: accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)")
    qwk_ax.set(title=f"ResNet{depth}: quadratic weighted kappa", xlabel="epoch", ylabel="QWK", ylim=(-0.05, 1.0))
    qwk_ax.axhline(0, color="grey", ls=":", label="chance (and always-grade-0)")
    not_run = [f"{r.label}: {r.launch_status.split(':')[0]}" for r in runs if r.launch_status]
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


def plot_confusion_matrices(runs: list[RunRecord], path: Path) -> None:
    """Each run's confusion matrix at its selected epoch (its train.select_by, on the held-out set if it
    has one, else on test: the epoch of its checkpoint_best.pt), row-normalised, two to a row."""
    from .plots import draw_confusion_matrix

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
                                      f"(best {run.select_by} on {'held-out' if run.has_val else 'test'}), test: "
                                      f"accuracy {best['test_acc']:.1%}, QWK {best['test_qwk']:.3f}")
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="share of the true grade's images")
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ["run", "depth", "weights", "status", "epochs", "selected_by", "selected_epoch", "selected_acc_95ci",
           "selected_qwk_95ci", "selected_auc_95ci", "ci_resampled", "best_test_acc", "best_acc_epoch", "best_qwk",
           "best_qwk_epoch", "val_chosen_epoch", "test_qwk_at_val_chosen", "final_test_acc", "final_qwk", "majority_baseline", "recall_at_best_qwk",
           "referable_sens_at_best_qwk", "referable_spec_at_best_qwk", "referable_auc_at_best_qwk", "train_minutes"]


def result_rows(runs: list[RunRecord]) -> list[dict]:
    table = []
    for run in runs:
        row = {"run": run.name, "depth": run.depth, "weights": run.weights, "epochs": f"{len(run.rows)}/{run.epochs_planned}"}
        if run.launch_status and (run.launch_status.startswith("not run") or not run.rows):
            table.append({**row, "status": run.launch_status})
            continue
        if not run.rows:
            table.append({**row, "status": "no epoch yet"})
            continue
        acc, qwk, final = run.best("test_acc"), run.best("test_qwk"), run.rows[-1]
        progress = "done" if len(run.rows) >= run.epochs_planned else "in progress"
        table.append({**row, "status": run.launch_status or progress,
                      "selected_by": f"{selected_on(final)} {run.select_by}", "selected_epoch": run.chosen()["epoch"],
                      "best_test_acc": acc["test_acc"], "best_acc_epoch": acc["epoch"], "best_qwk": qwk["test_qwk"],
                      "best_qwk_epoch": qwk["epoch"], "final_test_acc": final["test_acc"], "final_qwk": final["test_qwk"],
                      "majority_baseline": run.baseline, "recall_at_best_qwk": " ".join(f"{r:.2f}" for r in qwk["test_recall"]),
                      "referable_sens_at_best_qwk": qwk.get("test_referable_sensitivity"),
                      "referable_spec_at_best_qwk": qwk.get("test_referable_specificity"),
                      "referable_auc_at_best_qwk": qwk.get("test_referable_auc"),
                      "train_minutes": sum(r["epoch_seconds"] for r in run.rows) / 60})
        if run.has_val:
            chosen = run.chosen()
            table[-1].update(val_chosen_epoch=chosen["epoch"], test_qwk_at_val_chosen=chosen["test_qwk"])
        intervals = run.intervals()
        if intervals:
            table[-1].update({f"selected_{short}_95ci": _with_interval(intervals[name])
                              for short, name in (("acc", "accuracy"), ("qwk", "qwk"), ("auc", "referable_auc"))},
                             ci_resampled=intervals["unit"])
    return table


def _with_interval(entry: dict) -> str:
    return f"{entry['value']:.3f} ({entry['low']:.3f}-{entry['high']:.3f})"


PAIR_METRICS = (("accuracy", "accuracy"), ("qwk", "QWK"), ("referable_auc", "referable AUC"))


def arm_pairs(runs: list[RunRecord]) -> list[tuple[str, RunRecord | None, RunRecord | None, str, str]]:
    """The core experiment's pairs: pretrained vs scratch at each depth, ResNet18 vs ResNet50 at each
    initialisation, as (question, A, B, A's name, B's name); a side with no run is None."""
    def find(depth: int, pretrained: bool) -> RunRecord | None:
        return next((r for r in runs if r.depth == depth and r.pretrained == pretrained), None)

    depths = sorted({r.depth for r in runs})
    pairs = [(f"pretraining at ResNet{d}", find(d, True), find(d, False), f"resnet{d} pretrained", f"resnet{d} scratch")
             for d in depths]
    for shallow, deep in zip(depths, depths[1:]):
        for init in (True, False):
            label = "pretrained" if init else "scratch"
            pairs.append((f"depth {deep} vs {shallow}, {label}", find(deep, init), find(shallow, init),
                          f"resnet{deep} {label}", f"resnet{shallow} {label}"))
    return pairs


def compare_arms(runs: list[RunRecord], resamples: int = RESAMPLES) -> list[dict]:
    """For each pair of arm_pairs: A - B in accuracy, QWK and referable AUC at each run's selected epoch,
    with paired-bootstrap 95% intervals and McNemar's test, from their predictions.csv; or why not."""
    results = []
    for question, a, b, name_a, name_b in arm_pairs(runs):
        entry = {"comparison": question, "a": name_a, "b": name_b}
        missing = [f"{n} {'has no run' if r is None else 'has no predictions.csv (' + (r.launch_status or 'no selected epoch yet') + ')'}"
                   for n, r in ((name_a, a), (name_b, b)) if r is None or r.predictions() is None]
        if missing:
            results.append({**entry, "status": "not compared: " + "; ".join(missing)})
            continue
        pa, pb = a.predictions(), b.predictions()
        if pa.names != pb.names or not np.array_equal(pa.labels, pb.labels):
            results.append({**entry, "status": f"not compared: {a.name} and {b.name} were evaluated on different images "
                                               f"({len(pa.names)} and {len(pb.names)}): a paired comparison needs the same test set"})
            continue
        paired = paired_comparison(pa.labels, (pa.grades, pa.referable_scores), (pb.grades, pb.referable_scores),
                                   pa.names, resamples=resamples)
        results.append({**entry, "status": "compared", "images": len(pa.names), "resampled": paired["unit"],
                        **{m: paired[m] for m, _ in PAIR_METRICS}, "mcnemar": paired["mcnemar"]})
    return results


def comparison_lines(comparisons: list[dict]) -> list[str]:
    lines = ["## Paired comparisons (A - B at each run's selected epoch, on the same test images)", "",
             "95% intervals from a paired bootstrap (both runs scored on each resample); McNemar's exact test on the "
             "images one run graded right and the other wrong. An interval that holds 0 means the test set cannot "
             "tell the two apart.", "",
             "| comparison | A | B | images | " + " | ".join(f"{label} A - B (95% CI)" for _, label in PAIR_METRICS)
             + " | only A right / only B right | McNemar p |", "|---" * (7 + len(PAIR_METRICS)) + "|"]
    for c in comparisons:
        if c["status"] != "compared":
            lines.append(f"| {c['comparison']} | {c['a']} | {c['b']} | {c['status']} |" + " |" * (3 + len(PAIR_METRICS)))
            continue
        cells = [f"{c[m]['difference']:+.3f} ({c[m]['low']:+.3f} to {c[m]['high']:+.3f})" for m, _ in PAIR_METRICS]
        m = c["mcnemar"]
        lines.append(f"| {c['comparison']} | {c['a']} | {c['b']} | {c['images']} ({c['resampled']}) | " + " | ".join(cells)
                     + f" | {m['a_only_right']} / {m['b_only_right']} | {m['p_value']:.3g} |")
    return lines


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_tables(table: list[dict], out: Path, comparisons: list[dict] = ()) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in table)
    lines = ["# Results", "",
             "selected_epoch is each run's own choice (its train.select_by, on its held-out part if it has one, else "
             "on test): the epoch of its checkpoint_best.pt. "
             "best_* columns choose the epoch on the test split, as the lab recipe does, which flatters them; runs "
             "with a held-out part of the training split (data.val_fraction) also give the test QWK at the epoch "
             "best on that part (test_qwk_at_val_chosen), the unbiased figure. QWK = quadratic weighted kappa; "
             "recall per grade 0..4 at the best-QWK epoch; referable DR = grade >= 2 vs < 2 (sensitivity, "
             "specificity, ROC AUC). Accuracy is only meaningful above the majority baseline. selected_*_95ci: "
             "the selected epoch's accuracy, QWK and referable AUC with bootstrap 95% intervals (ci_resampled: "
             "patients when image names carry a patient id, else images).",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in COLUMNS) + " |" for row in table]
    if comparisons:
        lines += [""] + comparison_lines(comparisons)
        (out / COMPARISONS_FILE).write_text(json.dumps(comparisons, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def galleries(runs: list[RunRecord], out: Path, per_cell: int = 2) -> list[Path]:
    """Per run with a checkpoint_best.pt: test photos per grade, graded right and wrong, with their heat maps."""
    from .gallery import save_gallery  # torch: only when asked for

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
    comparisons = compare_arms(runs)
    write_tables(result_rows(runs), out, comparisons)
    if comparisons:
        written.append(out / COMPARISONS_FILE)
    if gallery:
        written += galleries(runs, out)
    return written + [out / "results.md", out / "results.csv"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dr_resnet.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", help="a run directory, or a folder of them (e.g. a sweep folder)")
    p.add_argument("--out", help="output folder (default: runs_dir)")
    p.add_argument("--gallery", action="store_true",
                   help="also draw, per run, test photos graded right and wrong with their Grad-CAM heat maps")
    args = p.parse_args(argv)
    try:
        written = report(args.runs_dir, args.out, args.gallery)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
