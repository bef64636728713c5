"""A run's gallery: for each true grade, a few test photos it graded right and a few it graded wrong,
each with its Grad-CAM heat map (see cam.py). The report draws one per run with --gallery."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dr_resnet import GRADES
from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.data.formats import TableOptions
from dr_resnet.results.plots import pyplot
from dr_resnet.serving.cam import cam_targets, grad_cam, overlay
from dr_resnet.serving.grading import load_grader


def pick(labels: np.ndarray, grades: np.ndarray, per_cell: int) -> dict[tuple[int, bool], list[int]]:
    """Up to per_cell indices per (true grade, graded right), in order."""
    chosen: dict[tuple[int, bool], list[int]] = {(g, ok): [] for g in range(len(GRADES)) for ok in (True, False)}
    for i, (label, grade) in enumerate(zip(labels, grades)):
        cell = chosen[(int(label), bool(label == grade))]
        if len(cell) < per_cell:
            cell.append(i)
    return chosen


def save_gallery(checkpoint: str | os.PathLike, data_root: str | os.PathLike, split: str, path: Path, title: str,
                 per_cell: int = 2, max_per_grade: int = 40) -> Path:
    """Grade up to max_per_grade photos of each grade of the split (in its order) and draw per_cell right and
    per_cell wrong ones per grade with their maps."""
    grader = load_grader(checkpoint, torch.device("cpu"))
    trained = grader.config.data  # the split is read as the run read it (its format and table keys)
    dataset = RetinopathyDataset(data_root, split, format=trained.format, options=TableOptions.of(trained))
    rows = np.concatenate([np.flatnonzero(dataset.labels == g)[:max_per_grade] for g in range(len(GRADES))])
    rows.sort()
    images = torch.stack([grader.recipe.prepare(dataset.paths[i]) for i in rows])
    graded = grader.grade(images)
    chosen = pick(dataset.labels[rows], graded.grades, per_cell)
    plt = pyplot()
    columns = 2 * per_cell
    fig, axes = plt.subplots(len(GRADES), columns, figsize=(1.9 * columns, 2.0 * len(GRADES)), squeeze=False)
    for g in range(len(GRADES)):
        for c, (ok, k) in enumerate([(True, k) for k in range(per_cell)] + [(False, k) for k in range(per_cell)]):
            ax = axes[g][c]
            ax.set_xticks([])
            ax.set_yticks([])
            cell = chosen[(g, ok)]
            if c == 0:
                ax.set_ylabel(f"true {GRADES[g]}", fontsize=8)
            if k >= len(cell):
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, color="grey")
                continue
            j = cell[k]
            target = cam_targets(grader.head_kind, torch.tensor(graded.grades[j:j + 1]))
            heat = grad_cam(grader.network, grader.model.normalize(images[j:j + 1]), target)[0]
            ax.imshow(overlay(images[j], heat))
            ax.set_title(f"{'right' if ok else 'wrong'}: graded {graded.grades[j]}", fontsize=8,
                         color="tab:green" if ok else "tab:red")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
