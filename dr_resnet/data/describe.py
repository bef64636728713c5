"""Print each split of a dataset: format, images, grade balance, and the majority-class baseline that
accuracy must beat (about 73% on EyePACS). Validates every row on the way.

    python -m dr_resnet.describe DATA_ROOT
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from dr_resnet import GRADES, NUM_GRADES
from dr_resnet.errors import run_command
from dr_resnet.data.formats import DatasetError, find_splits, read_split


def describe(root: str) -> str:
    found = find_splits(root)
    if not found:
        raise DatasetError(f"no dataset split files found in {root}")
    lines = [f"{root}"]
    for name, fmt in found:
        split = read_split(root, name, fmt)
        counts = np.bincount(split.labels, minlength=NUM_GRADES)
        total = counts.sum()
        shares = "  ".join(f"{g.split()[0]}: {c} ({c / total:.1%})" for g, c in zip(GRADES, counts))
        lines.append(f"  {name} ({fmt}): {total} images   {shares}   majority baseline {counts.max() / total:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dr_resnet.describe", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="dataset folder (lab, kaggle or aptos layout)")
    args = p.parse_args(argv)
    return run_command(lambda: print(describe(args.root)))


if __name__ == "__main__":
    sys.exit(main())
