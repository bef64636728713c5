"""Print each split of a dataset: format, images, patients, grade balance, and the majority-class baseline
that accuracy must beat (about 73% on EyePACS); and the patients that two splits share (a test split that
shares patients with training gives optimistic figures). Validates every row on the way.

    python -m dr_resnet.describe DATA_ROOT [--format F] [data.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dr_resnet import GRADES, NUM_GRADES
from dr_resnet.data.formats import (
    DETECTED,
    PRESETS,
    DatasetError,
    TableOptions,
    add_format_arguments,
    find_splits,
    format_arguments,
    read_split,
    split_names,
)
from dr_resnet.errors import run_command
from dr_resnet.patients import identity_of, shared_patients
from dr_resnet.registry import DATASETS


def describe(root: str, fmt: str = "auto", options: TableOptions | None = None) -> str:
    found = find_splits(root) if fmt == "auto" else [(s, fmt) for s in split_names(Path(root), fmt, options)]
    if not found:
        hint = (f" ({fmt} format)" if fmt != "auto" else
                f": auto detects {', '.join(DETECTED)}; name another layout with --format "
                f"({' | '.join(DATASETS)}, as their publishers ship them, or csv with data.train_csv / data.test_csv)")
        raise DatasetError(f"no dataset split files found in {root}{hint}")
    lines = [f"{root}"]
    patients, source = {}, ""
    for name, split_format in found:
        split = read_split(root, name, split_format, options, unlabelled_ok=True)
        patients[name], source = split.patients, source or split.patient_source
        if not split.labelled:
            lines.append(f"  {name} ({split_format}): {len(split.names)} images, unlabelled (prediction only: "
                         f"{split.index_file.name} has no grades)")
            continue
        counts = np.bincount(split.labels, minlength=NUM_GRADES)
        total = counts.sum()
        shares = "  ".join(f"{g.split()[0]}: {c} ({c / total:.1%})" for g, c in zip(GRADES, counts))
        lines.append(f"  {name} ({split_format}): {total} images, {len(set(split.patients))} patients   {shares}   "
                     f"majority baseline {counts.max() / total:.1%}")
        lines += [f"    {line} ({split.index_file.name})" for line in split.left_out]
        if split_format in PRESETS:  # parts of it the dataset names (EyePACS' public and private leaderboard halves)
            for view in PRESETS[split_format].views:
                part = read_split(root, view, split_format, options)
                if PRESETS[split_format].tables[view][0] == split.index_file.name:
                    lines.append(f"    of which {view}: {len(part.names)} images "
                                 f"({' '.join(f'{c}={v}' for c, v in part.table.filters)})")
    lines.append(f"  patients: {identity_of([p for found in patients.values() for p in found], source)}")
    names = list(patients)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = shared_patients(patients[a], patients[b])
            lines.append(f"  patients in both '{a}' and '{b}': {len(both)}"
                         + (f" (e.g. {both[0]!r}): figures tested on one after training on the other may be optimistic"
                            if both else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    p = argparse.ArgumentParser(prog="python -m dr_resnet.describe", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="dataset folder")
    add_format_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    return run_command(lambda: print(describe(args.root, *format_arguments(args))))


if __name__ == "__main__":
    sys.exit(main())
