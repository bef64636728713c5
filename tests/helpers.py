"""Helpers the tests share (conftest.py holds the fixtures): the repository root, tiny datasets on
disk, a run's metrics, bitwise comparison of two runs, and dr_resnet.train's arguments for test runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dr_resnet.data.preprocess import Settings, preprocess
from dr_resnet.data.synthetic import generate
from dr_resnet.training import checkpoint

REPO = Path(__file__).resolve().parent.parent


def preprocessed_dataset(base: Path, train: int, test: int, seed: int, size: int) -> Path:
    """A lab-format synthetic dataset generated at 1.5 x size, preprocessed to size px: base / 'data'."""
    raw = generate(base / "raw", {"train": train, "test": test}, seed=seed, size=size * 3 // 2, progress=False)
    preprocess(raw, base / "data", Settings(size=size), progress=False)
    return base / "data"


TIMING_KEYS = {"images_per_s", "train_seconds", "eval_seconds", "epoch_seconds", "data_wait_share"}


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_training_state(a: Path, b: Path) -> None:
    """Two run directories whose last checkpoints and metrics (timings aside) are equal, bit for bit."""
    sa, sb = checkpoint.load(a / "checkpoint_last.pt"), checkpoint.load(b / "checkpoint_last.pt")
    assert sa["epoch"] == sb["epoch"] and sa["model"].keys() == sb["model"].keys()
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    for ma, mb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ma["momentum_buffer"], mb["momentum_buffer"])
    ema_a, ema_b = sa.get("ema") or {}, sb.get("ema") or {}  # train.ema's average and its count of updates
    assert ema_a.keys() == ema_b.keys()
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), f"ema {key}"
    assert without_timing(metrics_rows(a)) == without_timing(metrics_rows(b))


def demo_args(data: Path, run_dir: Path, *extra: str, batch_size: int = 8, epochs: int = 2, workers: int = 1) -> list[str]:
    """dr_resnet.train's arguments: the demo recipe on a 48 px test dataset, on CPU (gloo also on a GPU
    machine: tests compare runs bit for bit and start several processes); `extra` overrides come last."""
    return ["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}", "data.image_size=48",
            f"train.batch_size={batch_size}", f"train.epochs={epochs}", f"data.workers={workers}", "train.lr=0.02",
            "train.device=cpu", f"output.dir={run_dir}", *extra]


def train_run(data: Path, run_dir: Path, *extra: str) -> Path:
    """3 epochs on `data`: a barely trained model for the serving tests, which need outputs that differ
    from photo to photo. On 40 images the fair recipe's gentle start (zero-init residuals) leaves every
    photo at one grade after 3 epochs; without it, and with every grade equally likely
    (train.sampler=balanced), the grades move. The clip stays at the 1.0 these tests were measured with
    (the recipe's 5.0 guard leaves this tiny model's probabilities closer together)."""
    from dr_resnet.training.train import main

    assert main(demo_args(data, run_dir, "train.sampler=balanced", "model.zero_init_residual=false",
                          "train.clip_grad_norm=1.0", *extra, epochs=3, workers=0)) == 0
    return run_dir


IDRID_LABELS = "2. Groundtruths/{} IDRiD_Disease Grading_{} Labels.csv"


def published_copy(src: Path, dst: Path, kind: str) -> dict[str, list[tuple[str, int]]]:
    """The images of a dataset `src` (splits train, test; a detected format) laid out as `kind` ships them
    (file names, headers, extensions, label columns, quirks); returns the (name, grade) rows each
    split must read, in order. Mirrors the publishers' layouts, not dr-resnet's code."""
    import csv
    import shutil

    from PIL import Image

    from dr_resnet.data.formats import read_split

    splits = {name: read_split(src, name) for name in ("train", "test")}
    expected: dict[str, list[tuple[str, int]]] = {}

    def place(path: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix.lower() in (".jpeg", ".jpg") and path.suffix.lower() in (".jpeg", ".jpg"):
            shutil.copyfile(path, target)
        else:
            Image.open(path).save(target)

    def write(path: Path, rows: list[list[str]], delimiter: str = ",") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.writer(f, delimiter=delimiter).writerows(rows)

    if kind == "eyepacs":  # trainLabels.csv; the released test labels with the leaderboard column Usage
        for name, split in splits.items():
            for n, p in zip(split.names, split.paths):
                place(p, dst / name / f"{n}.jpeg")
        write(dst / "trainLabels.csv", [["image", "level"], *([n, str(g)] for n, g in zip(splits["train"].names,
                                                                                            splits["train"].labels))])
        test = splits["test"]
        usage = ["Public" if i % 3 == 0 else "Private" for i in range(len(test.names))]
        write(dst / "retinopathy_solution.csv", [["image", "level", "Usage"],
                                                 *([n, str(g), u] for n, g, u in zip(test.names, test.labels, usage))])
        expected = {"train": list(zip(splits["train"].names, map(int, splits["train"].labels))),
                    "test": list(zip(test.names, map(int, test.labels))),
                    "public": [(n, int(g)) for n, g, u in zip(test.names, test.labels, usage) if u == "Public"],
                    "private": [(n, int(g)) for n, g, u in zip(test.names, test.labels, usage) if u == "Private"]}
    elif kind == "idrid":  # IDRiD_001 ... without extension, .jpg files; the training CSV has empty trailing
        # columns and a row of empty cells at its end, the header a stray space ("Risk of macular edema ")
        for (name, split), (letter, title, folder) in zip(splits.items(), (("a.", "Training", "a. Training Set"),
                                                                        ("b.", "Testing", "b. Testing Set"))):
            names = [f"IDRiD_{i + 1:03d}" for i in range(len(split.names))]
            for n, p in zip(names, split.paths):
                place(p, dst / "1. Original Images" / folder / f"{n}.jpg")
            extra = ["", "", ""] if name == "train" else []
            rows = [["Image name", "Retinopathy grade", "Risk of macular edema ", *extra],
                    *([n, str(g), str(int(g) % 3), *extra] for n, g in zip(names, split.labels))]
            write(dst / IDRID_LABELS.format(letter, title), rows + ([["", "", "", *extra]] if extra else []))
            expected[name] = list(zip(names, map(int, split.labels)))
    elif kind == "messidor2":  # one set; names with their extension (.png and .JPG), ungradable rows without grade;
        # ADCIS's messidor-2.csv pairs each exam's two images ("left;right" rows), images 2k and 2k + 1 here
        rows, kept = [["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"]], []
        everything = [(n, g, p) for s in splits.values() for n, g, p in zip(s.names, s.labels, s.paths)]
        files = []
        for i, (n, g, p) in enumerate(everything):
            file = f"IM{i:06d}.JPG" if i % 2 else f"2005{i:04d}_{n}.png"
            files.append(file)
            place(p, dst / "IMAGES" / file)
            if i % 7 == 3:
                rows.append([file, "", "", "0"])
            else:
                rows.append([file, str(g), "0", "1"])
                kept.append((file, int(g)))
        write(dst / "messidor_data.csv", rows)
        write(dst / "messidor-2.csv", [["left", "right"], *([files[i], files[i + 1]] for i in range(0, len(files) - 1, 2))],
              delimiter=";")
        expected = {"test": kept}
    elif kind == "ddr":  # DR_grading: <split>.txt lines "<file> <grade>", grade 5 = ungradable; its official
        # validation split `valid` (here: the training images again, under their own names)
        for name, split in {**splits, "valid": splits["train"]}.items():
            lines, kept = [], []
            for i, (n, g, p) in enumerate(zip(split.names, split.labels, split.paths)):
                file = f"007-{i:04d}-{name[:2]}.jpg"
                place(p, dst / name / file)
                grade = 5 if i % 5 == 4 else int(g)
                lines.append([file, str(grade)])
                if grade != 5:
                    kept.append((file, grade))
            write(dst / f"{name}.txt", lines, delimiter=" ")
            expected[name] = kept
    elif kind == "folders":  # {split}/{grade}/<name>.png
        for name, split in splits.items():
            for n, g, p in zip(split.names, split.labels, split.paths):
                place(p, dst / name / str(int(g)) / f"{n}.png")
            expected[name] = sorted(zip(split.names, map(int, split.labels)), key=lambda r: (r[1], r[0]))
    else:
        raise ValueError(kind)
    return expected


def synthetic_run(path: Path, depth: int, weights: str, seed: int, skill: float, settings: dict | None = None,
                  epochs: int = 6, images: int = 250) -> Path:
    """A finished run directory written by hand, in the layout training writes (config.yaml with `settings`,
    flat keys such as train.lr; metrics.jsonl; summary.json with its intervals; predictions.csv and
    predictions_final.csv), without training: the report's scale tests copy a sweep's shape (hundreds of runs)
    in a second. Every run grades the same test set (`images` images, two per patient, DR-like grade shares);
    `skill` (0..1) is how often its last epochs grade an image right, and every seed draws its own errors."""
    import zlib

    import numpy as np
    import yaml

    from dr_resnet.results.metrics import epoch_entries, expected_calibration_error, roc_auc, summarize
    from dr_resnet.results.predictions import write_predictions

    settings = {"data.val_fraction": 0.1, "train.epochs": epochs, "train.warmup_epochs": 0, "train.select_by": "qwk",
                **(settings or {}), "model.depth": depth, "model.weights": weights, "train.seed": seed}
    shares = [0.6, 0.1, 0.15, 0.08, 0.07]
    names = [f"{i // 2}_{('left', 'right')[i % 2]}" for i in range(images)]
    labels = np.random.default_rng(0).choice(5, size=images, p=shares)
    val_labels = np.random.default_rng(1).choice(5, size=images // 2, p=shares)
    rng = np.random.default_rng(zlib.crc32(repr(sorted(settings.items())).encode()))

    def graded(right_share: float, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        count = len(truth)
        right = rng.random(count) < right_share
        wrong = np.where(rng.random(count) < 0.5, 0, np.clip(truth + rng.choice([-1, 1], count), 0, 4))
        grades = np.where(right, truth, wrong)
        confidence = rng.uniform(0.35, 0.95, count)
        probabilities = np.tile(((1 - confidence) / 4)[:, None], (1, 5))
        probabilities[np.arange(count), grades] = confidence
        cm = np.zeros((5, 5), dtype=np.int64)
        np.add.at(cm, (truth, grades), 1)
        scores = {**summarize(cm), "referable_auc": roc_auc(truth >= 2, probabilities[:, 2:].sum(axis=1))}
        return grades, probabilities, scores

    rows, predictions = [], []
    for epoch in range(1, epochs + 1):
        share = skill * (1 - 0.6 ** epoch)
        grades, probabilities, test = graded(share, labels)
        _, _, val = graded(share, val_labels)
        rows.append({"epoch": epoch, "train_loss": 1.5 - share, "train_acc": min(1.0, share + 0.1),
                     **epoch_entries("test", test, 1.4 - share),
                     "test_ece": expected_calibration_error(probabilities, labels)["ece"],
                     **epoch_entries("val", val, 1.4 - share), "lr": settings.get("train.lr", 0.01),
                     "epoch_seconds": 30.0 + depth / 10, "confusion_matrix": test["confusion_matrix"],
                     "val_confusion_matrix": val["confusion_matrix"]})
        predictions.append((grades, probabilities))
    path.mkdir(parents=True, exist_ok=True)
    config: dict = {}
    for key, value in settings.items():
        section, name = key.split(".", 1)
        config.setdefault(section, {})[name] = value
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(rows, key=lambda r: (r["val_qwk"], -r["epoch"]))

    def intervals(row: dict) -> dict:
        return {"unit": "patients", **{name: {"value": row[f"test_{key}"], "low": row[f"test_{key}"] - 0.05,
                                              "high": row[f"test_{key}"] + 0.05}
                                       for name, key in (("accuracy", "acc"), ("qwk", "qwk"),
                                                         ("referable_auc", "referable_auc"))}}

    (path / "summary.json").write_text(json.dumps({
        "epochs_completed": epochs, "epochs_planned": epochs, "confusion_matrix": best["confusion_matrix"],
        "patients_in_train_and_test": 0, "skipped_images": [], "intervals": intervals(best),
        "final_intervals": intervals(rows[-1])}))
    for file, epoch in (("predictions.csv", best["epoch"]), ("predictions_final.csv", epochs)):
        grades, probabilities = predictions[epoch - 1]
        write_predictions(path / file, names, labels, grades, probabilities, probabilities[:, 2:].sum(axis=1),
                          "classification", epoch=epoch)
    return path


def synthetic_sweep(root: Path, seeds: dict[tuple[int, str], int], grid: dict[str, tuple] | None = None,
                    epochs: int = 6) -> Path:
    """A sweep folder of synthetic runs: per (depth, weights) arm its number of seeds, at every combination
    of `grid`'s values (flat config keys, e.g. {"train.lr": (0.001, 0.01)}: factors of the sweep):
    root/resnet<depth>_<init>/<lr0.001_...>/seed<seed>. The runs' skill is higher pretrained and deeper and
    peaks at lr 0.01, so the figures have something to show."""
    import itertools
    import math

    grid = grid or {}
    for (depth, weights), count in seeds.items():
        init = "scratch" if weights == "none" else "pretrained"
        for values in itertools.product(*grid.values()):
            setting = dict(zip(grid, values))
            lr = float(setting.get("train.lr", 0.01))
            skill = 0.55 + 0.1 * (init == "pretrained") + 0.05 * (depth > 18) - 0.04 * math.log10(lr / 0.01) ** 2
            where = "_".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in setting.items())
            for seed in range(count):
                synthetic_run(root / f"resnet{depth}_{init}" / where / f"seed{seed}", depth, weights, seed,
                              max(0.05, skill), setting, epochs)
    return root


def legends_over_axes(fig) -> list[str]:
    """Each legend (an axes' or the figure's) that covers part of an axes' plotting area (a colour bar's
    included), as "'<first entry>' over '<axes title or label>'", in a saved figure (its layout as saved; the
    report's figures are on an Agg canvas)."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    found = []
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            overlap = Bbox.intersection(box, ax.get_window_extent(renderer))
            if overlap is not None and overlap.width > 1 and overlap.height > 1:
                name = ax.get_title() or ax.get_ylabel() or ax.get_label()
                first = legend.get_texts()[0].get_text() if legend.get_texts() else ""
                found.append(f"{first!r} over {name!r}")
    return found
