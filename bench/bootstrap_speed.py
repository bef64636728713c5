"""How long the bootstrap intervals take and how much memory they hold at their peak (resident, above
what the process held before: Linux's VmHWM, reset first): `stats.bootstrap_intervals` on simulated
predictions, images (and patients: two eyes each) x resamples. The target: 10,000 images x 2,000
resamples in seconds; at 50,000 images, a peak in the low hundreds of MB (stats.CHUNK_BYTES).

    python bench/bootstrap_speed.py [--images 10000] [--resamples 2000] [--unit images|patients|both]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dr_resnet.patients import patients_of
from dr_resnet.results import stats


def resident_mb(key: str) -> float | None:
    """The process's resident memory (VmRSS) or its peak (VmHWM) in MB; None where /proc cannot say."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    line = next((x for x in status.read_text().splitlines() if x.startswith(key + ":")), None)
    return int(line.split()[1]) / 1024 if line else None


def reset_peak() -> bool:
    """Start VmHWM again from the current resident memory (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--unit", choices=("images", "patients", "both"), default="both",
                   help="what is resampled (one alone: its peak memory is not blurred by the other's)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n = args.images
    labels = rng.choice(5, size=n, p=[0.73, 0.07, 0.15, 0.03, 0.02])
    grades = np.where(rng.random(n) < 0.8, labels, rng.integers(0, 5, size=n))
    scores = rng.random(n)
    eyes = [f"{i // 2}_{'left' if i % 2 == 0 else 'right'}" for i in range(n)]
    for unit, names in (("images", None), ("patients", patients_of(eyes))):  # the names' patients: two eyes each
        if args.unit not in (unit, "both"):
            continue
        before, peak_known = resident_mb("VmRSS"), reset_peak()
        start, cpu = time.perf_counter(), time.process_time()
        result = stats.bootstrap_intervals(labels, grades, scores, names, resamples=args.resamples)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        peak = resident_mb("VmHWM") if peak_known and before is not None else None
        qwk = result["qwk"]
        memory = f", peak {peak - before:.0f} MB above the {before:.0f} MB before" if peak is not None else ""
        print(f"{n} images, {args.resamples} resamples of {result['unit']}: {seconds:.1f} s ({cpu:.1f} CPU s{memory}; "
              f"QWK {qwk['value']:.3f}, 95% CI {qwk['low']:.3f}-{qwk['high']:.3f})")


if __name__ == "__main__":
    main()
