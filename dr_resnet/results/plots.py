"""Matplotlib figures shared by training, evaluation and the report (Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dr_resnet import GRADES
from dr_resnet.results.metrics import row_normalised


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_confusion_matrix(ax, cm: np.ndarray, title: str, labels: Sequence[str] = GRADES) -> object:
    """Row-normalised colours (recall on the diagonal), each cell showing its share and its count."""
    norm = row_normalised(cm)
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), [f"{lab} (n={n})" for lab, n in zip(labels, cm.sum(axis=1))])
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_title(title, fontsize=10)
    return image


def save_confusion_matrix(cm: np.ndarray, path: str | os.PathLike, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    image = draw_confusion_matrix(ax, np.asarray(cm), title)
    fig.colorbar(image, ax=ax, label="share of the true grade's images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
