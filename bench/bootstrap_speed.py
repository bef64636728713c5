"""How long the bootstrap intervals take: `stats.bootstrap_intervals` on simulated predictions, images
(and patients: two eyes each) x resamples. The target: 10,000 images x 2,000 resamples in seconds.

    python bench/bootstrap_speed.py [--images 10000] [--resamples 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dr_resnet.results import stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--resamples", type=int, default=2000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n = args.images
    labels = rng.choice(5, size=n, p=[0.73, 0.07, 0.15, 0.03, 0.02])
    grades = np.where(rng.random(n) < 0.8, labels, rng.integers(0, 5, size=n))
    scores = rng.random(n)
    for unit, names in (("images", None), ("patients", [f"{i // 2}_{'left' if i % 2 == 0 else 'right'}" for i in range(n)])):
        start = time.perf_counter()
        result = stats.bootstrap_intervals(labels, grades, scores, names, resamples=args.resamples)
        seconds = time.perf_counter() - start
        qwk = result["qwk"]
        print(f"{n} images, {args.resamples} resamples of {result['unit']}: {seconds:.1f} s "
              f"(QWK {qwk['value']:.3f}, 95% CI {qwk['low']:.3f}-{qwk['high']:.3f})")


if __name__ == "__main__":
    main()
