"""The report's figures and page at a sweep's scale, from run folders written by hand (helpers.synthetic_sweep):
the demo's shape (4 arms, ResNet18/50 x pretrained/scratch, 1-3 seeds) and a grid sweep's (the same 4 arms x 10
learning rates x 5 seeds = 200 runs, 40 arms), and 12 arms told apart by names (model.head x train.sampler at
ResNet18). Each figure stays within its size bounds with no legend over any
axes; confusion matrices and reliability curves are one per arm, its seeds pooled; report.html loads in Chromium
with every figure decoded and stays a few MB, both as write_html builds it from these figures and as report()
itself writes it over the 200 runs (the learning rate a factor, and searched), the answer first and every run's
row folded."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from dr_resnet.results.arms import find_runs, group_arms
from dr_resnet.results.factors import factor_keys, points
from dr_resnet.results.html import write_html
from dr_resnet.results.metrics import expected_calibration_error
from dr_resnet.results.report import (
    caption,
    plot_calibration,
    plot_confusion_matrices,
    plot_curves,
    plot_expected_best,
    plot_factor,
    plot_slice,
    report,
    result_rows,
)
from dr_resnet.results.tables import results_table
from dr_resnet.results.tuning import curves_of, upgraded, winner_of

from helpers import legends_over_axes, synthetic_sweep

DEMO = {(18, "imagenet"): 3, (18, "none"): 2, (50, "imagenet"): 1, (50, "none"): 3}
GRID = {(depth, weights): 5 for depth in (18, 50) for weights in ("imagenet", "none")}
LEARNING_RATES = (0.0003, 0.0006, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3)
NAMED = {"model.head": ("classification", "ordinal", "regression"), "train.sampler": ("random", "balanced")}

# Each figure's bounds. The page shows a figure at most 1200 CSS px wide: 2000 px leaves room for a 1.6x screen;
# 2500 px tall is two to three screens, the 40 arms' confusion matrices at 5 a row (before: one column, 59,400 px
# at 200 runs). 500 kB a figure keeps the report's own figures (at most 8 here) within report.html's embedding
# budget with room to spare, so the page stays under PAGE_BYTES.
MOST_PIXELS = (2000, 2500)
MOST_BYTES = 500_000
PAGE_BYTES = 3_000_000


SHAPES = {"4 arms": (DEMO, None, 6), "200 runs": (GRID, {"train.lr": LEARNING_RATES}, 6),
          "12 arms by name": ({(18, "imagenet"): 1, (18, "none"): 1}, NAMED, 3)}
TUNED_ARMS = {"4 arms": 4, "200 runs": 12, "12 arms by name": 4}  # the tuning figures' arms
# The 200-run shape takes about 10 s of CPU (its 40 confusion matrices' 1,000 cells are most of it): the fast
# loop leaves it out.
PARAMETERS = [pytest.param(shape, marks=[pytest.mark.slow] if shape == "200 runs" else []) for shape in SHAPES]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """sweep(shape) -> the folder of that shape's runs, written once for the tests here."""
    done = {}

    def sweep(shape: str) -> Path:
        if shape not in done:
            seeds, grid, epochs = SHAPES[shape]
            done[shape] = synthetic_sweep(tmp_path_factory.mktemp("sweep"), seeds, grid, epochs)
        return done[shape]
    return sweep


def tuning_choice(arms: int, trials: int) -> dict:
    """tuning.json's content for `arms` arms of `trials` learning rates each, every fourth trial failed."""
    rng = np.random.default_rng(0)
    choice = {"arms": {}}
    for a in range(arms):
        found = []
        for t, lr in enumerate(np.geomspace(1e-4, 1, trials)):
            trial = {"trial": f"lr{lr:.2g}", "values": {"train.lr": float(f"{lr:.2g}")}, "epoch": 1}
            if t % 4 == 3:
                trial["status"] = "failed: job 1: NonFiniteError: loss nan"
            else:
                score = float(0.4 + 0.3 * rng.random())
                trial.update(status="finished", score=score, held_out=score)
            found.append(trial)
        choice["arms"][f"arm{a}"] = {"trials": found, "metric": "qwk", "winner": winner_of(found)}
    return upgraded(choice)


def draw_everything(root: Path, out: Path, tuned_arms: int) -> dict[str, object]:
    """Every figure the report draws for these runs (and a tuning section of `tuned_arms` arms), by file name."""
    arms = group_arms(find_runs(root))
    figures = {}
    for depth in sorted({a.depth for a in arms}):
        name = f"accuracy_resnet{depth}.png"
        figures[name] = plot_curves([a for a in arms if a.depth == depth], depth, out / name)
    figures["confusion_matrices.png"] = plot_confusion_matrices(arms, out / "confusion_matrices.png")
    figures["calibration.png"] = plot_calibration(arms, out / "calibration.png")
    for key in factor_keys(arms):
        name = f"factor_{key.replace('.', '_')}.png"
        figures[name] = plot_factor(key, points(arms, key, "val_qwk"), points(arms, key), out / name)
    choice = tuning_choice(tuned_arms, 12)
    figures["expected_best.png"] = plot_expected_best(curves_of(choice), "qwk", out / "expected_best.png")
    figures["slice_train_lr.png"] = plot_slice(choice, "train.lr", out / "slice_train_lr.png")
    return figures


@pytest.fixture(scope="module")
def drawn(sweeps, tmp_path_factory):
    """draw(shape) -> (folder, figures by file name): each sweep's figures, drawn once for the tests here."""
    done = {}

    def draw(shape: str) -> tuple[Path, dict]:
        if shape not in done:
            out = tmp_path_factory.mktemp("figures")
            done[shape] = out, draw_everything(sweeps(shape), out, TUNED_ARMS[shape])
        return done[shape]
    return draw


def colour_bars(fig) -> list[str]:
    """The labels of the figure's colour bars (axes that hold a colour bar)."""
    return [ax.get_ylabel() for ax in fig.axes if hasattr(ax, "_colorbar")]


@pytest.mark.parametrize("shape", PARAMETERS)
def test_every_figure_stays_small_with_its_legends_outside_the_axes(drawn, shape):
    out, figures = drawn(shape)
    for name, fig in figures.items():
        with Image.open(out / name) as image:
            width, height = image.size
        assert width <= MOST_PIXELS[0] and height <= MOST_PIXELS[1], (name, image.size)
        assert (out / name).stat().st_size <= MOST_BYTES, name
        assert legends_over_axes(fig) == [], name
    curves = figures["accuracy_resnet18.png"]
    [legend] = curves.legends
    labels = [t.get_text() for t in legend.get_texts()]
    if shape == "4 arms":  # two arms in one pair of panels, a colour each, named in the legend with their seeds
        assert labels[:2] == ["scratch (mean of 2 seeds, band +-1 sd)", "pretrained (mean of 3 seeds, band +-1 sd)"]
        # each initialisation in its own colour, the same in every figure (plots.INITIALISATION_COLOURS)
        assert [to_rgba(h.get_color()) for h in legend.legend_handles[:2]] == [to_rgba("tab:orange"), to_rgba("tab:blue")]
        assert colour_bars(curves) == [] and len(curves.axes) == 2
        [cell] = figures["calibration.png"].axes
        assert len(cell.get_lines()) == 1 + 4  # the diagonal and one line per arm
    elif shape == "12 arms by name":  # a pair of panels per initialisation, a colour per setting
        settings = [f"model.head={h}, train.sampler={s}" for h in NAMED["model.head"] for s in NAMED["train.sampler"]]
        assert sorted(labels[:6]) == sorted(settings) and colour_bars(curves) == [] and len(curves.axes) == 4
        for fig in (curves, figures["calibration.png"]):
            panel = fig.axes[0]
            colours = {to_rgba(line.get_color()) for line in panel.get_lines() if line.get_linestyle() == "-"}
            assert len(colours) == 6, fig  # no colour shared by two settings
        assert [t.get_text() for t in figures["calibration.png"].legends[0].get_texts()][1:] == labels[:6]
    else:  # 20 arms a depth: a pair of panels per initialisation, the learning rate as a colour map, no colour per run
        assert colour_bars(curves) == ["train.lr"] and len(curves.axes) == 4 + 1
        assert not any("lr" in label for label in labels) and len(labels) <= 5
        assert [ax.get_title().split(":")[0] for ax in curves.axes[:4]] == ["scratch", "scratch", "pretrained", "pretrained"]
        test_lines = [line for line in curves.axes[0].get_lines() if line.get_linestyle() == "-"]
        assert len(test_lines) == 10 and len({to_rgba(line.get_color()) for line in test_lines}) == 10
        assert colour_bars(figures["calibration.png"]) == ["train.lr"]
        assert len(figures["slice_train_lr.png"].axes[0].get_legend().get_texts()) > 12  # 12 arms, none sharing
        colours = {to_rgba(line.get_color()) for line in figures["expected_best.png"].axes[0].get_lines()
                   if line.get_label().startswith("arm") and "failed" not in line.get_label()}
        assert len(colours) == TUNED_ARMS[shape]
        matrices = [ax for ax in figures["confusion_matrices.png"].axes if ax.get_visible() and not hasattr(ax, "_colorbar")]
        assert len(matrices) == 40 and all("5 seeds pooled" in ax.get_title() for ax in matrices)
        assert len({round(ax.get_position().y0, 3) for ax in matrices}) == 8  # 5 a row: 8 rows, not 40


def test_confusion_matrices_are_one_per_arm_given_with_its_seeds_pooled(sweeps, tmp_path):
    arms = group_arms(find_runs(sweeps("4 arms")))
    chosen = [a for a in arms if len(a.runs) == 3]  # the arms the answer leads with: only these are drawn
    assert [a.name for a in chosen] == ["resnet18 pretrained", "resnet50 scratch"]
    fig = plot_confusion_matrices(chosen, tmp_path / "chosen.png")
    panels = [ax for ax in fig.axes if ax.get_visible() and not hasattr(ax, "_colorbar")]
    assert [ax.get_title().splitlines()[:2] for ax in panels] == [[a.name, "3 seeds pooled; held-out qwk"]
                                                                 for a in chosen]
    for ax, arm in zip(panels, chosen):
        pooled = np.sum([r.chosen()["confusion_matrix"] for r in arm.runs], axis=0)
        counts = [int(re.search(r"\((\d+)\)", t.get_text()).group(1)) for t in ax.texts]
        assert counts == pooled.ravel().tolist()  # the cells' counts: the seeds' matrices summed
        shares = [float(t.get_text().split("\n")[0]) for t in ax.texts]
        rows = pooled / pooled.sum(axis=1, keepdims=True)
        assert shares == pytest.approx(rows.ravel(), abs=0.005)  # row-normalised after pooling
    assert "seeds pooled" in caption(tmp_path / "confusion_matrices.png")


def test_calibration_is_one_line_per_arm_its_seeds_predictions_pooled(sweeps, tmp_path):
    arms = group_arms(find_runs(sweeps("4 arms")))
    fig = plot_calibration(arms, tmp_path / "calibration.png")
    [ax] = [ax for ax in fig.axes if ax.get_visible()]
    lines = ax.get_lines()[1:]  # after the diagonal
    assert len(lines) == len(arms) == 4
    for line, arm in zip(lines, arms):
        found = [r.predictions() for r in arm.runs]
        pooled = expected_calibration_error(np.concatenate([p.values for p in found]),
                                            np.concatenate([p.labels for p in found]))
        # drawn from each run's kept bins, pooled by their counts: the same as the predictions concatenated
        assert line.get_xdata().tolist() == pytest.approx([b["confidence"] for b in pooled["bins"]], abs=1e-12)
        assert line.get_ydata().tolist() == pytest.approx([b["accuracy"] for b in pooled["bins"]], abs=1e-12)
        assert line.get_label().startswith(f"{arm.name} ({len(arm.runs)} seed")
        assert f"ECE {pooled['ece']:.3f}" in line.get_label()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (Debian: apt-get install chromium; "
                                                           ".ci/run installs it)")
@pytest.mark.parametrize("shape", [p for p in PARAMETERS if p.values[0] != "12 arms by name"])
def test_report_html_at_scale_loads_in_chromium_with_every_figure_and_stays_a_few_mb(sweeps, drawn, shape):
    from test_report import chromium

    out, figures = drawn(shape)
    rows = result_rows(find_runs(sweeps(shape)))
    table = results_table(rows)
    table.detail = True  # a row per run: folded under its title
    files = [(out / name, caption(out / name)) for name in figures]
    page = write_html(out, f"report: {shape}", [table], files)
    text = page.read_text()
    assert page.stat().st_size <= PAGE_BYTES
    assert text.count('src="data:image/png;base64,') == len(figures)  # within the budget: every figure embedded
    assert re.search(r"<details><summary><h2>Results</h2><span class=\"rows\">(\d+) rows", text).group(1) == \
        str(len(rows))
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    assert f'data-figures-shown="{len(figures)}"' in dom.stdout
    assert "Uncaught" not in dom.stderr
    # Past the budget the figures are linked as the files beside the page: the browser shows them all the same.
    embedded = page.stat().st_size
    linked = write_html(out, f"report: {shape}", [table], files, embedded_bytes=0)
    text = linked.read_text()
    assert "data:image" not in text and text.count('<img alt="') == len(figures)
    assert linked.stat().st_size < embedded - sum(path.stat().st_size for path, _ in files)
    dom = chromium("--dump-dom", linked.as_uri())
    assert f'data-figures-shown="{len(figures)}"' in dom.stdout


class PageOutline(HTMLParser):
    """What a page's DOM holds, in order: its tables' ids (each with whether a <details> folds it and whether
    that one is open), every <details>' open attribute and its <img>s."""

    def __init__(self, dom: str):
        super().__init__()
        self.tables: list[tuple[str, bool, bool]] = []  # (id, inside a <details>, that <details> open)
        self.details: list[bool] = []  # each <details>: open?
        self.images = 0
        self._open: list[bool] = []  # the <details> the parser is inside, innermost last
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self.details.append("open" in attrs)
            self._open.append("open" in attrs)
        elif tag == "table":
            self.tables.append((attrs.get("id", ""), bool(self._open), any(self._open)))
        elif tag == "img":
            self.images += 1

    def handle_endtag(self, tag):
        if tag == "details" and self._open:
            self._open.pop()


# The 200 runs' report as a reader gets it: with train.lr a factor (no sweep.json names it searched) every rate
# is an arm of its own (40 arms; the answer a row per line, its curve; pretraining and depth compared at each
# rate, 20 + 20 comparisons an epoch, and each rate against the smallest in each line, 4 x 9); searched
# (sweep.json: searched: [train.lr], as launch.sweep writes it), each arm's rates reduce to the one its held-out
# score prefers (4 arms, winner against winner: 2 + 2 an epoch). Both at the selected and the final epoch.
# report() over these 200 runs of 250 images, 6 epochs: about 15 CPU s (factor) and 6 CPU s (searched) on an AMD
# EPYC core, so the fast loop leaves it out.
REPORTED = {"train.lr a factor": (False, 4, 2 * (40 + 36)), "train.lr searched": (True, 4, 8)}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (Debian: apt-get install chromium; "
                                                           ".ci/run installs it)")
@pytest.mark.parametrize("role", REPORTED)
def test_report_over_200_runs_leads_with_the_answer_folds_every_run_and_loads_in_chromium(sweeps, tmp_path, role):
    from test_report import chromium

    searched, answer_rows, comparisons = REPORTED[role]
    root = sweeps("200 runs")
    if searched:  # a copy: the module's sweep stays a sweep without sweep.json for the other tests
        root = Path(shutil.copytree(root, tmp_path / "sweep"))
        (root / "sweep.json").write_text(json.dumps({"searched": ["train.lr"], "factors": []}))
    out = tmp_path / "report"
    written = report(root, out)
    page = out / "report.html"
    figures = [p for p in written if p.suffix == ".png"]
    assert page in written and page.stat().st_size <= PAGE_BYTES, page.stat().st_size
    assert len(json.loads((out / "comparisons.json").read_text())["comparisons"]) == comparisons
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0 and "Uncaught" not in dom.stderr, dom.stderr
    outline = PageOutline(dom.stdout)
    # the answer is the first table on the page, a row per arm at its chosen setting (header row included)
    assert outline.tables[0] == ("answer", False, False)
    answer = re.search(r'<table id="answer">(.*?)</table>', dom.stdout, re.S).group(1)
    assert answer.count("<tr") == 1 + answer_rows
    assert answer.count("held-out choice among 10 settings of train.lr" if searched else
                        "a curve of 10 values of train.lr") == answer_rows
    # every figure the report drew is on the page and decoded by the browser (naturalWidth > 0)
    assert outline.images == len(figures) >= 5
    assert f'data-figures-shown="{len(figures)}"' in dom.stdout
    # the per-run tables are folded, none open: a row per run (200) behind a click
    assert outline.details and not any(outline.details)
    tables = {name: (inside, opened) for name, inside, opened in outline.tables}
    assert tables["results"] == (True, False)
    assert re.search(r'<summary><h2>Results</h2><span class="rows">(\d+) rows', dom.stdout).group(1) == "200"
