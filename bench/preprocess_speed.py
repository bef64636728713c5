"""Preprocessing speed: dr_resnet.preprocess vs a naive full-decode numpy crop + resize, side by side.

Both run as a fresh process with 1 worker over the same EyePACS-sized synthetic JPEGs (process start
included), alternating, best of --repeats. Prints images/s of each and the speed-up.

    python bench/preprocess_speed.py [--images 16] [--height 3000] [--size 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The way the lab did it: decode every pixel, find the border with numpy, pad, resize, save.
NAIVE = r"""
import sys
from pathlib import Path
import numpy as np
from PIL import Image
src, dst, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
dst.mkdir(parents=True, exist_ok=True)
for path in sorted(src.glob("*.jpeg")):
    rgb = np.asarray(Image.open(path).convert("RGB"))
    mask = rgb.mean(axis=2) > 10
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    side = max(crop.shape[:2])
    square = np.zeros((side, side, 3), np.uint8)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS).save(dst / path.name, quality=95)
"""


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--height", type=int, default=3000, help="typical raw photo height (EyePACS: 1700-3500)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    from dr_resnet.data.synthetic import generate

    work = Path(tempfile.mkdtemp(prefix="bench_pre_"))
    try:
        raw = generate(work / "raw", {"train": args.images}, seed=1, fmt="kaggle", size=args.height,
                       workers=2, progress=False)
        mp = [__import__("PIL.Image").Image.open(f).size for f in sorted((raw / "train").glob("*.jpeg"))]
        mean_mp = sum(w * h for w, h in mp) / len(mp) / 1e6
        ours, naive = [], []
        for r in range(args.repeats):
            for d in ("ours", "naive"):
                shutil.rmtree(work / d, ignore_errors=True)
            ours.append(timed([sys.executable, "-m", "dr_resnet.preprocess", "--src", str(raw), "--dst",
                               str(work / "ours"), "--size", str(args.size), "--workers", "1"]))
            naive.append(timed([sys.executable, "-c", NAIVE, str(raw / "train"), str(work / "naive"),
                                str(args.size)]))
        n = args.images
        print(f"{n} synthetic EyePACS-like JPEGs, mean {mean_mp:.1f} MP, output {args.size}px, 1 worker, "
              f"process start included, best of {args.repeats}")
        print(f"naive full decode + numpy crop: {n / min(naive):6.1f} images/s ({min(naive):.2f} s)")
        print(f"dr_resnet.preprocess:           {n / min(ours):6.1f} images/s ({min(ours):.2f} s)")
        print(f"speed-up: {min(naive) / min(ours):.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
