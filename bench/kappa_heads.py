"""Cross-entropy vs the regression and ordinal heads on the demo scale, same seeds, side by side.

Each arm trains configs/demo.yaml (ResNet18 from scratch, 128 px, 6 epochs) under torchrun with 2
processes for every seed, then one table prints each run's test QWK at the final epoch and, with
--val-fraction, at the epoch chosen on the held-out images; then the means per arm. The column "on
test (optimistic)" shows what choosing the epoch on the test split would give: never a result.
Finished runs under --out are read, not retrained (a run directory resumes), so the table can be
re-printed at no cost. Roughly 3-4 minutes a run on 2 CPU cores.

    python bench/kappa_heads.py [--data data/synthetic_128] [--seeds 0 1 2] [--arms ce reg ord]
                                [--val-fraction 0.1] [--out runs/bench_kappa_heads]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from dr_resnet.results.rundir import read_metrics, selected_row

REPO = Path(__file__).resolve().parent.parent
REGRESSION = ["model.head=regression", "train.clip_grad_norm=1.0"]
ARMS = {
    "ce": [],  # cross-entropy, argmax
    "reg": REGRESSION + ["regression.fit_thresholds=train"],  # thresholds fitted on an eval-mode pass over train
    "regbatches": REGRESSION + ["regression.fit_thresholds=batches"],  # ...on the epoch's augmented outputs
    "regval": REGRESSION + ["regression.fit_thresholds=val"],  # ...on the held-out images (needs --val-fraction)
    "ord": ["model.head=ordinal"],  # four "grade > k" outputs, consistent decoding
}


def ensure_data(root: Path) -> None:
    """The demo's dataset (what `make demo` writes), made if absent."""
    if root.is_dir():
        return
    raw = root.parent / "synthetic_raw"
    for cmd in (["dr_resnet.synthetic", "--out", str(raw), "--train", "1000", "--test", "250", "--size", "256", "--seed", "0"],
                ["dr_resnet.preprocess", "--src", str(raw), "--dst", str(root), "--size", "128"]):
        subprocess.run([sys.executable, "-m", *cmd], check=True, cwd=REPO)


def train(run_dir: Path, data: Path, seed: int, val_fraction: float, overrides: list[str]) -> None:
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dr_resnet.train", "--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}",
           f"train.seed={seed}", f"data.val_fraction={val_fraction}", "data.min_val_images=1", f"output.dir={run_dir}",
           *overrides]
    with open(log, "a") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode:
            sys.exit(f"{run_dir.name} failed: see {log}")


def scores(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    on_test = selected_row(rows, "qwk", on="test")
    result = {"on test (optimistic)": on_test["test_qwk"], "final": rows[-1]["test_qwk"], "final acc": rows[-1]["test_acc"]}
    if "val_qwk" in rows[-1]:
        result["chosen on held-out"] = selected_row(rows, "qwk", on="val")["test_qwk"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "synthetic_128")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=["ce", "reg"])
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_kappa_heads")
    args = p.parse_args()
    if "regval" in args.arms and not args.val_fraction:
        p.error("arm regval needs --val-fraction")
    ensure_data(args.data)
    table: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            run_dir = args.out / f"{arm}_s{seed}"
            train(run_dir, args.data.resolve(), seed, args.val_fraction, ARMS[arm])
            table.setdefault(arm, []).append(scores(run_dir))
    columns = list(next(iter(table.values()))[0])
    print("test QWK (and final accuracy) per run; 250 test images, so ~0.01 QWK is within noise")
    print(f"{'arm':<11}{'seed':<6}" + "".join(f"{c:>20}" for c in columns))
    for arm, runs in table.items():
        for seed, run in zip(args.seeds, runs):
            print(f"{arm:<11}{seed:<6}" + "".join(f"{run[c]:>20.4f}" for c in columns))
    for arm, runs in table.items():
        print(f"{arm:<11}{'mean':<6}" + "".join(f"{sum(r[c] for r in runs) / len(runs):>20.4f}" for c in columns))


if __name__ == "__main__":
    main()
