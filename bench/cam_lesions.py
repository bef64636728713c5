"""Do the heat maps point at lesions? Grad-CAM maps of a trained model against the lesion masks of the
synthetic generator (python -m dr_resnet.synthetic ... --lesion-masks), per true grade.

For each photo with lesions (grade >= 1): the photo is prepared by the model's recipe and its mask cut
the same way; the map is Grad-CAM for the predicted grade. Reported per grade: the share of the maps'
mass on lesions, the share of the image the lesions cover, their ratio (energy ratio; 1 = a map spread
evenly over the image, and "retina-only" = a map spread evenly over the retina, the fairer chance
level), and the pointing game (the map's peak on a lesion grown by 3% of the side) against its chance.

    python bench/cam_lesions.py --checkpoint RUN/checkpoint_best.pt --data DATA_RAW [--split test] [--out table.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dr_resnet import GRADES
from dr_resnet.data.dataset import fit_square
from dr_resnet.data.formats import read_split
from dr_resnet.data.preprocess import cut_square, retina_square
from dr_resnet.data.recipe import BLACK_LEVEL
from dr_resnet.data.synthetic import lesion_mask_path
from dr_resnet.serving.cam import CAM_LAYER, cam_targets, grad_cam, lesion_scores
from dr_resnet.serving.grading import load_grader

POINTING_TOLERANCE = 0.03  # of the image side


def prepared_mask(photo: Path, mask: Path, recipe) -> np.ndarray:
    """The lesion mask cut and resized exactly as the recipe prepares its photo."""
    with Image.open(mask) as m:
        mask_image = m.convert("L")
        if recipe.preprocess is not None:
            _, square = retina_square(photo, recipe.preprocess)
            mask_image = cut_square(mask_image, square, recipe.preprocess.size, Image.Resampling.BILINEAR)
    tensor = torch.from_numpy(np.array(mask_image))[None].expand(3, -1, -1)
    return fit_square(tensor, recipe.image_size)[0].numpy() > 127


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="a synthetic dataset written with --lesion-masks (raw photos)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layer", default=CAM_LAYER, help="the stage to explain (layer4: the last, 1/32 of the side)")
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args()
    grader = load_grader(args.checkpoint, torch.device("cpu"))
    split = read_split(Path(args.data), args.split)
    chosen = [i for i, g in enumerate(split.labels) if g > 0]
    scores: dict[int, list[dict]] = {g: [] for g in range(1, len(GRADES))}
    correct: dict[int, list[bool]] = {g: [] for g in scores}
    for start in range(0, len(chosen), args.batch_size):
        rows = chosen[start:start + args.batch_size]
        images = torch.stack([grader.recipe.prepare(split.paths[i]) for i in rows])
        grades = torch.from_numpy(grader.grade(images).grades)
        maps = grad_cam(grader.network, grader.model.normalize(images), cam_targets(grader.head_kind, grades), args.layer).numpy()
        for k, i in enumerate(rows):
            mask = prepared_mask(split.paths[i], lesion_mask_path(args.data, split.names[i]), grader.recipe)
            retina = images[k].max(dim=0).values.numpy() > BLACK_LEVEL
            tolerance = round(POINTING_TOLERANCE * grader.recipe.image_size)
            s = lesion_scores(maps[k], mask, tolerance)
            s["retina_only_ratio"] = lesion_scores(retina.astype(np.float32), mask)["energy_ratio"]
            scores[int(split.labels[i])].append(s)
            correct[int(split.labels[i])].append(int(grades[k]) == int(split.labels[i]))
    lines = [f"Grad-CAM ({args.layer}) of {args.checkpoint} ({grader.describe()}) on {args.data} {args.split}, "
             "photos with lesions",
             "", "| grade | photos | graded right | map mass on lesions | lesion area | energy ratio | retina-only ratio "
             "| pointing hits | pointing chance |", "|---|---|---|---|---|---|---|---|---|"]
    everything = []
    for grade, items in scores.items():
        if not items:
            continue
        everything += items
        lines.append(_row(GRADES[grade], items, float(np.mean(correct[grade]))))
    lines.append(_row("all (1-4)", everything, float(np.mean([c for v in correct.values() for c in v]))))
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def _row(name: str, items: list[dict], right: float) -> str:
    mass, area = np.mean([s["mass_on_lesions"] for s in items]), np.mean([s["lesion_area"] for s in items])
    return (f"| {name} | {len(items)} | {right:.0%} | {mass:.3f} | {area:.3f} | {mass / area:.2f} | "
            f"{np.mean([s['retina_only_ratio'] for s in items]):.2f} | {np.mean([s['pointing_hit'] for s in items]):.0%} | "
            f"{np.mean([s['pointing_chance'] for s in items]):.0%} |")


if __name__ == "__main__":
    main()
