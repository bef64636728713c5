"""What the report costs at the scale of a real sweep: a synthetic grid sweep of run folders in the formats
training writes (config.yaml with its `effective` section, metrics.jsonl, summary.json with its intervals,
predictions.csv and predictions_final.csv), then `python -m dr_resnet.report` over it in a subprocess, with
its CPU time, wall time and peak resident memory. The target: 200 runs (4 arms x 10 learning
rates x 5 seeds) with 50,000-image test sets in under 15 CPU-minutes and 2 GB, and the demo's 4 runs of 250
images in a few seconds.

The report runs three times over one sweep: with no results cache (the first report), again with nothing
changed (everything read from the cache), and after one run's predictions.csv was rewritten (a sweep that
grew or a run that moved on: that run alone is scored again).

    python bench/report_scale.py [--arms 4] [--lrs 10] [--seeds 5] [--rows 50000] [--epochs 5] [--dir DIR] [--searched]
    python bench/report_scale.py --demo
    python bench/report_scale.py --comparison-costs [--rows 50000]

The test set holds two eyes per patient (EyePACS' <patient>_left / _right), grades at EyePACS' shares; each
run's predictions are the patients' latent severity plus its own noise (less for pretrained, deeper arms,
a learning rate near the middle of the grid, later epochs), so the arms differ, seeds vary and the report's
comparisons, figures and tables all have something to show. Each run holds out a tenth of the test size to
choose its epoch on. The summaries' intervals and operating points are computed with --summary-resamples
(default 20, not training's 2,000: the report only reads them, and building 200 runs would take an hour);
--no-intervals leaves them out, so that the report computes every run's intervals itself (runs written
before training recorded them, or still going).

The sweep folder holds the sweep.json launch.sweep writes, whose roles decide what the report compares: by
default the learning rate is a factor of the experiment (a grid key not named searched: every value is an arm
of its own, compared at each value); with --searched it is a searched key (searched: [train.lr] in the sweep
file, or launch.sweep --searched train.lr), and the answer reduces each arm's 10 rates to the one its held-out
score prefers, so the comparisons are winner against winner. Besides the costs, each report's size is printed:
its comparisons, results.md's lines, report.html's MB and the largest figure's pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dr_resnet import NUM_GRADES  # noqa: E402
from dr_resnet import config as configuration  # noqa: E402
from dr_resnet.results.metrics import REFERABLE_GRADE, epoch_entries, roc_auc, summarize  # noqa: E402
from dr_resnet.results.predictions import write_predictions  # noqa: E402
from dr_resnet.results.rundir import (  # noqa: E402
    CONFIG_FILE,
    FINAL_PREDICTIONS_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
)
from dr_resnet.results.stats import bootstrap_intervals, operating_points  # noqa: E402

ARMS = {"resnet18_pretrained": 0.55, "resnet18_scratch": 0.75, "resnet50_pretrained": 0.5, "resnet50_scratch": 0.8}
# each arm's noise (in sd of the latent severity) at the grid's best learning rate, final epoch
SHARES = (0.73, 0.07, 0.15, 0.025, 0.025)  # EyePACS' grades
MARKER = "bench_sweep.json"  # the parameters a sweep folder was built with: the same ones reuse it
LAYOUT = 2  # in the marker: 2 lays the runs out as launch.sweep does (<arm>/lr0.003/seed1), 1 named trials t00
LR_KEY = "train.lr"


def cuts(values: np.ndarray) -> np.ndarray:
    """The severities that cut `values` into grades at EyePACS' shares."""
    return np.quantile(values, np.cumsum(SHARES)[:-1])


class TestSet:
    """Patients with two eyes each: a latent severity per eye (the patient's and the eye's own), its grade."""

    def __init__(self, rows: int, seed: int):
        rng = np.random.default_rng(seed)
        patients = max(1, (rows + 1) // 2)
        shared = np.repeat(rng.normal(size=patients), 2)[:rows]
        self.severity = 0.8 * shared + 0.6 * rng.normal(size=rows)
        self.cuts = cuts(self.severity)
        self.labels = np.digitize(self.severity, self.cuts)
        ids = np.repeat(np.arange(10_000, 10_000 + patients), 2)[:rows]
        self.names = [f"{p}_{'left' if i % 2 == 0 else 'right'}" for i, p in enumerate(ids)]
        self.patients = [str(p) for p in ids]


def predicted(test: TestSet, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A model's (grades, grade probabilities, referable scores) on `test`: the severity seen through noise."""
    seen = test.severity + noise * rng.normal(size=len(test.labels))
    centres = np.r_[test.cuts[0] - 0.5, (test.cuts[1:] + test.cuts[:-1]) / 2, test.cuts[-1] + 0.5]
    logits = -((seen[:, None] - centres[None, :]) ** 2) / 0.5
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    grades = np.digitize(seen, test.cuts)
    return grades, probabilities, probabilities[:, REFERABLE_GRADE:].sum(axis=1)


def scores_of(test: TestSet, grades: np.ndarray, referable: np.ndarray) -> dict:
    """What an epoch row holds of one split (metrics.summarize and the referable AUC, as training scores)."""
    cm = np.bincount(test.labels * NUM_GRADES + grades, minlength=NUM_GRADES ** 2).reshape(NUM_GRADES, NUM_GRADES)
    return {**summarize(cm), "referable_auc": roc_auc(test.labels >= REFERABLE_GRADE, referable)}


def build_run(run_dir: Path, arm: str, lr: float, seed: int, lr_best: float, test: TestSet, held_out: TestSet,
              epochs: int, resamples: int, intervals: bool) -> None:
    """One finished run's folder: config.yaml (the arm's config with this rate and seed), an epoch row per
    epoch (chosen on the held-out set's QWK), the selected and final epochs' predictions and summary.json."""
    rng = np.random.default_rng([seed, int(lr * 1e6), list(ARMS).index(arm)])
    run_dir.mkdir(parents=True, exist_ok=True)
    depth, weights = (18 if "18" in arm else 50), ("imagenet" if "pretrained" in arm else "none")
    cfg = configuration.load(REPO / "configs" / f"{arm}.yaml",
                             [f"train.lr={lr}", f"train.seed={seed}", f"train.epochs={epochs}", "train.warmup_epochs=0",
                              "data.val_fraction=0.1", f"output.dir={run_dir}"])
    effective = {"processes": 8, "global_batch": 256, "lr": lr, "lr_rule": "train.lr (fixed)", "precision": "bf16",
                 "sampler": cfg.train.sampler, "steps_per_epoch": 137, "warmup_steps": 0, "total_steps": 137 * epochs,
                 "held_out_images": len(held_out.labels), "training_images": 35_126, "schedule_length": 1.0,
                 "epochs": epochs, "warmup_epochs": 0.0, "sync_bn": False, "selection": "best held-out qwk"}
    configuration.save(cfg, run_dir / CONFIG_FILE, {"effective": effective})
    skill = ARMS[arm] * (1 + 0.3 * abs(np.log10(lr / lr_best))) * (1 + 0.05 * rng.normal())
    rows, made = [], {}
    for epoch in range(1, epochs + 1):
        noise = skill * (1 + 1.2 * (epochs - epoch) / epochs)
        made[epoch] = predicted(test, noise, rng)
        grades, probabilities, referable = made[epoch]
        val_grades, _, val_referable = predicted(held_out, noise, rng)
        test_scores, val_scores = scores_of(test, grades, referable), scores_of(held_out, val_grades, val_referable)
        rows.append({"epoch": epoch, "train_loss": 1.2 * noise, "train_acc": 0.6 + 0.3 * epoch / epochs,
                     **epoch_entries("test", test_scores, noise), "test_ece": 0.05 * noise,
                     **epoch_entries("val", val_scores, noise), "val_confusion_matrix": val_scores["confusion_matrix"],
                     "lr": lr, "nonfinite_steps": 0, "images_per_s": 900.0, "train_seconds": 40.0, "eval_seconds": 9.0,
                     "epoch_seconds": 49.0 + rng.random(), "confusion_matrix": test_scores["confusion_matrix"]})
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(rows, key=lambda r: (r["val_qwk"], -r["epoch"]))
    final = rows[-1]
    for name, row in ((PREDICTIONS_FILE, best), (FINAL_PREDICTIONS_FILE, final)):
        grades, probabilities, referable = made[row["epoch"]]
        if name == FINAL_PREDICTIONS_FILE and row is best:  # the same epoch: the same file
            shutil.copyfile(run_dir / PREDICTIONS_FILE, run_dir / name)
            continue
        write_predictions(run_dir / name, test.names, test.labels, grades, probabilities, referable, "classification",
                          test.patients, row["epoch"])
    keys = [k for k in final if k.startswith(("test_", "val_")) and k != "val_confusion_matrix"]
    summary = {"run": run_dir.name, "depth": depth, "weights": weights, "epochs_completed": epochs,
               "epochs_planned": epochs, "world_size": 8, "num_test_samples": len(test.labels), "selected_by": "qwk",
               "selected_on": "val", "majority_baseline": SHARES[0], "train_majority_baseline": SHARES[0],
               "collapsed": "", "selected": {k: best[k] for k in ["epoch", *keys]},
               "final": {k: final[k] for k in ["epoch", *keys]}, "confusion_matrix": best["confusion_matrix"],
               "final_confusion_matrix": final["confusion_matrix"], "train_seconds_total": 49.0 * epochs,
               "checkpoint_best_epoch": best["epoch"], "patients_in_train_and_test": 0,
               "patients": {"identity": "from the image names (<patient>_left / <patient>_right)",
                            "test_patients": len(set(test.patients)), "patients_in_train_and_test": 0},
               "skipped_images": []}
    if intervals:
        for key, row in (("intervals", best), ("final_intervals", final)):
            grades, _, referable = made[row["epoch"]]
            summary[key] = bootstrap_intervals(test.labels, grades, referable, test.patients, resamples=resamples)
        val_grades, _, val_referable = predicted(held_out, skill, rng)
        summary["operating_points"] = operating_points((held_out.labels, val_referable), (test.labels, made[best["epoch"]][2]),
                                                       test.patients, resamples=resamples)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def learning_rates(count: int) -> list[float]:
    """The grid: `count` rates evenly spaced in log from 0.003 to 0.3 (one: 0.03)."""
    return [0.03] if count == 1 else [float(f"{v:.3g}") for v in np.geomspace(0.003, 0.3, count)]


def build_sweep(folder: Path, sweep_file: Path, args: argparse.Namespace) -> float:
    """The sweep's run folders where launch.sweep would put them for `sweep_file` (layout), reused when built
    before with the same parameters; returns the seconds building took. sweep.json is written apart (its
    roles differ with --searched, the runs do not)."""
    wanted = {k: getattr(args, k) for k in ("arms", "lrs", "seeds", "rows", "epochs", "summary_resamples",
                                            "no_intervals")} | {"layout": LAYOUT}
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return 0.0
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    test, held_out = TestSet(args.rows, seed=0), TestSet(max(20, args.rows // 10), seed=1)
    rates = learning_rates(args.lrs)
    lr_best = rates[len(rates) // 2]
    names = layout(sweep_file, args.seeds)[0]
    for done, (arm, where, seed, _, values) in enumerate(names.values(), 1):
        build_run(folder / where, arm, float(values.get(LR_KEY, rates[0])), seed or 1, lr_best, test, held_out,
                  args.epochs, args.summary_resamples, not args.no_intervals)
        print(f"\rbuilt {done}/{len(names)} runs", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    marker.write_text(json.dumps(wanted))
    return time.perf_counter() - started


def write_sweep_file(path: Path, args: argparse.Namespace) -> Path:
    """The sweep file a user would launch this grid with (launch.sweep's format): the arms, the epochs and
    held-out share every run has, the learning rates as a grid, and with --searched `searched: [train.lr]`."""
    rates = learning_rates(args.lrs)
    content = {"name": "report_scale", "config": str(REPO / "configs" / "base.yaml"),
               "arms": {arm: [f"model.depth={18 if '18' in arm else 50}",
                              f"model.weights={'imagenet' if 'pretrained' in arm else 'none'}"]
                        for arm in list(ARMS)[:args.arms]},
               "overrides": [f"train.epochs={args.epochs}", "train.warmup_epochs=0", "data.val_fraction=0.1"],
               **({"grid": {LR_KEY: [str(lr) for lr in rates]}} if len(rates) > 1 else {}),
               **({"searched": [LR_KEY]} if args.searched and len(rates) > 1 else {})}
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def layout(sweep_file: Path, seeds: int) -> tuple[dict, dict]:
    """launch.sweep's own reading of the sweep file: run name -> (arm, folder, seed, trial, values)
    (sweep.run_names over trials.arm_trials: <arm>[/lr<rate>][/seed<k>]), and the roles trials.roles gives the
    grid's keys ({"searched": [...], "factors": [...]}), as sweep.json records them."""
    from launch import sweep as launcher
    from launch import trials

    sweep = launcher.Sweep.load(sweep_file)
    searched, factors = trials.roles(set(sweep.grid), [], {f"{sweep_file}: searched": sweep.searched})
    by_arm = trials.arm_trials(list(sweep.arms), sweep.grid, sweep.grid_per_arm, None, 0)
    names = launcher.run_names(by_arm, list(range(1, seeds + 1)) if seeds > 1 else [])
    return names, {"searched": searched, "factors": factors}


def write_manifest(folder: Path, sweep_file: Path, args: argparse.Namespace) -> Path:
    """folder/sweep.json with the keys launch.sweep.submit writes (name, sweep_file, executor, command,
    submitted, resources, the grid's roles, runs; every run finished, as a launch over finished runs records
    them). The report reads its "searched" (factors.declared_searched): with --searched the learning rate is
    searched, else a factor."""
    names, roles = layout(sweep_file, args.seeds)
    command = [sys.executable, "-m", "launch.sweep", "--config", str(sweep_file), "--executor", "local", "--out", str(folder),
               *(["--seeds", ",".join(str(s) for s in range(1, args.seeds + 1))] if args.seeds > 1 else [])]
    manifest = {"name": folder.name, "sweep_file": str(sweep_file.resolve()), "executor": "local", "command": command,
                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "resources": {"cpus_per_task": 9, "threads": 1, "mem": "15G"}, **roles,
                "runs": {name: {"status": "finished", "run_dir": str(folder / where)}
                         for name, (_, where, _, _, _) in names.items()}}
    path = folder / "sweep.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def run_report(folder: Path, out: Path) -> dict:
    """`python -m dr_resnet.report folder --out out` in a subprocess: its CPU seconds (user + system), wall
    seconds and peak resident memory (the child's own, from wait4)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "dr_resnet.report", str(folder), "--out", str(out)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"the report failed: see {out.parent / f'{out.name}.log'}")
    comparisons = out / "comparisons.json"
    made = json.loads(comparisons.read_text())["comparisons"] if comparisons.is_file() else []
    return {"cpu": usage.ru_utime + usage.ru_stime, "wall": wall, "rss_mb": usage.ru_maxrss / 1024,
            "comparisons": len(made), "compared": sum(c["status"] == "compared" for c in made), **sizes(out)}


def sizes(out: Path) -> dict:
    """What a reader gets: results.md's lines, report.html's MB, and the largest figure (by pixels) the report
    drew, as 'name W x H'."""
    largest, pixels = "none", 0
    for path in sorted(out.glob("*.png")):
        with Image.open(path) as image:
            width, height = image.size
        if width * height > pixels:
            largest, pixels = f"{path.name} {width} x {height}", width * height
    return {"md_lines": len((out / "results.md").read_text().splitlines()),
            "html_mb": (out / "report.html").stat().st_size / 1e6, "figures": len(list(out.glob("*.png"))),
            "largest": largest}


def touch_one(folder: Path) -> Path:
    """One run's predictions.csv written again (same rows, a new modification time): what a run that moved
    on to a newly selected epoch does to the sweep."""
    path = sorted(folder.rglob(PREDICTIONS_FILE))[0]
    path.write_bytes(path.read_bytes())
    return path


def comparison_costs(rows: int, seeds: int = 5) -> str:
    """What one comparison of two arms (`seeds` seed pairs) costs on `rows` test images, CPU seconds: reading
    a predictions file; paired_comparison from the predictions (what the report did for every comparison
    before it was redesigned for sweeps); and run_scores (once per run) with compare_scored (per comparison),
    what it does now. Both give the same numbers."""
    from dr_resnet.results.predictions import read_predictions
    from dr_resnet.results.stats import compare_scored, paired_comparison, resampling_units, run_scores

    test, rng = TestSet(rows, seed=0), np.random.default_rng(2)
    made = [predicted(test, 0.6 + 0.02 * k, rng) for k in range(2 * seeds)]
    side_a, side_b = ([(g, r) for g, _, r in made[i::2]] for i in (0, 1))

    def cpu(work):  # the best of three, CPU seconds, and the last answer
        times, found = [], None
        for _ in range(3):
            start = time.process_time()
            found = work()
            times.append(time.process_time() - start)
        return min(times), found

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"report_scale_costs_{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    grades, probabilities, referable = made[0]
    path = write_predictions(folder / PREDICTIONS_FILE, test.names, test.labels, grades, probabilities, referable,
                             "classification", test.patients, 1)
    read, _ = cpu(lambda: read_predictions(path))
    shutil.rmtree(folder)
    metrics = ("accuracy", "qwk", "referable_auc")
    directly, expected = cpu(lambda: paired_comparison(test.labels, side_a, side_b, test.patients))
    units, _ = resampling_units(test.patients)
    scoring, scored = cpu(lambda: [run_scores(test.labels, g, r, units, metrics) for g, r in side_a + side_b])
    comparing, found = cpu(lambda: compare_scored(scored[:seeds], scored[seeds:]))
    assert all(found[m] == expected[m] for m in metrics) and found["mcnemar"] == expected["mcnemar"]
    return (f"{rows} test images, {seeds} seed pairs: reading a predictions file {read:.3f} s; a comparison from the "
            f"predictions {directly:.3f} s; from each run's scores (run_scores {scoring / (2 * seeds):.3f} s a run, once) "
            f"{comparing * 1000:.1f} ms, the same numbers")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", type=int, default=4, choices=range(1, 5), help="arms (of ResNet18/50 x pretrained/scratch)")
    p.add_argument("--lrs", type=int, default=10, help="learning rates in the grid (each arm's trials)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per trial")
    p.add_argument("--rows", type=int, default=50_000, help="test images (two per patient)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--summary-resamples", type=int, default=20, help="the summaries' bootstrap resamples")
    p.add_argument("--no-intervals", action="store_true", help="summaries without intervals: the report computes them")
    p.add_argument("--demo", action="store_true", help="the demo's shape: 4 runs, 250 test images, 6 epochs")
    p.add_argument("--searched", action="store_true",
                   help="the learning rate a searched key (sweep.json's searched: [train.lr]), not a factor")
    p.add_argument("--dir", type=Path, help="where the sweep is built (default: a folder under /tmp named by its shape)")
    p.add_argument("--first-only", action="store_true", help="only the first report (no cache yet)")
    p.add_argument("--comparison-costs", action="store_true",
                   help="only what one comparison costs at --rows images (5 seed pairs), no sweep")
    args = p.parse_args()
    if args.comparison_costs:
        print(comparison_costs(args.rows))
        return
    if args.demo:
        args.arms, args.lrs, args.seeds, args.rows, args.epochs = 4, 1, 1, 250, 6
    folder = args.dir or Path("/tmp") / f"report_scale_{args.arms}x{args.lrs}x{args.seeds}_{args.rows}"
    folder.mkdir(parents=True, exist_ok=True)
    sweep_file = write_sweep_file(folder / "sweep_file.yaml", args)
    built = build_sweep(folder / "sweep", sweep_file, args)
    runs = args.arms * args.lrs * args.seeds
    write_manifest(folder / "sweep", sweep_file, args)
    role = ("none (one rate)" if args.lrs == 1 else f"{LR_KEY} searched" if args.searched else f"{LR_KEY} a factor")
    print(f"{runs} runs x {args.rows} test images, {args.epochs} epochs, {role}: "
          + (f"built in {built:.0f} s" if built else "sweep reused") + f" ({folder / 'sweep'})")
    reports = folder / "reports"
    if reports.exists():
        shutil.rmtree(reports)
    reports.mkdir(parents=True)
    print("| report | CPU s | wall s | peak RSS MB | comparisons (made) | results.md lines | report.html MB | "
          "figures | largest figure (px) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cases = [("first (no cache)", None), ("again (nothing changed)", None), ("one predictions.csv rewritten", touch_one)]
    cases = cases[:1] if args.first_only else cases
    out = reports / "report"
    for label, change in cases:
        if change:
            change(folder / "sweep")
        found = run_report(folder / "sweep", out)
        print(f"| {label} | {found['cpu']:.1f} | {found['wall']:.1f} | {found['rss_mb']:.0f} | "
              f"{found['comparisons']} ({found['compared']}) | {found['md_lines']} | {found['html_mb']:.2f} | "
              f"{found['figures']} | {found['largest']} |", flush=True)


if __name__ == "__main__":
    main()
