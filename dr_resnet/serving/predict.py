"""Grade new fundus photos with a trained model: a training checkpoint or an exported model (ONNX,
TorchScript). Raw photos of any size are prepared in memory by preprocess's own code, as the model's
recipe says; photos already prepared for it are used as they are.

    python -m dr_resnet.predict --checkpoint RUN/checkpoint_best.pt --images PHOTO_OR_FOLDER_OR_CSV ... \
        [--out predictions.csv] [--tta flips] [--batch-size N] [--workers N] [--device auto|cpu|cuda] [--cam DIR]

One CSV row per input image, in input order; an image that cannot be graded gets its row with the reason
in the `error` column and the batch goes on. Exit code 0, or 1 when every image failed (--strict: any).
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dr_resnet import processes
from dr_resnet.data.formats import add_format_arguments, format_arguments, read_split
from dr_resnet.data.preprocess import BadImageError
from dr_resnet.data.recipe import Recipe
from dr_resnet.errors import UserError, run_command
from dr_resnet.files import atomic_write
from dr_resnet.registry import HEAD_SPECS
from dr_resnet.results.metrics import REFERABLE_GRADE
from dr_resnet.results.predictions import value_columns
from dr_resnet.serving.grading import Grader, ModelLoadError, load_grader
from dr_resnet.training.loop import TTA_MODES
from dr_resnet.training.runtime import DEVICES, select_device

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff")
CSV_IMAGE_COLUMNS = ("image", "path", "file", "filename", "id_code")  # the first one present names the images


class InputError(UserError, ValueError):
    """The --images arguments cannot be listed (a CSV without an image column, nothing found...)."""


def _image_of(name: str, folder: Path) -> Path:
    """A CSV's entry as a path: relative to the CSV's folder; without a suffix, the first image file of that
    name (Kaggle and APTOS CSVs name images without one)."""
    path = Path(name) if Path(name).is_absolute() else folder / name
    if path.suffix.lower() in IMAGE_SUFFIXES or path.exists():
        return path
    for suffix in IMAGE_SUFFIXES:
        if path.with_name(path.name + suffix).is_file():
            return path.with_name(path.name + suffix)
    return path


def _read_csv(path: Path) -> list[Path]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        column = next((columns[c] for c in CSV_IMAGE_COLUMNS if c in columns), None)
        if column is None:
            raise InputError(f"{path}: no image column (one of {', '.join(CSV_IMAGE_COLUMNS)}) in its header "
                             f"{reader.fieldnames}")
        images = []
        for row_number, row in enumerate(reader, start=2):
            name = (row[column] or "").strip()
            if not name:
                raise InputError(f"{path}: row {row_number} has an empty {column!r}")
            images.append(_image_of(name, path.parent))
    return images


def list_images(inputs: list[str]) -> list[Path]:
    """Every image the arguments name, in order: files as given, folders' images recursively (sorted),
    CSVs' image column. A named file that does not exist is kept: its row reports it."""
    images: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise InputError(f"{path}: a folder without images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)")
            images += found
        elif path.suffix.lower() == ".csv" and path.is_file():
            images += _read_csv(path)
        else:
            images.append(path)
    if not images:
        raise InputError("no images given")
    return images


class PhotoDataset(Dataset):
    """Item i: (the uint8 image the model gets, i, "") or, when photo i cannot be used, (zeros, i, why)."""

    def __init__(self, paths: list[Path], recipe: Recipe) -> None:
        self.paths, self.recipe = paths, recipe

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        size = self.recipe.image_size
        if not self.paths[i].is_file():
            return torch.zeros(3, size, size, dtype=torch.uint8), i, f"{self.paths[i]}: no such file"
        try:
            return self.recipe.prepare(self.paths[i]), i, ""
        except BadImageError as exc:
            return torch.zeros(3, size, size, dtype=torch.uint8), i, str(exc)


def columns(head_kind: str) -> list[str]:
    """The CSV's columns for a head: what it reports per image (predictions.value_columns: grade
    probabilities, or the regression score followed by the thresholds that cut it)."""
    reported = value_columns(head_kind) + (["thresholds"] if HEAD_SPECS[head_kind].has_thresholds else [])
    return ["path", "grade", *reported, "referable_score", "referable", "error"]


@dataclass
class Counts:
    graded: int = 0
    failed: int = 0


def _cam_names(paths: list[Path]) -> list[str]:
    """A heat map's file name per image: its stem, with its row number where two stems are the same."""
    stems = [p.stem for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{i}.png" if s in repeated else f"{s}.png" for i, s in enumerate(stems)]


def predict(grader: Grader, paths: list[Path], out: Path, tta: str = "none", batch_size: int = 32, workers: int = 2,
            cam_dir: Path | None = None, progress: bool = True) -> Counts:
    """Grade every photo, write `out` (rows in input order), and heat maps into cam_dir."""
    from tqdm import tqdm

    if cam_dir is not None:
        from dr_resnet.serving.cam import overlay, require_captum  # matplotlib, captum: only for heat maps

        if grader.network is None:
            raise ModelLoadError(f"heat maps (--cam) need the PyTorch network: pass the training checkpoint, "
                                 f"not the {grader.source} export")
        require_captum()
        cam_dir.mkdir(parents=True, exist_ok=True)
        cam_names = _cam_names(paths)
    loader = DataLoader(PhotoDataset(paths, grader.recipe), batch_size=batch_size, num_workers=workers,
                        pin_memory=grader.device.type == "cuda",
                        **({"multiprocessing_context": processes.context(),
                            "worker_init_fn": functools.partial(processes.default_stop_signals, os.getpid())}
                           if workers > 0 else {}))
    thresholds = " ".join(f"{t:g}" for t in grader.head_state.get("thresholds", []))
    header = columns(grader.head_kind) + (["cam"] if cam_dir is not None else [])
    counts = Counts()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, newline="") as f, tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        writer = csv.writer(f)
        writer.writerow(header)
        for images, indices, errors in loader:
            ok = torch.tensor([not e for e in errors], dtype=torch.bool)
            # The batch as the loader pinned it when every photo decoded (indexing copies it to pageable
            # memory, whose copy to the GPU can no longer overlap); only the good ones otherwise.
            good = images if ok.all() else images[ok]
            graded = grader.grade(good, tta) if ok.any() else None
            maps = _heat_maps(grader, good, graded) if cam_dir is not None and graded is not None else None
            k = 0
            for j, (i, error) in enumerate(zip(indices.tolist(), errors)):
                row = {"path": str(paths[i]), "error": error}
                if not error:
                    row.update(_reported(grader.head_kind, graded, k, thresholds))
                    if maps is not None:
                        overlay(images[j], maps[k]).save(cam_dir / cam_names[i])
                        row["cam"] = str(cam_dir / cam_names[i])
                    k += 1
                    counts.graded += 1
                else:
                    counts.failed += 1
                writer.writerow([row.get(c, "") for c in header])
            bar.update(len(errors))
    return counts


def _reported(head_kind: str, graded, k: int, thresholds: str) -> dict:
    grade = int(graded.grades[k])
    row = {"grade": grade, "referable_score": f"{graded.referable[k]:.6g}", "referable": int(grade >= REFERABLE_GRADE)}
    values = np.atleast_1d(graded.values[k])
    row.update({name: f"{float(v):.6g}" for name, v in zip(value_columns(head_kind), values)})
    if HEAD_SPECS[head_kind].has_thresholds:
        row["thresholds"] = thresholds
    return row


def _heat_maps(grader: Grader, images: torch.Tensor, graded) -> torch.Tensor:
    from dr_resnet.serving.cam import cam_targets, grad_cam

    inputs = grader.model.normalize(images.to(grader.device))
    targets = cam_targets(grader.head_kind, torch.from_numpy(np.asarray(graded.grades)).to(grader.device))
    return grad_cam(grader.network, inputs, targets).cpu()


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    p = argparse.ArgumentParser(prog="python -m dr_resnet.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint (.pt), or a model dr_resnet.export wrote (.onnx, .ts, or its folder)")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively), or CSVs with an image column; with --format, "
                        "a dataset's folder, read as training reads it (its table's image column and image folder)")
    p.add_argument("--split", default="test", help="with --format: the dataset's split to grade (labelled or not)")
    p.add_argument("--out", default="predictions.csv", help="the CSV to write")
    p.add_argument("--tta", default="none", choices=TTA_MODES, help="flips: average over h-, v- and hv-flips")
    p.add_argument("--batch-size", type=int, default=32, help="photos graded at once")
    p.add_argument("--workers", type=int, help="processes preparing photos (default: 4, or the CPUs if fewer)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: a GPU if CUDA is there")
    p.add_argument("--cam", metavar="DIR", help="write each photo with its Grad-CAM heat map (PNG) into DIR")
    p.add_argument("--strict", action="store_true", help="exit 1 if any image failed (default: only if all did)")
    add_format_arguments(p)
    p.set_defaults(format=None)  # none: --images names files, folders or CSVs
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    if args.workers is None:
        args.workers = min(4, os.cpu_count() or 1)
    keys = [a for a in args.images if a.startswith("data.") and "=" in a]  # nargs="+" also took the data keys
    args.images, args.data_keys = [a for a in args.images if a not in keys], [*args.data_keys, *keys]
    if args.batch_size < 1 or args.workers < 0:
        p.error("need --batch-size >= 1 and --workers >= 0")
    if args.format and len(args.images) != 1:
        p.error(f"--format {args.format}: --images names the dataset's one folder, got {len(args.images)} paths")
    if args.data_keys and not args.format:
        p.error(f"{' '.join(args.data_keys)}: data.* keys say how to read a dataset: give its --format")
    return args


def dataset_images(root: str, split: str, args: argparse.Namespace) -> list[Path]:
    """A dataset's split's photos, read as training reads them (any format; its labels, if any, unused)."""
    fmt, options = format_arguments(args)
    return read_split(root, split, fmt, options, unlabelled_ok=True).paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        device = select_device(args.device, 0, 1)
        grader = load_grader(args.checkpoint, device)
        paths = dataset_images(args.images[0], args.split, args) if args.format else list_images(args.images)
        counts = predict(grader, paths, Path(args.out), args.tta, args.batch_size, args.workers,
                         Path(args.cam) if args.cam else None, progress=sys.stderr.isatty())
        failed = f", {counts.failed} failed (their reasons: the error column)" if counts.failed else ""
        print(f"graded {counts.graded} of {len(paths)} images with {grader.describe()}{failed}; wrote {args.out}"
              + (f" and heat maps in {args.cam}" if args.cam else ""))
        return 1 if counts.graded == 0 or (args.strict and counts.failed) else 0
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
