"""Patient-level train/test split: no patient's eyes on both sides, stratified by grade.

EyePACS names are <patient>_left / <patient>_right; a per-image split (the common lab split) can put a
patient's two eyes on both sides, and the near-duplicate eye inflates test scores. This pools every
split under SRC, groups images by patient, moves whole patients to the test side until its grade
balance matches the whole's, and writes DST in the same format (images hard-linked, or copied across
file systems).

    python -m dr_resnet.split --src DIR --dst DIR --test-fraction 0.2 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dr_resnet import NUM_GRADES
from dr_resnet.data.formats import (
    DatasetError,
    SplitLayout,
    TableOptions,
    add_format_arguments,
    find_splits,
    format_arguments,
    image_stem,
    read_split,
    split_names,
)
from dr_resnet.errors import run_command
from dr_resnet.registry import FORMATS
from dr_resnet.seeds import derive_seed

log = logging.getLogger("dr_resnet.split")
WRITTEN_AS = {"eyepacs": "kaggle"}  # published layouts split writes, and the layout it writes them in
EYEPACS_MARK = "retinopathy_solution.csv"  # the released test labels: an EyePACS root as shipped

def assign(patients: dict[str, list[int]], labels: np.ndarray, test_fraction: float, seed: int) -> set[str]:
    """The patients that go to test. Patients are shuffled, patients whose worse eye has a rarer grade
    come first, and each joins the test side when that brings its per-grade image counts closer (L1)
    to test_fraction of the whole's; local searches then improve that (_balance_counts, _refine). Whole
    patients move, so no one sits on both sides."""
    rng = np.random.default_rng(derive_seed(seed, "holdout"))
    names = sorted(patients)
    names = [names[i] for i in rng.permutation(len(names))]
    counts = {p: np.bincount(labels[patients[p]], minlength=NUM_GRADES) for p in names}
    frequency = np.bincount(labels, minlength=NUM_GRADES)
    names.sort(key=lambda p: frequency[int(labels[patients[p]].max())])  # stable: the shuffle orders ties
    target = test_fraction * frequency
    current = np.zeros(NUM_GRADES)
    test = set()
    for patient in names:
        if np.abs(current + counts[patient] - target).sum() < np.abs(current - target).sum():
            test.add(patient)
            current += counts[patient]
    test = _balance_counts(names, counts, test, frequency, test_fraction)
    return _refine(names, counts, test, frequency, test_fraction)


def holdout_mask(patients: Sequence[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the images whose patients (one id per image: dr_resnet.patients) go to the held-out side
    (stratified, whole patients)."""
    labels = np.asarray(labels, dtype=np.int64)
    images: dict[str, list[int]] = defaultdict(list)
    for i, patient in enumerate(patients):
        images[patient].append(i)
    held_out = assign(images, labels, fraction, seed)
    return np.array([patient in held_out for patient in patients], dtype=bool)


def nested_share(patients: Sequence[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the images of the first `fraction` of the patients (at least one a stratum) in one order
    drawn by `seed`, taken per stratum (the patient's worse grade): the patients of a smaller fraction are
    all in every larger fraction's, whatever the fractions, and each grade keeps its share."""
    labels = np.asarray(labels, dtype=np.int64)
    worst: dict[str, int] = {}
    for patient, label in zip(patients, labels):
        worst[patient] = max(worst.get(patient, 0), int(label))
    rng = np.random.default_rng(derive_seed(seed, "subset"))
    names = sorted(worst)
    order = [names[i] for i in rng.permutation(len(names))]
    chosen: set[str] = set()
    for grade in sorted(set(worst.values())):
        stratum = [p for p in order if worst[p] == grade]
        chosen.update(stratum[:max(1, math.ceil(fraction * len(stratum) - 1e-9))])
    return np.array([patient in chosen for patient in patients], dtype=bool)


def _balance_counts(names: list[str], counts: dict[str, np.ndarray], test: set[str], frequency: np.ndarray,
                    test_fraction: float) -> set[str]:
    """The greedy pass's test side improved by a local search: move one patient across, or swap one for one,
    while that brings the side's per-grade image counts closer (squared distance) to test_fraction of the
    whole's, which sets its size and its grade shares at once. Patients with the same counts are alike to
    it, so moves are searched among kinds of patients (a few dozen count vectors, whatever the dataset's
    size), and of a kind the first in the seeded order moves. Single moves alone (_refine) stall where
    patients' eyes differ in grade: scikit-learn's StratifiedGroupKFold then came closer to the whole's
    shares by up to six images' worth; with this search first, within one (tests/test_oracles.py)."""
    matrix = np.stack([counts[p] for p in names]).astype(float)
    in_test = np.array([p in test for p in names])
    target = test_fraction * frequency
    kinds, kind_of = np.unique(matrix, axis=0, return_inverse=True)
    kind_of = kind_of.reshape(-1)
    nobody = np.zeros((1, matrix.shape[1]))

    def cost(side_counts: np.ndarray) -> np.ndarray:
        return ((side_counts - target) ** 2).sum(axis=-1)

    current = matrix[in_test].sum(axis=0)
    for _ in range(len(names)):  # each step lowers the cost, so the search ends; a bound it never reaches
        leaving = np.flatnonzero(np.bincount(kind_of[in_test], minlength=len(kinds)))  # kinds on the test side
        joining = np.flatnonzero(np.bincount(kind_of[~in_test], minlength=len(kinds)))
        moved = (current - np.concatenate([nobody, kinds[leaving]])[:, None, :]
                 + np.concatenate([nobody, kinds[joining]])[None, :, :])  # row 0: none leaves; column 0: none joins
        costs = cost(moved)
        costs[0, 0] = np.inf
        i, j = np.unravel_index(int(costs.argmin()), costs.shape)
        if costs[i, j] >= cost(current) - 1e-9:
            break
        if i:
            in_test[np.flatnonzero(in_test & (kind_of == leaving[i - 1]))[0]] = False
        if j:
            in_test[np.flatnonzero(~in_test & (kind_of == joining[j - 1]))[0]] = True
        current = moved[i, j]
    return {p for p, t in zip(names, in_test) if t}


def _refine(names: list[str], counts: dict[str, np.ndarray], test: set[str], frequency: np.ndarray,
            test_fraction: float, rounds: int = 500) -> set[str]:
    """Move single patients across while that lowers the test side's worst grade-share deviation from
    the whole's plus its size deviation (the passes before balance counts, not shares)."""
    matrix = np.stack([counts[p] for p in names]).astype(float)
    in_test = np.array([p in test for p in names])
    whole, size_target = frequency / frequency.sum(), test_fraction * frequency.sum()

    def cost(side_counts: np.ndarray) -> np.ndarray:
        sizes = side_counts.sum(axis=-1, keepdims=True)
        shares = side_counts / np.maximum(sizes, 1)
        return np.abs(shares - whole).max(axis=-1) + np.abs(sizes[..., 0] - size_target) / frequency.sum()

    for _ in range(rounds):
        current = matrix[in_test].sum(axis=0)
        moved = current + np.where(in_test, -1.0, 1.0)[:, None] * matrix  # every single move at once
        costs = cost(moved)
        best = int(costs.argmin())
        if costs[best] >= cost(current) - 1e-12:
            break
        in_test[best] = not in_test[best]
    return {p for p, t in zip(names, in_test) if t}


def _place(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system: fall back to a copy
            pass
    shutil.copy2(src, dst)


def balance(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels, minlength=NUM_GRADES) / max(1, len(labels))


def split(src: str | Path, dst: str | Path, test_fraction: float, seed: int = 0, fmt: str = "auto",
          copy: bool = False, say: Callable[[str], None] = log.info, options: TableOptions | None = None
          ) -> dict[str, tuple[list[str], np.ndarray, list[str]]]:
    """Write DST's train and test splits from every labelled split under SRC (an unlabelled one, such as
    APTOS's test.csv, is prediction only: left out, and `say` is told); returns {side: (names, labels,
    patients)}."""
    src, dst = Path(src), Path(dst)
    if fmt == "auto" and (src / EYEPACS_MARK).is_file():  # its trainLabels.csv alone would look like kaggle
        say(f"{src / EYEPACS_MARK} found: EyePACS as shipped (--format eyepacs), its train and test splits pooled")
        fmt = "eyepacs"
    if fmt not in ("auto", *FORMATS, *WRITTEN_AS):
        raise DatasetError(f"split writes the lab, kaggle and aptos layouts, and EyePACS as shipped (as kaggle); "
                           f"--format {fmt} is read but not written: train on it as it is, or hold out by patient with "
                           f"data.val_fraction and data.patient_column")
    if fmt in WRITTEN_AS:
        found = [(name, fmt) for name in split_names(src, fmt, options)]
    else:
        found = find_splits(src)
        if fmt != "auto":
            found = [(name, f) for name, f in found if f == fmt]
    if not found:
        raise DatasetError(f"no dataset split files found in {src}")
    formats = {f for _, f in found}
    if len(formats) > 1:
        raise DatasetError(f"{src} holds splits of several formats ({', '.join(sorted(formats))}): name one with --format")
    if dst.resolve() == src.resolve():
        raise DatasetError("--dst must differ from --src")
    fmt = formats.pop()
    say(f"pooling the {fmt} split(s) {', '.join(name for name, _ in found)} of {src}")
    names, paths, labels, patients = [], [], [], []
    for name, _ in found:
        part = read_split(src, name, fmt, options, unlabelled_ok=True)
        if not part.labelled:
            say(f"left out the '{name}' split: {part.index_file.name} has no grades (prediction only)")
            continue
        for line in part.left_out:  # the dataset's own rules (ungradable rows, a filter)
            say(f"{name}: {line} ({part.index_file.name})")
        names += part.names
        paths += part.paths
        labels += part.labels.tolist()
        patients += part.patients
    if not names:
        raise DatasetError(f"{src}: no split has grades ({', '.join(n for n, _ in found)}): nothing to split")
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise DatasetError(f"{src}: image names appear in more than one split: {duplicates[:10]}")
    labels_arr = np.asarray(labels, dtype=np.int64)
    in_test = holdout_mask(patients, labels_arr, test_fraction, seed)
    sides = {"train": np.flatnonzero(~in_test).tolist(), "test": np.flatnonzero(in_test).tolist()}
    result = {}
    for side, rows in sides.items():
        layout = SplitLayout.of(dst, side, WRITTEN_AS.get(fmt, fmt))
        layout.image_dirs[0].mkdir(parents=True, exist_ok=True)
        for i in rows:
            _place(paths[i], layout.image_path(image_stem(names[i]), paths[i].suffix), copy)
        layout.write_index([names[i] for i in rows], labels_arr[rows])
        result[side] = ([names[i] for i in rows], labels_arr[rows], [patients[i] for i in rows])
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    p = argparse.ArgumentParser(prog="python -m dr_resnet.split", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="dataset folder (all its splits are pooled)")
    p.add_argument("--dst", required=True, help="output dataset folder (train and test splits, same format)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="the test side's share of the images (whole patients)")
    p.add_argument("--seed", type=int, default=0, help="which patients go to the test side")
    p.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    add_format_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    if not 0 < args.test_fraction < 1:
        p.error("--test-fraction must be between 0 and 1")

    def work() -> None:
        fmt, options = format_arguments(args)
        _report(split(args.src, args.dst, args.test_fraction, args.seed, fmt, args.copy, say=print, options=options))
    return run_command(work)


def _report(result: dict) -> None:
    """The split's table: images, patients and grade shares per side."""
    everything = np.concatenate([labels for _, labels, _ in result.values()])
    every_patient = [p for _, _, patients in result.values() for p in patients]
    print(f"{'side':<6} {'images':>7} {'patients':>8}   " + "  ".join(f"grade {g}" for g in range(NUM_GRADES)))
    for side, (labels, patients) in [("all", (everything, every_patient))] + [(k, (v[1], v[2])) for k, v in result.items()]:
        shares = "  ".join(f"{100 * b:6.1f}%" for b in balance(labels))
        print(f"{side:<6} {len(labels):>7} {len(set(patients)):>8}   {shares}")


if __name__ == "__main__":
    sys.exit(main())
