"""Depth compared fairly on the demo data: the scratch arms (depth) tuned at equal budgets, then compared.

1. `launch.sweep --config configs/demo_tune.yaml --tune N --seeds S`: N learning rates an arm (ResNet18 and
   ResNet50 from scratch) on seed --tune-seed, each arm's winner chosen on held-out QWK only, the winners on
   the seeds S (SWEEP/<arm>/<trial>/seed<k>/).
2. The learning curve at the winners' rates: data.train_fraction (nested, whole patients) on the same seeds
   (SWEEP/curve/...; the fraction 1.0 is phase 2 itself).
3. The report over both (expected-best curves, the curve over data.train_fraction with the paired
   differences at each fraction, epochs to 95%), and its figures copied to docs/results/figures/.
4. With --ema D1,D2: train.ema (0 and each decay) for ResNet18 at its winning rate on the same seeds, in a
   folder of its own (--out + "_ema": its train.ema=0 runs repeat phase 2's, which would count twice in
   one report), and its report (the spread over seeds with and without).
The pretrained arms need ImageNet weights, which cannot be downloaded here: they are left out. Finished
runs are read, not retrained: run it again to print the tables at no cost.

    python bench/tune_demo.py [--trials 6] [--seeds 1,2,3] [--fractions 0.1,0.25,0.5] [--out runs/demo_tune]
                              [--ema 0.9,0.98]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ARMS = ("resnet18_scratch", "resnet50_scratch")
LOCAL = ["--executor", "local", "--tasks-per-node", "2", "--cpus-per-task", "1", "--parallel", "1", "--time", "240"]


def ensure_data(data: Path, size: int) -> None:
    """The demo's raw photos (what `make demo` makes), prepared at `size` px, made if absent."""
    if data.is_dir():
        return
    raw = data.parent / "synthetic_raw"
    if not raw.is_dir():
        subprocess.run([sys.executable, "-m", "dr_resnet.synthetic", "--out", str(raw), "--train", "1000", "--test", "250",
                        "--size", "256", "--seed", "0"], check=True, cwd=REPO)
    subprocess.run([sys.executable, "-m", "dr_resnet.preprocess", "--src", str(raw), "--dst", str(data), "--size",
                    str(size)], check=True, cwd=REPO)


def sweep(argv: list[str], log: Path) -> float:
    """One launch.sweep command, its output in `log`; minutes taken."""
    started = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ python -m launch.sweep {' '.join(argv)}\n")
        f.flush()
        code = subprocess.run([sys.executable, "-m", "launch.sweep", *argv], stdout=f, stderr=subprocess.STDOUT,
                              cwd=REPO).returncode
    if code:
        sys.exit(f"launch.sweep failed (exit {code}): see {log}")
    return (time.perf_counter() - started) / 60


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--fractions", default="0.1,0.25,0.5")
    p.add_argument("--out", default="runs/demo_tune")
    p.add_argument("--data", default="data/synthetic_64")
    p.add_argument("--figures", default="docs/results/figures", help="where the report's figures are copied")
    p.add_argument("--ema", default="", help="train.ema decays to compare with 0 (ResNet18, its winning rate)")
    args = p.parse_args()
    out, data = (REPO / args.out).resolve(), (REPO / args.data).resolve()
    ensure_data(data, 64)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    common = [f"data.root={data}"]
    minutes = sweep(["--config", "configs/demo_tune.yaml", *LOCAL, "--tune", str(args.trials), "--seeds", args.seeds,
                     "--runs", ",".join(ARMS), "--out", str(out), *common], log)
    print(f"tuning, phase 1 and 2: {minutes:.1f} min")
    choice = json.loads((out / "tuning.json").read_text())
    winners = {arm: choice["arms"][arm]["winner"]["values"] for arm in ARMS}
    curve_file = out / "curve.yaml"
    curve_file.write_text(yaml.safe_dump({
        "name": "demo_tune_curve", "config": str(REPO / "configs" / "demo.yaml"),
        "arms": {arm: [f"model.depth={arm[6:8]}", "model.weights=none"] for arm in ARMS},
        "overrides": ["data.image_size=64"],
        "grid": {"data.train_fraction": args.fractions.split(","),
                 "arms": {arm: {k: [v] for k, v in values.items()} for arm, values in winners.items()}}}))
    minutes = sweep(["--config", str(curve_file), *LOCAL, "--seeds", args.seeds, "--out", str(out / "curve"), *common], log)
    print(f"learning curve: {minutes:.1f} min")
    subprocess.run([sys.executable, "-m", "dr_resnet.report", str(out)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    print((out / "results.md").read_text())
    figures = REPO / args.figures
    figures.mkdir(parents=True, exist_ok=True)
    for name in ("expected_best.png", "factor_data_train_fraction.png"):
        if (out / name).is_file():
            shutil.copy2(out / name, figures / f"demo_tune_{name}")
            print(f"figure: {figures / f'demo_tune_{name}'}")
    if args.ema:
        ema_out = out.with_name(out.name + "_ema")
        ema_out.mkdir(parents=True, exist_ok=True)
        ema_file = ema_out / "ema.yaml"
        ema_file.write_text(yaml.safe_dump({
            "name": "demo_tune_ema", "config": str(REPO / "configs" / "demo.yaml"),
            "arms": {"resnet18_scratch": ["model.depth=18", "model.weights=none"]},
            "overrides": ["data.image_size=64", *(f"{k}={v}" for k, v in winners["resnet18_scratch"].items())],
            "grid": {"train.ema": ["0", *args.ema.split(",")]}}))
        minutes = sweep(["--config", str(ema_file), *LOCAL, "--seeds", args.seeds, "--out", str(ema_out), *common], log)
        print(f"weight EMA: {minutes:.1f} min")
        subprocess.run([sys.executable, "-m", "dr_resnet.report", str(ema_out)], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        print((ema_out / "results.md").read_text())
        if (ema_out / "factor_train_ema.png").is_file():
            shutil.copy2(ema_out / "factor_train_ema.png", figures / "demo_tune_factor_train_ema.png")


if __name__ == "__main__":
    main()
