"""Matplotlib figures shared by training, evaluation and the report (Agg backend: no display needed), and
what keeps the report's figures readable from 4 runs to hundreds: colours for many lines, a colour map for a
continuous key, grids of small panels and a bounded file size."""

from __future__ import annotations

import io
import math
import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from dr_resnet import GRADES
from dr_resnet.results.metrics import row_normalised

# A few lines each get their own colour.
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
# A few arms that differ only in how they started: each initialisation (config.INITIALISATIONS) its own colour, the
# same in every figure; the core experiment's blue (ImageNet) and orange (scratch) as before.
INITIALISATION_COLOURS = {"scratch": "tab:orange", "pretrained": "tab:blue", "ssl": "tab:green", "imagenet+ssl": "tab:red"}
# The report's figures are saved at this resolution, and as a palette PNG (below): at 200 runs every figure
# stays a few hundred kB, so report.html can embed them all.
DPI = 100
# Viridis without its palest yellows, which vanish on a white page.
COLOUR_MAP_SPAN = (0.0, 0.9)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(width: float, height: float, **kwargs):
    """A Figure outside pyplot's registry, on an Agg canvas (constrained layout unless told otherwise):
    nothing to close, freed when dropped, so a report may return one to inspect and draw dozens without a
    leak."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kwargs.setdefault("layout", "constrained")
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | os.PathLike, dpi: int = DPI) -> None:
    """The figure as a PNG of at most 256 colours (lines, text and bands need no more; a third of the bytes
    of a full-colour one), cropped to what is drawn (a legend outside the axes included)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(Path(path), optimize=True)


def line_colours(count: int) -> list:
    """A colour per line: the eight distinct ones up to 8 lines, tab20's up to 20, then as many evenly spread
    along viridis (neighbours in the legend are neighbours in colour)."""
    from matplotlib import colormaps

    if count <= len(COLOURS):
        return list(COLOURS[:count])
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["viridis"](x) for x in np.linspace(*COLOUR_MAP_SPAN, count)]


def colour_scale(values: Sequence[float]):
    """A colour map over a continuous key's values (a ScalarMappable: .to_rgba(value)), log-normalised where
    they are positive and span 8x or more (learning rates), with the values themselves as its ticks."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, LogNorm, Normalize

    low, high = min(values), max(values)
    if low > 0 and high >= 8 * low:
        norm = LogNorm(low, high)
    else:
        norm = Normalize(low, high if high > low else low + 1)
    cmap = ListedColormap(colormaps["viridis"](np.linspace(*COLOUR_MAP_SPAN, 256)))
    return ScalarMappable(norm, cmap)


def colour_bar(fig, scale, axes, key: str, values: Sequence[float]) -> None:
    """The colour map's key beside `axes`, ticked at the values drawn (at most 12 of them)."""
    bar = fig.colorbar(scale, ax=axes, label=key, shrink=0.9, aspect=30)
    bar.ax.minorticks_off()
    shown = sorted(set(values))
    if len(shown) > 12:
        shown = [shown[round(i)] for i in np.linspace(0, len(shown) - 1, 12)]
    bar.set_ticks(shown, labels=[f"{v:g}" for v in shown])


def grid_shape(panels: int, most_columns: int = 5) -> tuple[int, int]:
    """Rows and columns for `panels` small multiples: near square, at most `most_columns` wide."""
    columns = max(1, min(panels, most_columns, math.ceil(math.sqrt(panels))))
    return math.ceil(panels / columns), columns


def wrapped(text: str, width: int = 38) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text


def count_text(n: int) -> str:
    """A cell's count, short where a pooled matrix runs to hundreds of thousands."""
    return f"{n / 1000:.0f}k" if n >= 100_000 else f"{n / 1000:.1f}k" if n >= 10_000 else str(n)


def draw_confusion_matrix(ax, cm: np.ndarray, title: str, labels: Sequence[str] = GRADES, fontsize: float = 8,
                          totals: bool = True) -> object:
    """Row-normalised colours (recall on the diagonal), each cell showing its share and its count; `totals`:
    each true grade's images beside its name."""
    norm = row_normalised(cm)
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({count_text(int(cm[i, j]))})", ha="center", va="center",
                    fontsize=fontsize, color="white" if norm[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=fontsize + 1)
    ax.set_yticks(range(len(labels)), [f"{lab} (n={count_text(int(n))})" if totals else lab
                                       for lab, n in zip(labels, cm.sum(axis=1))], fontsize=fontsize + 1)
    ax.set_xlabel("predicted grade", fontsize=fontsize + 1)
    ax.set_ylabel("true grade", fontsize=fontsize + 1)
    ax.set_title(title, fontsize=fontsize + 2)
    return image


def save_confusion_matrix(cm: np.ndarray, path: str | os.PathLike, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    image = draw_confusion_matrix(ax, np.asarray(cm), title)
    fig.colorbar(image, ax=ax, label="share of the true grade's images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_pretraining_health(rows: Sequence[dict], collapse_below: float, path: str | os.PathLike, title: str):
    """A pretraining's health: its loss per epoch beside the normalised outputs' spread x sqrt(d), with the
    collapse line (pretrain.collapse_below) and the healthy level (1) drawn. A falling loss alone proves nothing:
    a collapsed network lowers it fastest. Returns the figure (saved to `path`)."""
    epochs = [r["epoch"] for r in rows]
    fig = new_figure(9, 3.4)
    loss_axes, spread_axes = fig.subplots(1, 2)
    loss_axes.plot(epochs, [r["loss"] for r in rows], marker="o", color=COLOURS[0])
    loss_axes.set(xlabel="epoch", ylabel="BYOL loss (2 - 2 cos, both view orders)", title="loss")
    spread_axes.plot(epochs, [r["spread_x_sqrt_d"] for r in rows], marker="o", color=COLOURS[1])
    spread_axes.axhline(1.0, color="grey", linestyle=":", label="healthy (1/sqrt(d) per dimension)")
    spread_axes.axhline(collapse_below, color="tab:red", linestyle="--", label=f"collapse (< {collapse_below:g})")
    spread_axes.set(xlabel="epoch", ylabel="spread x sqrt(d)", title="outputs' spread", ylim=(0, None))
    spread_axes.legend(fontsize="small")
    from matplotlib.ticker import MaxNLocator

    for axes in (loss_axes, spread_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    fig.suptitle(title, fontsize="medium")
    save(fig, path)
    return fig
