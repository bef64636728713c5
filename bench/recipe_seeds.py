"""The fair recipe over seeds, against the issue's targets, and paired with the recipe before it.

Trains each arm (default: ResNet18 and ResNet50 from scratch) of configs/demo_sweep.yaml on every seed,
one run at a time (submitit's local executor would start them all at once), through the same
`launch.sweep --seeds` path as `make demo`: SWEEP_DIR/<arm>/seed<k>/. Finished runs are read, not
retrained (a run directory resumes), so the table can be printed again at no cost. Then, per arm:
seeds, collapses, accuracy minus the majority baseline and QWK (minimum, mean +- sd) at the epoch
chosen on the held-out part and at the final epoch, the first epoch whose test QWK reaches 0.5, and
whether the targets hold. Nothing is chosen on the test split.

--before DIR reads runs of the recipe before (same layout; made by the code of commit dd30c61, whose
demo recipe had no held-out part): their final epochs are paired seed by seed with this recipe's.

    python bench/recipe_seeds.py [--seeds 0 1 2 3 4] [--arms resnet18_scratch resnet50_scratch]
                                 [--data data/synthetic_128] [--out runs/recipe_seeds] [--before DIR]
                                 [--no-train] [overrides ...]
About 6.5 minutes (ResNet18) and 13.5 (ResNet50) a run alone on the project's 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from kappa_heads import ensure_data  # the demo's dataset, made if absent (bench/ is this script's folder)

from dr_resnet.results.metrics import collapse
from dr_resnet.results.rundir import is_finished as finished
from dr_resnet.results.rundir import read_metrics, selected_row

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"margin_min": 0.10, "qwk_min": 0.75, "qwk_sd_max": 0.05, "margin_mean_min": 0.15}


def train(out: Path, arm: str, seed: int, data: Path, overrides: list[str]) -> None:
    run_dir = out / arm / f"seed{seed}"
    if finished(run_dir):
        return
    log = out / f"{arm}_seed{seed}.log"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "launch.sweep", "--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor", "local",
           "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "240", "--runs", arm, "--seeds", str(seed), "--wait",
           "--out", str(out), f"data.root={data}", *overrides]
    started = time.perf_counter()
    with open(log, "a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    outcome = "done" if code == 0 else f"failed (see {log})"
    print(f"{arm} seed {seed}: {outcome} in {(time.perf_counter() - started) / 60:.1f} min",
          flush=True)


def run_figures(run_dir: Path) -> dict | None:
    """A finished run's figures at its selected and final epochs (None if it has not finished)."""
    if not finished(run_dir):
        return None
    rows = read_metrics(run_dir)
    majority = float(np.sum(rows[-1]["confusion_matrix"], axis=1).max() / np.sum(rows[-1]["confusion_matrix"]))
    chosen = selected_row(rows, "qwk")  # the run's own rule: held-out QWK, or its final epoch
    first = next((r["epoch"] for r in rows if r["test_qwk"] >= 0.5), None)
    return {"epochs": len(rows), "majority": majority, "on": "val" if "val_qwk" in rows[-1] else "final",
            "selected_epoch": chosen["epoch"], "margin": chosen["test_acc"] - majority, "qwk": chosen["test_qwk"],
            "collapsed": collapse(np.array(chosen["confusion_matrix"])),
            "final_margin": rows[-1]["test_acc"] - majority, "final_qwk": rows[-1]["test_qwk"],
            "final_collapsed": collapse(np.array(rows[-1]["confusion_matrix"])), "first_qwk_05": first}


def spread(values: list[float]) -> str:
    values = np.asarray(values, dtype=float)
    sd = f" +- {values.std(ddof=1):.3f}" if len(values) > 1 else ""
    return f"min {values.min():+.3f}, mean {values.mean():+.3f}{sd}"


def arm_table(name: str, runs: dict[int, dict], at: str = "") -> list[str]:
    """One arm's lines: per seed, then the summary and the targets (at the selected epoch, or at="final_")."""
    lines = []
    for seed, r in sorted(runs.items()):
        flag = r[f"{at}collapsed"] if at else r["collapsed"]
        epoch = r["epochs"] if at else r["selected_epoch"]
        lines.append(f"  seed {seed}: epoch {epoch} ({'final' if at or r['on'] == 'final' else 'held-out QWK'}), accuracy - "
                     f"majority {r[at + 'margin']:+.3f}, QWK {r[at + 'qwk']:.3f}, first epoch with QWK >= 0.5: "
                     f"{r['first_qwk_05'] or 'none'}{'  COLLAPSED: ' + flag if flag else ''}")
    margins, qwks = [r[at + "margin"] for r in runs.values()], [r[at + "qwk"] for r in runs.values()]
    collapses = sum(bool(r[f"{at}collapsed"] if at else r["collapsed"]) for r in runs.values())
    firsts = [r["first_qwk_05"] for r in runs.values() if r["first_qwk_05"]]
    lines.append(f"  {name}: n={len(runs)}, collapses {collapses}, accuracy - majority {spread(margins)}, QWK {spread(qwks)}, "
                 f"first epoch with QWK >= 0.5: mean {np.mean(firsts):.1f} ({len(firsts)} of {len(runs)} seeds)"
                 if firsts else f"  {name}: n={len(runs)}, collapses {collapses}, accuracy - majority {spread(margins)}, "
                                f"QWK {spread(qwks)}, no seed reached QWK 0.5")
    checks = {"no collapse": collapses == 0,
              f"every seed: accuracy >= majority + {TARGETS['margin_min']:.2f}": min(margins) >= TARGETS["margin_min"],
              f"every seed: QWK >= {TARGETS['qwk_min']}": min(qwks) >= TARGETS["qwk_min"],
              f"sd of QWK <= {TARGETS['qwk_sd_max']}": (np.std(qwks, ddof=1) <= TARGETS["qwk_sd_max"]) if len(qwks) > 1
              else None,
              f"mean accuracy >= majority + {TARGETS['margin_mean_min']:.2f}": np.mean(margins) >= TARGETS["margin_mean_min"]}
    verdict = {True: "met", False: "MISSED", None: "n/a (one seed)"}
    lines.append("  targets: " + "; ".join(f"{k}: {verdict[ok if ok is None else bool(ok)]}" for k, ok in checks.items()))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "synthetic_128")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="+", default=["resnet18_scratch", "resnet50_scratch"])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "recipe_seeds")
    p.add_argument("--before", type=Path, help="runs of the recipe before (SWEEP_DIR/<arm>/seed<k>/), read only")
    p.add_argument("--no-train", action="store_true", help="only read the runs there are")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = p.parse_args()
    if not args.no_train:
        ensure_data(args.data)
        for seed in args.seeds:
            for arm in args.arms:
                train(args.out, arm, seed, args.data.resolve(), args.overrides)
    for arm in args.arms:
        after = {k: f for k in args.seeds if (f := run_figures(args.out / arm / f"seed{k}"))}
        print(f"{arm}, this recipe ({args.out}), test split, nothing chosen on it:")
        if not after:
            print("  no runs")
            continue
        print(" at the selected epoch:")
        print("\n".join(arm_table("selected", after)))
        print(" at the final epoch:")
        print("\n".join(arm_table("final", after, at="final_")))
        if not args.before:
            continue
        before = {k: f for k in args.seeds if (f := run_figures(args.before / arm / f"seed{k}"))}
        if not before:
            continue
        print(f"{arm}, the recipe before ({args.before}), at its final epoch (its own choice was on test):")
        print("\n".join(arm_table("before", before, at="final_")))
        shared = sorted(set(before) & set(after))
        if shared:
            gains = [after[k]["qwk"] - before[k]["final_qwk"] for k in shared]
            print(f"  paired, seeds {shared}: QWK after (selected) - before (final) per seed "
                  f"{', '.join(f'{g:+.3f}' for g in gains)}; mean {np.mean(gains):+.3f}")


if __name__ == "__main__":
    main()
