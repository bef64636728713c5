"""How often the arms' comparison claims a difference that is not there, and how often it finds one that is:
simulated experiments (dr_resnet.results.simulation) at the seed counts people use, beside a t-test on the seed
pairs' differences alone (the test set taken as fixed). Prints one row per setting.

    python bench/calibration.py [--replications 2000]
"""

from __future__ import annotations

import argparse
import math
import time

from dr_resnet.results.simulation import Setting, claims
from dr_resnet.results.stats import power


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replications", type=int, default=2000)
    args = p.parse_args()
    settings = [Setting(s, sd, pe) for s in (1, 2, 3, 5, 10) for sd in (0.03, 0.12, 0.3) for pe in (0.0, 0.8)
                if s > 1 or sd == 0.03]
    settings += [Setting(5, 0.12, 0.0, effect=e) for e in (0.2, 0.37)]
    mc = math.sqrt(0.05 * 0.95 / args.replications)
    print(f"{args.replications} replications a setting; 125 two-eyed patients; Monte-Carlo error of 5%: {mc:.3%}")
    print("seeds | seed sd | patient effect | effect | claims (95% CI excludes 0) | seed pairs alone | "
          "effect in sd of one pair | non-central t predicts")
    start = time.perf_counter()
    for s in settings:
        found = claims(s, args.replications, seed=s.seeds)
        naive = "-" if found["naive_claimed"] is None else f"{found['naive_claimed']:.1%}"
        ratio = found["mean_difference"] / found["sd_difference"]
        predicted = f"{power(ratio, s.seeds - 1, 0.95):.1%}" if s.effect and s.seeds > 1 else "-"
        size = f"{ratio / math.sqrt(s.seeds):.2f}" if s.effect else "-"
        print(f"{s.seeds} | {s.seed_sd} | {s.patient_effect} | {s.effect} | {found['claimed']:.1%} | {naive} | "
              f"{size} | {predicted}", flush=True)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
