"""The four-run comparison report, from real (tiny) training runs."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from dr_resnet.model.resnet import imagenet_cache_path
from dr_resnet.results.metrics import collapse
from dr_resnet.results.report import main, report
from dr_resnet.results.rundir import STATUS_FILE
from dr_resnet.results.stats import OVER_SEEDS, t_quantile
from dr_resnet.training import checkpoint
from dr_resnet.training.train import main as train

from helpers import (
    REPO,
    preprocessed_dataset,
    synthetic_run,
)

ARMS = {"resnet18_pretrained": (18, "imagenet"), "resnet18_scratch": (18, "none"),
        "resnet50_pretrained": (50, "imagenet"), "resnet50_scratch": (50, "none")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """The four arms, 2 epochs each on 24 images at 32 px; 'ImageNet' weights are a torchvision-format
    state dict placed where torchvision's cache expects the real file. ResNet18 scratch holds out a
    quarter of its training images to choose its epoch on."""
    base = tmp_path_factory.mktemp("report")
    data = preprocessed_dataset(base, 24, 9, seed=8, size=32)
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(base / "torch_home"))
    for depth in (18, 50):
        path = imagenet_cache_path(depth)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(getattr(torchvision.models, f"resnet{depth}")().state_dict(), path)
    for arm, (depth, weights) in ARMS.items():
        assert train(["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}", "data.image_size=32",
                      "train.batch_size=8", "train.epochs=2", "train.warmup_epochs=0", "data.workers=0",
                      f"model.depth={depth}", f"model.weights={weights}", f"output.dir={base / 'sweep' / arm}",
                      *(["data.val_fraction=0.25", "data.min_val_images=1"] if arm == "resnet18_scratch"
                        else ["data.val_fraction=0"])]) == 0
    mp.undo()
    return base / "sweep"


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_csv(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def comparisons_of(out):
    """comparisons.json's comparisons, in order."""
    return json.loads((out / "comparisons.json").read_text())["comparisons"]


def test_four_runs(sweep, tmp_path):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    from PIL import Image

    for name in ("accuracy_resnet18.png", "accuracy_resnet50.png", "confusion_matrices.png"):
        pixels = np.asarray(Image.open(out / name).convert("RGB")).astype(int)
        assert ((pixels.max(axis=2) - pixels.min(axis=2)) > 100).sum() > 1000, name  # coloured curves or cells drawn
    table = read_csv(out / "results.csv")
    assert sorted(table) == sorted(ARMS)
    for arm in ARMS:
        rows = rows_of(sweep / arm)
        row = table[arm]
        assert float(row["final_test_acc"]) == pytest.approx(rows[-1]["test_acc"])
        assert float(row["final_qwk"]) == pytest.approx(rows[-1]["test_qwk"])
        assert row["status"] == "done" and row["epochs"] == "2/2"
        assert row["weights"] == ARMS[arm][1]
        # Nothing chosen on test: the best held-out QWK where the run held images out, else the final epoch.
        assert not any(column.startswith("best") for column in row)
        if arm == "resnet18_scratch":
            chosen = max(rows, key=lambda r: (r["val_qwk"], -r["epoch"]))
            assert row["selected_by"] == "held-out qwk"
        else:
            chosen = rows[-1]
            assert row["selected_by"] == "final"
        # The run's own choice, as in its checkpoint_best.pt.
        assert int(row["selected_epoch"]) == chosen["epoch"] == checkpoint.load(sweep / arm / "checkpoint_best.pt")["epoch"]
        assert float(row["selected_qwk"]) == pytest.approx(chosen["test_qwk"])
        assert float(row["selected_test_acc"]) == pytest.approx(chosen["test_acc"])
        assert row["recall_at_selected"] == " ".join(f"{r:.2f}" for r in chosen["test_recall"])
        assert row["collapsed"] == (collapse(np.array(chosen["confusion_matrix"])) or "no")
        assert row["selected_acc_95ci"].startswith(f"{chosen['test_acc']:.3f} (") and row["ci_resampled"] == "patients"
        held_out = f"{chosen['val_qwk']:.4f}" if arm == "resnet18_scratch" else "-"  # only it held images out
        assert row["held_out_qwk"] == ("" if held_out == "-" else str(chosen["val_qwk"]))
        # results.md shows the page's columns (results.csv every one): lines a reader can follow at 200 runs
        assert (f"| {arm} | done | 2/2 | {row['selected_by']} | {row['selected_epoch']} | "
                f"{held_out} | {row['collapsed']} | "
                f"{row['selected_acc_95ci']} | {row['selected_qwk_95ci']} | {row['selected_auc_95ci']} | patients | "
                f"{chosen['test_ece']:.4f} | {row['recall_at_selected']} |") in (out / "results.md").read_text()
    # The four arms make 4 comparisons at each of 2 epochs. One seed a side: the test set's interval alone, no
    # verdict, outside every family: no family is left to correct.
    from dr_resnet.results.stats import ONE_SEED

    found = json.loads((out / "comparisons.json").read_text())
    made = [c for c in found["comparisons"] if c["status"] == "compared"]
    assert len(made) == 8 and found["families"] == []
    assert all(c["qwk"]["over"] == ONE_SEED and "verdict" not in c["qwk"] and c["family"] == "" for c in made)
    md = (out / "results.md").read_text()
    assert "Families, declared before any result is read: none" in md and "descriptive" in md
    # The run with a held-out part has referable DR at the screening operating points, fitted there; every
    # finished run has its final epoch's interval.
    summary = json.loads((sweep / "resnet18_scratch" / "summary.json").read_text())
    assert [p["target_specificity"] for p in summary["operating_points"]] == [0.90, 0.98]
    assert "## Referable DR at screening operating points" in (out / "results.md").read_text()
    assert "| resnet18_scratch | 90% |" in (out / "results.md").read_text()
    for arm in ARMS:
        final = json.loads((sweep / arm / "summary.json").read_text())["final_intervals"]["qwk"]
        assert table[arm]["final_qwk_95ci"] == f"{final['value']:.3f} ({final['low']:.3f}-{final['high']:.3f})"
        assert final["value"] == pytest.approx(rows_of(sweep / arm)[-1]["test_qwk"])


def test_one_run_in_place(sweep, tmp_path):
    run = tmp_path / "resnet50_scratch"
    shutil.copytree(sweep / "resnet50_scratch", run)
    written = report(run)
    # one arm: nothing to compare (no comparisons.json), and no initialisation it never had named as missing
    assert {p.name for p in written} == {"accuracy_resnet50.png", "confusion_matrices.png", "results.md", "results.csv",
                                         "calibration.png", "report.html"}
    assert list(read_csv(run / "results.csv")) == ["resnet50_scratch"]
    assert "no run of" not in (run / "results.md").read_text()


def test_runs_in_progress_and_arms_not_run(sweep, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(sweep / "resnet18_scratch", runs / "resnet18_scratch")
    shutil.copytree(sweep / "resnet18_pretrained", runs / "resnet18_pretrained")
    # In progress: one epoch of two written so far.
    metrics = runs / "resnet18_scratch" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    # Not run: the launcher could not get ImageNet weights for this arm.
    (runs / "resnet18_pretrained" / "metrics.jsonl").unlink()
    status = {"status": "not run", "reason": "ImageNet weights missing"}
    (runs / "resnet18_pretrained" / STATUS_FILE).write_text(json.dumps(status))
    report(runs)
    table = read_csv(runs / "results.csv")
    assert table["resnet18_scratch"]["status"] == "in progress" and table["resnet18_scratch"]["epochs"] == "1/2"
    assert table["resnet18_pretrained"]["status"] == "not run: ImageNet weights missing"
    assert "not run: ImageNet weights missing" in (runs / "results.md").read_text()
    assert (runs / "accuracy_resnet18.png").is_file() and not (runs / "accuracy_resnet50.png").exists()


def test_a_second_report_reads_the_results_cache_and_a_rewritten_file_is_scored_again(sweep, tmp_path, capsys):
    """The report keeps what each predictions file gives it (the comparisons' scores, the calibration) in its
    out folder's .report_cache, keyed by the file's size, modification time and inode: a second report
    computes nothing and writes the same results; a predictions.csv written again is scored again, alone;
    damaged entries are computed again."""
    import os
    import re

    runs, out = tmp_path / "sweep", tmp_path / "out"
    shutil.copytree(sweep, runs, ignore=shutil.ignore_patterns("*.pt"))
    files = sorted(runs.glob("*/predictions*.csv"))
    files = [f for f in files if f.name in ("predictions.csv", "predictions_final.csv")]

    def made() -> tuple[int, dict]:
        report(runs, out)
        line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("results cache")][-1]
        assert line.startswith(f"results cache {out / '.report_cache'}: ")
        return int(re.search(r"(\d+) computed", line).group(1)), {
            name: (out / name).read_bytes() for name in ("comparisons.json", "results.csv", "results.md")}

    computed, first = made()
    assert computed == len(files) == 8 and len(list((out / ".report_cache").glob("*.npz"))) == 8
    assert made() == (0, first)
    touched = runs / "resnet18_scratch" / "predictions.csv"
    touched.write_bytes(touched.read_bytes())
    before = touched.stat()
    os.utime(touched, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    assert made() == (1, first)
    for entry in (out / ".report_cache").glob("*.npz"):
        entry.write_bytes(b"not an npz file")
    assert made() == (8, first)
    assert made() == (0, first)


def test_the_runs_keep_no_predictions_once_compared(sweep):
    """The comparisons read each run's predictions once (into the results cache) and keep none of them:
    at 200 runs of 50,000 images every run's predictions held until the end filled gigabytes."""
    import gc

    from dr_resnet.results.arms import compare_arms, find_runs, group_arms
    from dr_resnet.results.predictions import Predictions

    runs = find_runs(sweep)
    compared = [c for epoch in ("selected", "final") for c in compare_arms(group_arms(runs), epoch)]
    assert [c["status"] for c in compared] == ["compared"] * 8
    gc.collect()
    assert sum(type(o) is Predictions for o in gc.get_objects()) == 0
    assert all(r.calibration() is not None for r in runs)  # the calibration figure's bins, kept instead


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_a_damaged_metrics_log_is_one_line_naming_the_file_and_line(sweep, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(sweep / "resnet18_scratch", runs / "resnet18_scratch")
    log = runs / "resnet18_scratch" / "metrics.jsonl"
    first, second = log.read_text().splitlines()
    log.write_text(first[: len(first) // 2] + "\n" + second + "\n")  # line 1 cut short, line 2 whole
    assert main([str(runs), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {log}: line 1 is not JSON (")
    assert err.endswith("the file is damaged")


def test_gallery_shows_right_and_wrong_photos_per_grade_with_heat_maps(runs, tmp_path):
    import numpy as np
    from PIL import Image

    from dr_resnet.serving.gallery import pick

    chosen = pick(np.array([0, 0, 0, 2, 2, 4]), np.array([0, 1, 0, 2, 0, 3]), per_cell=1)
    assert chosen[(0, True)] == [0] and chosen[(0, False)] == [1] and chosen[(2, True)] == [3]
    assert chosen[(2, False)] == [4] and chosen[(4, False)] == [5] and chosen[(1, True)] == []
    pytest.importorskip("captum", reason="heat maps need the [cam] extra (captum)")
    written = report(runs["classification"].parent, tmp_path, gallery=True)
    galleries = sorted(p.name for p in written if p.name.startswith("gallery_"))
    assert galleries == ["gallery_cls.png", "gallery_ord.png", "gallery_reg.png"]
    with Image.open(tmp_path / "gallery_cls.png") as im:
        assert im.size[0] > 400 and im.size[1] > 600


def test_gallery_without_captum_stops_at_once_with_one_line_naming_the_extra(runs, tmp_path, monkeypatch, capsys):
    """report --gallery where captum (the [cam] extra) does not import: exit 2 with one line that says what to
    install, before any figure or table is written."""
    for name in [m for m in sys.modules if m == "captum" or m.startswith("captum.")] + ["captum"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert main([str(runs["classification"].parent), "--out", str(tmp_path / "out"), "--gallery"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err], err
    from dr_resnet.serving.cam import CAM_EXTRA

    assert err.startswith("error: heat maps need captum") and err.endswith(CAM_EXTRA)
    assert not (tmp_path / "out").exists()


def arm_copy(source: Path, target: Path, depth: int, weights: str, seed: int = 0, like: Path | None = None) -> Path:
    """A copy of a trained run directory presented as another arm (config.yaml's depth, weights, seed); with
    `like`, the rest of its config is that run's (seeds of one arm share everything else)."""
    import yaml

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.pt"))
    cfg = yaml.safe_load(((like or target) / "config.yaml").read_text())
    cfg["model"].update(depth=depth, weights=weights)
    cfg["train"]["seed"] = seed
    (target / "config.yaml").write_text(yaml.safe_dump(cfg))
    return started_as(target, weights)


def started_as(target: Path, weights: str) -> Path:
    """A copied run's record of its initialisation (summary.json) made that of the weights it is presented with:
    the record, where there is one, is what the report reads."""
    from dr_resnet.config import recorded_initialisation

    initialisation = recorded_initialisation(weights)
    summary = json.loads((target / "summary.json").read_text())
    (target / "summary.json").write_text(json.dumps({**summary, "initialisation": initialisation}))
    return target


def test_a_numeric_ablation_is_compared_each_value_against_the_smallest_and_describes(runs, tmp_path):
    """Three EMA decays at ResNet18 scratch (a numeric factor): 0.99 and 0.999 each against 0 (no EMA), at both
    epochs, outside every family (no verdict); never 0.99 against 0.999."""
    import yaml

    sweep = tmp_path / "sweep"
    for name, decay in (("classification", 0.0), ("ordinal", 0.999), ("regression", 0.99)):
        run = arm_copy(runs[name], sweep / f"ema{decay}", 18, "none", like=runs["classification"])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["train"]["ema"] = decay
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    report(sweep, tmp_path / "out")
    comparisons = comparisons_of(tmp_path / "out")
    ablation = [(c["comparison"], c["epoch"]) for c in comparisons if c["factor"] == "train.ema"]
    assert ablation == [(f"train.ema: 0.0 vs {v} at resnet18 scratch", e) for e in ("selected", "final")
                        for v in ("0.99", "0.999")]
    made = [c for c in comparisons if c["factor"] == "train.ema"]
    assert all(c["status"] == "compared" and c["family"] == "" and "verdict" not in c["qwk"] for c in made)
    assert made[0]["a"] == "resnet18 scratch, train.ema=0.0" and made[0]["b"] == "resnet18 scratch, train.ema=0.99"


def test_report_gives_intervals_and_paired_comparisons_of_the_arms(runs, tmp_path):
    import numpy as np

    from dr_resnet.results.predictions import read_predictions
    from dr_resnet.results.stats import paired_comparison

    sweep = tmp_path / "sweep"
    arm_copy(runs["classification"], sweep / "resnet18_scratch", 18, "none")
    arm_copy(runs["ordinal"], sweep / "resnet18_pretrained", 18, "imagenet")
    arm_copy(runs["regression"], sweep / "resnet50_scratch", 50, "none")
    # resnet50_pretrained could not run (its weights were missing), as in the demo.
    import yaml

    (sweep / "resnet50_pretrained").mkdir()
    cfg = yaml.safe_load((sweep / "resnet50_scratch" / "config.yaml").read_text())
    cfg["model"]["weights"] = "imagenet"
    (sweep / "resnet50_pretrained" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (sweep / "resnet50_pretrained" / "launch_status.json").write_text(json.dumps({"status": "not run", "reason": "no weights"}))
    report(sweep, tmp_path / "out")
    every = comparisons_of(tmp_path / "out")
    assert [c["epoch"] for c in every] == ["selected"] * 4 + ["final"] * 4
    comparisons = {c["comparison"]: c for c in every if c["epoch"] == "selected"}
    assert set(comparisons) == {"pretrained vs scratch at ResNet18", "pretrained vs scratch at ResNet50",
                                "depth 50 vs 18, scratch", "depth 50 vs 18, pretrained"}
    assert comparisons["pretrained vs scratch at ResNet50"]["status"].startswith(
        "not compared: resnet50 pretrained has no predictions.csv (not run")
    pretraining = comparisons["pretrained vs scratch at ResNet18"]
    a, b = (read_predictions(runs[k] / "predictions.csv") for k in ("ordinal", "classification"))
    expected = paired_comparison(a.labels, (a.grades, a.referable_scores), (b.grades, b.referable_scores), a.patients)
    assert pretraining["status"] == "compared" and pretraining["images"] == 24 and pretraining["resampled"] == "patients"
    assert pretraining["qwk"] == expected["qwk"] and pretraining["mcnemar"] == [expected["mcnemar"]]
    assert pretraining["accuracy"]["difference"] == pytest.approx(np.mean(a.grades == a.labels) - np.mean(b.grades == b.labels))
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Paired comparisons" in md
    # the comparison names its collapsed runs (at this size some are): the runs table says the same of each
    named = "pretrained vs scratch at ResNet18" + (f" (collapsed: {len(pretraining['collapsed'])} of 2 runs; comparisons.json "
                                         f"names them)" if pretraining.get("collapsed") else "")
    assert f"| {named} | resnet18 pretrained | resnet18 scratch | 24 (patients, one seed) |" in md
    with open(tmp_path / "out" / "results.csv") as f:
        flagged = {r["run"] for r in csv.DictReader(f) if r["collapsed"] not in ("no", "")}
    assert set(pretraining.get("collapsed", [])) == flagged & {"resnet18_pretrained", "resnet18_scratch"}
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    summary = json.loads((runs["classification"] / "summary.json").read_text())
    qwk = summary["intervals"]["qwk"]
    assert rows["resnet18_scratch"]["selected_qwk_95ci"] == f"{qwk['value']:.3f} ({qwk['low']:.3f}-{qwk['high']:.3f})"
    assert rows["resnet18_scratch"]["ci_resampled"] == "patients" and rows["resnet50_pretrained"]["selected_qwk_95ci"] == ""
    # Runs evaluated on different images are refused, by name.
    kept = (sweep / "resnet18_scratch" / "predictions.csv").read_text().splitlines()
    (sweep / "resnet18_scratch" / "predictions.csv").write_text("\n".join(kept[:-3]) + "\n")
    report(sweep, tmp_path / "out2")
    refused = {(c["comparison"], c["epoch"]): c for c in comparisons_of(tmp_path / "out2")}
    assert "resnet18_pretrained and resnet18_scratch were evaluated on different images (24 and 21)" in \
        refused["pretrained vs scratch at ResNet18", "selected"]["status"]
    # The final epochs are compared from predictions_final.csv, untouched here: nothing was held out, so the
    # final epoch is the selected one and the figures are the same as before the cut.
    final = refused["pretrained vs scratch at ResNet18", "final"]
    assert final["status"] == "compared" and final["qwk"] == pretraining["qwk"]
    (sweep / "resnet18_scratch" / "predictions_final.csv").unlink()
    report(sweep, tmp_path / "out3")
    gone = {(c["comparison"], c["epoch"]): c for c in comparisons_of(tmp_path / "out3")}
    assert gone["pretrained vs scratch at ResNet18", "final"]["status"].startswith(
        "not compared: resnet18 scratch has no predictions_final.csv (trained before dr-resnet 0.3.1")


def test_seed_replicates_are_summarised_and_compared_pooled(runs, tmp_path):
    import numpy as np

    from dr_resnet.results.predictions import read_predictions
    from dr_resnet.results.stats import paired_comparison

    sweep = tmp_path / "sweep"
    replicates = {("resnet18_scratch", 0): "classification", ("resnet18_scratch", 1): "regression",
                  ("resnet18_pretrained", 0): "ordinal", ("resnet18_pretrained", 1): "classification",
                  ("resnet18_pretrained", 2): "regression"}
    for (arm, seed), head in replicates.items():
        arm_copy(runs[head], sweep / arm / f"seed{seed}", 18, "imagenet" if "pretrained" in arm else "none", seed,
                 like=runs["classification"])
    report(sweep, tmp_path / "out")
    with open(tmp_path / "out" / "results.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["resnet18_scratch/seed0", "resnet18_scratch/seed1",
                                                        "resnet18_pretrained/seed0", "resnet18_pretrained/seed1",
                                                        "resnet18_pretrained/seed2"]  # config.INITIALISATIONS' order
    md = (tmp_path / "out" / "results.md").read_text()
    chosen = {}
    for (arm, seed), head in replicates.items():
        summary = json.loads((runs[head] / "summary.json").read_text())
        chosen.setdefault(arm, []).append(summary["selected"]["test_qwk"])
    qwk = np.array(chosen["resnet18_scratch"])
    assert "| resnet18 scratch | 0, 1 | " in md and f"{qwk.mean():.3f} +- {qwk.std(ddof=1):.3f}" in md
    # The final epochs too (the fixtures' runs hold nothing out, so the same values), and the collapsed seeds.
    seeds = md[md.index("## Seeds"):]
    assert seeds.count(f"{qwk.mean():.3f} +- {qwk.std(ddof=1):.3f}") == 2 and "final-epoch QWK" in seeds
    pooled, pooled_final = comparisons_of(tmp_path / "out")
    # nothing held out: the same epoch; the selected one is in the question's family and has its verdict
    assert pooled_final["epoch"] == "final" and pooled_final["family"] == "" and "verdict" not in pooled_final["qwk"]
    assert {k: v for k, v in pooled["qwk"].items() if k in pooled_final["qwk"]} == pooled_final["qwk"]
    assert pooled["status"] == "compared" and pooled["seeds"] == [0, 1] and len(pooled["mcnemar"]) == 2
    a = [read_predictions(runs[h] / "predictions.csv") for h in ("ordinal", "classification")]
    b = [read_predictions(runs[h] / "predictions.csv") for h in ("classification", "regression")]
    expected = paired_comparison(a[0].labels, [(p.grades, p.referable_scores) for p in a],
                                 [(p.grades, p.referable_scores) for p in b], a[0].patients)
    assert {k: pooled["qwk"][k] for k in expected["qwk"]} == expected["qwk"]
    # ResNet18 alone: the question's family is pretrained vs scratch at ResNet18 (m = 1), at 95%, t with 1 degree of freedom
    q = pooled["qwk"]
    assert json.loads((tmp_path / "out" / "comparisons.json").read_text())["families"][0]["m"] == 1
    half = t_quantile(0.95, 1) * q["se"]
    # (kept within -2..2, what a QWK difference can be: at 1 degree of freedom t's 12.7 can reach beyond)
    assert (q["family_low"], q["family_high"]) == pytest.approx((max(q["difference"] - half, -2),
                                                                 min(q["difference"] + half, 2)))
    assert q["verdict"].startswith("no difference detected") or q["verdict"].endswith("better")
    assert (q["family_low"] > 0 or q["family_high"] < 0) == q["verdict"].endswith("better")
    named = "pretrained vs scratch at ResNet18" + (f" (collapsed: {len(pooled['collapsed'])} of 4 runs; comparisons.json names "
                                         f"them)" if pooled.get("collapsed") else "")
    assert (f"| {named} | resnet18 pretrained | resnet18 scratch | 24 (patients, seeds 0, 1) | "
            f"{q['difference']:+.3f} | {q['family_low']:+.3f} to {q['family_high']:+.3f} (95% simultaneous, "
            f"the question, m = 1) | {q['verdict']} |") in md
    assert "## What these seeds can detect" in md
    # A seed still going (1 of its 2 epochs) is not counted in the seed table, which says so.
    going = arm_copy(runs["ordinal"], sweep / "resnet18_scratch" / "seed2", 18, "none", 2, like=runs["classification"])
    lines = (going / "metrics.jsonl").read_text().splitlines()
    (going / "metrics.jsonl").write_text(lines[0] + "\n")
    report(sweep, tmp_path / "out2")
    seeds_md = (tmp_path / "out2" / "results.md").read_text()
    seeds_md = seeds_md[seeds_md.index("## Seeds"):]
    assert "| resnet18 scratch | 0, 1 (1 more still going) | " in seeds_md
    assert f"{qwk.mean():.3f} +- {qwk.std(ddof=1):.3f}" in seeds_md and "1 run(s) still going are not counted" in seeds_md
    assert (tmp_path / "out" / "accuracy_resnet18.png").is_file()


def test_arms_are_the_runs_that_trained_the_same_thing(runs, tmp_path):
    """Two ResNet50-pretrained runs that differ in their head are two arms (named by it, drawn and listed
    apart) compared with each other; seeds of one arm pool; a per-arm recipe key is not a factor."""
    import yaml

    from dr_resnet.results.arms import find_runs, group_arms
    from dr_resnet.results.predictions import read_predictions
    from dr_resnet.results.stats import paired_comparison

    sweep = tmp_path / "sweep"
    arm_copy(runs["classification"], sweep / "r50_cls" / "seed0", 50, "imagenet")
    arm_copy(runs["regression"], sweep / "r50_cls" / "seed1", 50, "imagenet", seed=1, like=runs["classification"])
    arm_copy(runs["ordinal"], sweep / "r50_ord", 50, "imagenet")
    arm_copy(runs["regression"], sweep / "r50_scratch", 50, "none", like=runs["classification"])
    config = sweep / "r50_scratch" / "config.yaml"  # the scratch arm's own learning rate: its recipe, not a factor
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["lr_base_scratch"] = 0.2
    cfg["output"]["dir"], cfg["data"]["workers"] = "elsewhere", 3  # where it ran: not what it is
    config.write_text(yaml.safe_dump(cfg))
    arms = group_arms(find_runs(sweep))
    assert [(a.name, [r.name for r in a.runs]) for a in arms] == [
        ("resnet50 scratch, model.head=classification", ["r50_scratch"]),
        ("resnet50 pretrained, model.head=classification", ["r50_cls/seed0", "r50_cls/seed1"]),
        ("resnet50 pretrained, model.head=ordinal", ["r50_ord"])]
    report(sweep, tmp_path / "out")
    comparisons = {(c["comparison"], c["epoch"]): c for c in comparisons_of(tmp_path / "out")}
    heads = comparisons["model.head: classification vs ordinal at resnet50 pretrained", "selected"]
    assert heads["a"] == "resnet50 pretrained, model.head=classification" and heads["seeds"] == [0]
    a, b = (read_predictions(runs[k] / "predictions.csv") for k in ("classification", "ordinal"))
    assert heads["qwk"] == paired_comparison(a.labels, (a.grades, a.referable_scores), (b.grades, b.referable_scores),
                                             a.patients)["qwk"]
    pretraining = comparisons["pretrained vs scratch at ResNet50, model.head=classification", "selected"]
    assert pretraining["status"] == "compared" and pretraining["b"] == "resnet50 scratch, model.head=classification"
    assert comparisons["pretrained vs scratch at ResNet50, model.head=ordinal", "selected"]["status"] == (
        "not compared: resnet50 scratch, model.head=ordinal has no run")
    md = (tmp_path / "out" / "results.md").read_text()
    # The comparisons an absent arm rules out: one line in the table, not a row per pair and epoch.
    assert md.count("| not compared: no run of resnet50 scratch, model.head=ordinal |") == 1
    assert "ordinal has no run" not in md
    # Along the factor: the pretraining comparison made at each value of model.head, its figure.
    along = md.split("## Along model.head")[1].split("\n## ")[0]
    row = (f"| classification | pretrained vs scratch at ResNet50, model.head=classification | "
           f"{pretraining['qwk']['difference']:+.3f} (")
    assert row in along and "ordinal" not in along.split("|---|")[-1]  # no comparison was made at ordinal
    assert (tmp_path / "out" / "factor_model_head.png").is_file()
    # Its scores: a factor (no sweep.json names it searched), every value reported and none chosen; the runs
    # held nothing out, so no held-out figure stands beside the test one.
    scores = md.split("## Scores along model.head")[1].split("\n## ")[0]
    assert "model.head is a factor: every value is the experiment, none is chosen" in scores
    assert "| resnet50 pretrained | ordinal | - | " in scores and "chosen |" not in scores
    # Named searched in the sweep's manifest, the key's held-out choice would be marked, and the report says how
    # a fair comparison runs that choice (on fresh seeds).
    (sweep / "sweep.json").write_text(json.dumps({"searched": ["model.head"]}))
    report(sweep, tmp_path / "out2")
    scores = (tmp_path / "out2" / "results.md").read_text().split("## Scores along model.head")[1].split("\n## ")[0]
    assert "model.head is a searched key" in scores and "launch.sweep --tune" in scores
    assert "| resnet50 pretrained, model.head=classification | 0, 1 | " in md  # the seeds table: one arm of two
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<tr") == md.count("\n| ")  # the same tables, heading rows and rows, on the page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on this machine (no sandbox: tests may run as root), logging the page's console."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_html_loads_in_a_real_browser_with_its_tables_and_figures(runs, tmp_path):
    import numpy as np
    from PIL import Image

    pytest.importorskip("captum", reason="the page's galleries are the [cam] extra's (pip install -e '.[cam]')")

    written = report(runs["classification"].parent, tmp_path, gallery=True)
    page = tmp_path / "report.html"
    assert page in written
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch
    figures = sorted(p.name for p in written if p.suffix == ".png")
    # curves, matrices, calibration, the three heads against each other (factor_model_head.png), 3 galleries
    assert text.count('src="data:image/png;base64,') == len(figures) == 7 and "factor_model_head.png" in figures
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    assert f'data-figures-shown="{len(figures)}"' in dom.stdout  # every embedded figure decoded by the browser
    for run in ("cls", "reg", "ord"):
        assert f"<td>{run}</td>" in dom.stdout
    assert 'id="comparisons"' in dom.stdout and "(95% CI)" in dom.stdout
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr  # no script error, no failed load
    shot = tmp_path / "shot.png"
    # Tall enough for the tables above the figures (the answer, the comparisons, every run's row and their notes).
    result = chromium(f"--screenshot={shot}", "--window-size=1280,7000", "--hide-scrollbars", page.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (7000, 1280)
    top, rest = pixels[:500], pixels[500:]
    assert (top.sum(axis=2) < 200).sum() > 2000  # the title and the answer: dark text on white
    assert text.index('id="answer"') < text.index('id="comparisons"') < text.index('id="results"')  # the answer first
    colourful = (rest.max(axis=2) - rest.min(axis=2)) > 100  # the figures' coloured curves, matrices, heat maps
    assert colourful.sum() > 20_000


TORCH_BLOCKED = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"torch is not installed here ({name})")
sys.meta_path.insert(0, NoTorch())
from dr_resnet.results.report import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")]
sys.exit(code)
"""


def test_the_results_layer_and_the_report_run_without_torch(sweep, tmp_path):
    """metrics, stats, predictions, arms, rundir and the report import no torch: the report runs on a
    laptop that has none (torch made unimportable in a fresh interpreter)."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, str(sweep), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {"results.md", "results.csv", "comparisons.json", "report.html"} <= {p.name for p in out.iterdir()}


def test_a_tune_sweeps_report_has_its_tuning_section_without_torch(sweep, tmp_path):
    """A sweep folder with tuning.json (failed, diverged and lost trials among them): the tuning table and
    its figures in results.md and report.html, the report still torch-free."""
    from test_tuning import failing_arm

    folder = tmp_path / "sweep"
    shutil.copytree(sweep, folder)
    (folder / "tuning.json").write_text(json.dumps(failing_arm(folder / "tune")))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, str(folder), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = (out / "results.md").read_text()
    assert "## Tuning (phase 1 of --tune)" in results and "| r18 | 7 | 4 | 1 / 1 | 1 (lr2): N incomplete |" in results
    page = (out / "report.html").read_text()
    assert 'id="tuning"' in page and "median best held-out score of k trials" in page  # figures: by their captions
    assert "held-out score against train_lr" in page
    assert (out / "slice_train_lr.png").is_file() and (out / "expected_best.png").is_file()
    assert not (out / "tune").exists()  # the trials are not compared as arms of the sweep


def test_runs_of_one_comparison_that_ran_in_other_precisions_are_named(runs, tmp_path, capsys):
    """amp=auto on a mixed cluster can give one arm bf16 and the other fp16: the configs agree, what ran
    differs. The report says so, naming the runs, in one line and beside the comparison."""
    import yaml

    sweep = tmp_path / "sweep"
    for arm, weights in (("resnet18_pretrained", "imagenet"), ("resnet18_scratch", "none")):
        arm_copy(runs["classification"], sweep / arm, 18, weights, like=runs["classification"])
    cfg = yaml.safe_load((sweep / "resnet18_scratch" / "config.yaml").read_text())
    assert cfg["effective"]["precision"] == "fp32"
    cfg["effective"]["precision"] = "bf16"
    (sweep / "resnet18_scratch" / "config.yaml").write_text(yaml.safe_dump(cfg))
    report(sweep, tmp_path / "out")
    expected = "runs differ in precision fp32 (resnet18_pretrained); bf16 (resnet18_scratch)"
    assert f"warning: pretrained vs scratch at ResNet18: {expected}" in capsys.readouterr().err
    comparisons = comparisons_of(tmp_path / "out")
    assert {c["warning"] for c in comparisons if c["status"] == "compared"} == {expected}
    assert f"(warning: {expected})" in (tmp_path / "out" / "results.md").read_text()


def test_a_learning_curve_is_drawn_against_the_realised_share_and_a_searched_keys_choice_is_the_held_out_one(tmp_path):
    """The held-out score's choice (made by answer.headline: see the searched-grid test) is marked in the scores
    along its key; a learning curve's x-axis is the share of training images each fraction really used."""
    from dr_resnet.results.factors import realised_shares
    from dr_resnet.results.report import plot_factor
    from dr_resnet.results.tables import factor_scores_table

    def entry(value, mean, images=None):
        return {"value": value, "mean": mean, "low": mean - 0.02, "high": mean + 0.02, "n": 3, "images": images}

    held_out = {"resnet18 scratch": [entry("0.01", 0.70), entry("0.1", 0.80), entry("0.3", 0.75)]}
    test = {"resnet18 scratch": [entry("0.01", 0.72), entry("0.1", 0.71), entry("0.3", 0.90)]}
    chosen = {"resnet18 scratch": "0.1"}  # held-out's best, not test's 0.3
    table = factor_scores_table("train.lr", held_out, test, chosen, True, None)
    marked = [row.cells for row in table.rows if row.cells[-1] == "chosen"]
    assert marked == [["resnet18 scratch", "0.1", "0.800 (0.780 to 0.820)", "0.710 (0.690 to 0.730)", "3", "chosen"]]
    # 10% of the patients kept 150 of 1000 images (whole patients, every grade): the curve is drawn at 15%.
    curve = {"resnet18 scratch": [entry("0.1", 0.5, 150.0), entry("0.5", 0.7, 520.0), entry("1", 0.8, 1000.0)]}
    assert realised_shares(curve) == {"resnet18 scratch": [0.15, 0.52, 1.0]}
    assert realised_shares({"x": [entry("0.1", 0.5, 150.0)]}) is None  # no point at 1: the fractions as set
    plot_factor("data.train_fraction", curve, curve, tmp_path / "curve.png", shares=realised_shares(curve),
                steps="same")
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_families_count_every_planned_member_but_one_seed_comparisons_and_an_undefined_error_gives_no_verdict():
    """The question's family: 5 planned comparisons, one not made (an arm did not run: still counted), one made
    with one seed a side (outside the correction), three with seeds: m = 4, intervals at 1 - 0.05/4, each
    verdict read from its own interval; a NaN standard error (one test patient) gives no verdict at all."""
    import math

    from dr_resnet.results.arms import declare_families

    def made(name, difference, se, df):
        entry = {"difference": difference, "se": se, "df": df, "seed_variance": 0.0, "test_set_covariance": se ** 2}
        return {"comparison": name, "epoch": "selected", "factor": "depth", "setting": {}, "status": "compared",
                "a": "A", "b": "B", "seeds": [0, 1, 2] if df else [0], "qwk": entry}

    comparisons = [made("wide", 0.01, 0.01, 2), made("clear", 0.2, 0.01, 2), made("one seed", 0.3, 0.01, None),
                   {"comparison": "absent", "epoch": "selected", "factor": "initialisation", "setting": {},
                    "status": "not compared: resnet50 pretrained has no predictions.csv (not run: no weights)"},
                   made("undefined", 0.1, math.nan, 2),
                   {"comparison": "never planned", "epoch": "selected", "factor": "initialisation", "setting": {},
                    "status": "not compared: no run", "absent": ["resnet18 pretrained"]}]
    [family] = declare_families(comparisons)
    assert family["m"] == 4 and family["members"] == ["wide", "clear", "absent", "undefined"]
    wide, clear, one, _, undefined, _ = (c.get("qwk") for c in comparisons)
    half = t_quantile(1 - 0.05 / 4, 2) * 0.01
    assert (wide["family_low"], wide["family_high"]) == pytest.approx((0.01 - half, 0.01 + half))
    assert wide["verdict"].startswith("no difference detected (differences below") and clear["verdict"] == "A better"
    assert "verdict" not in one and comparisons[2]["family"] == ""
    assert undefined["verdict"].startswith("cannot be judged") and "family_low" not in undefined
    # No spread at all (both arms collapsed to one grade: every difference 0, se 0): no verdict, no detectable size.
    flat = [made("flat", 0.0, 0.0, 2)]
    declare_families(flat)
    assert flat[0]["qwk"]["verdict"].startswith("cannot be judged: no spread") and "detectable" not in flat[0]["qwk"]


def grid_run(source: Path, target: Path, depth: int, weights: str, seed: int, lr: float, held_out_qwk: float,
             shuffle: int) -> Path:
    """A copy of a run that held images out, presented as one trial of a grid over train.lr: its config's depth,
    weights, seed and learning rate set, every epoch's held-out QWK set to `held_out_qwk` (so its selected epoch
    is the first), and its test grades redrawn (seeded by `shuffle`) so that arms differ."""
    import yaml

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.pt"))
    cfg = yaml.safe_load((target / "config.yaml").read_text())
    cfg["model"].update(depth=depth, weights=weights)
    cfg["train"].update(seed=seed, lr=lr)
    (target / "config.yaml").write_text(yaml.safe_dump(cfg))
    started_as(target, weights)
    rows = rows_of(target)
    (target / "metrics.jsonl").write_text("".join(json.dumps({**r, "val_qwk": held_out_qwk}) + "\n" for r in rows))
    lines = (target / "predictions.csv").read_text().splitlines()
    rng = np.random.default_rng(shuffle)
    redrawn = [lines[0]] + [",".join([*cells[:4], str(rng.integers(0, 5)), *cells[5:]])
                            for cells in (line.split(",") for line in lines[1:])]
    (target / "predictions.csv").write_text("\n".join(redrawn) + "\n")
    return target


def test_a_searched_grid_is_answered_by_its_held_out_choice_and_winners_meet_winners(sweep, tmp_path):
    """A grid over a searched learning rate (sweep.json names it): each arm's answer is the rate its held-out score
    prefers (not the one test prefers), the answer leads results.md, and only the winners are compared: no pair of
    rates within an arm, no family along the searched key."""
    from dr_resnet.results.arms import find_runs, group_arms
    from dr_resnet.results.predictions import read_predictions

    grid = tmp_path / "grid"
    source = sweep / "resnet18_scratch"  # held out a quarter of its training images
    held_out = {("imagenet", 0.01): 0.3, ("imagenet", 0.1): 0.6, ("none", 0.01): 0.5, ("none", 0.1): 0.2}
    shuffle = 0
    for (weights, lr), score in held_out.items():
        for seed in (0, 1):
            shuffle += 1
            grid_run(source, grid / f"{weights}-lr{lr}" / f"seed{seed}", 18, weights, seed, lr, score + seed / 100, shuffle)
    # A third rate whose one lucky seed scored best but whose other seed diverged (NaN): it never wins.
    grid_run(source, grid / "imagenet-lr0.3" / "seed0", 18, "imagenet", 0, 0.3, 0.99, 90)
    grid_run(source, grid / "imagenet-lr0.3" / "seed1", 18, "imagenet", 1, 0.3, math.nan, 91)
    (grid / "sweep.json").write_text(json.dumps({"searched": ["train.lr"]}))
    assert len(group_arms(find_runs(grid))) == 5  # two arms x two rates (and the third), before the answer chooses
    out = tmp_path / "out"
    report(grid, out)
    md = (out / "results.md").read_text()
    assert md.startswith("# Answer\n")
    answer = md.split("## ")[0]
    rows = [line for line in answer.splitlines() if line.startswith("| resnet18")]
    assert [(r.split(" | ")[0].split(" (")[0], r.split(" | ")[1]) for r in rows] == [
        ("| resnet18 scratch", "held-out choice among 2 settings of train.lr (train.lr=0.01)"),
        ("| resnet18 pretrained", "held-out choice among 3 settings of train.lr (train.lr=0.1)")]
    assert rows[1].split(" | ")[2] == "0.605"  # the mean over its two seeds of the score that chose (named once above)
    assert rows[1].split(" | ")[-3] == "6"  # runs behind it: 3 rates x 2 seeds
    assert rows[1].split(" | ")[-1] == "- |"  # no backbone: no pretraining cost
    comparisons = comparisons_of(out)
    assert [(c["comparison"], c["epoch"]) for c in comparisons] == [("pretrained vs scratch at ResNet18", "selected"),
                                                                     ("pretrained vs scratch at ResNet18", "final")]
    chosen = comparisons[0]
    assert chosen["family"] == "the question" and chosen["seeds"] == [0, 1]
    # The pretrained side is the lr 0.1 trial's seeds: its QWK is theirs.
    from sklearn.metrics import cohen_kappa_score
    expected = np.mean([cohen_kappa_score(p.labels, p.grades, weights="quadratic") for p in
                        (read_predictions(grid / "imagenet-lr0.1" / f"seed{s}" / "predictions.csv") for s in (0, 1))])
    assert chosen["qwk"]["a"] == pytest.approx(expected)
    assert "## The question: comparisons with a verdict" in md
    assert "| resnet18 pretrained - resnet18 scratch | " in md.split("## The question")[1].split("\n## ")[0]
    # The searched key's curve still shows every rate, the held-out choice ringed and marked in its table.
    scores = md.split("## Scores along train.lr")[1].split("\n## ")[0]
    assert scores.count(" | chosen |") == 2 and (out / "factor_train_lr.png").is_file()
    # Its test band counts the seeds and the test patients, as the answer's interval does.
    from dr_resnet.results.arms import over_seeds_and_patients
    arm = next(a for a in group_arms(find_runs(grid)) if a.name == "resnet18 pretrained, train.lr=0.1")
    q = over_seeds_and_patients(arm.finished, ["qwk"])[0]["qwk"]
    assert "| resnet18 pretrained | 0.1 | 0.605 (" in scores and \
        f" | {q['mean']:.3f} ({q['low']:.3f} to {q['high']:.3f}) | 2 | chosen |" in scores
    assert "test QWK over seeds and test patients" in scores
    assert "## Along train.lr" not in md  # no comparisons at each searched value


def test_a_grid_not_declared_searched_is_a_curve_in_one_row_per_line_at_the_top(sweep, tmp_path):
    """Four learning rates nobody declared searched are a factor, every value reported: the answer gives each
    line (pretrained, scratch) one row with its curve's ends, the question one row for the family along it, and
    the tables' notes follow them; every value stays in the sections after."""
    grid = tmp_path / "grid"
    shuffle = 0
    for weights in ("imagenet", "none"):
        for lr in (0.003, 0.01, 0.03, 0.1):
            for seed in (0, 1):
                shuffle += 1
                grid_run(sweep / "resnet18_scratch", grid / f"{weights}-lr{lr}" / f"seed{seed}", 18, weights, seed, lr,
                         0.5, shuffle)
    out = tmp_path / "out"
    report(grid, out)
    md = (out / "results.md").read_text()
    answer = md.split("\n## ")[0]
    assert answer.startswith("# Answer\n\n| arm | setting (how chosen) | held-out score | ")
    rows = [line for line in answer.splitlines() if line.startswith("| resnet18")]
    assert [r.split(" | ")[0] for r in rows] == ["| resnet18 scratch along train.lr", "| resnet18 pretrained along train.lr"]
    assert all(" | a curve of 4 values of train.lr, every one reported" in r and "train.lr=0.003: " in r and
               "; train.lr=0.1: " in r and " | 2 | 8 | " in r for r in rows)
    question = md.split("## The question: comparisons with a verdict")[1].split("\n## ")[0]
    made = [line for line in question.splitlines() if line.startswith("| resnet18")]
    assert len(made) == 1 and made[0].startswith(
        "| resnet18 pretrained - resnet18 scratch along train.lr (4 values; section 'Along train.lr') | ")
    assert " | simultaneous within along train.lr (m = 4) | of 4 values made: " in made[0]
    along = md.split("## Along train.lr")[1].split("\n## ")[0]
    assert sum(line.startswith(("| 0.003 |", "| 0.01 |", "| 0.03 |", "| 0.1 |")) for line in along.splitlines()) == 4
    scores = md.split("## Scores along train.lr")[1].split("\n## ")[0]
    assert sum(line.startswith("| resnet18 ") for line in scores.splitlines()) == 8
    weighed = md.split("## What the answer rests on")[1]
    assert weighed.startswith("\n\n| what | value |\n")
    assert ("| search space | train.lr: a factor of 4 values (0.003, 0.01, 0.03, 0.1), every one reported, none chosen |"
            in weighed)


def test_a_run_still_going_is_compared_by_no_one_as_the_answer_does_not_count_it(sweep, tmp_path):
    """ResNet50 scratch at epoch 2 of 3 (its predictions.csv that epoch's): the answer says no finished run, and
    its comparisons say so too rather than pit its best epoch so far against finished arms."""
    import yaml

    copy = Path(shutil.copytree(sweep, tmp_path / "sweep", ignore=shutil.ignore_patterns("*.pt")))
    config = copy / "resnet50_scratch" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["epochs"] = 3  # planned 3: its 2 epochs so far are a run still going
    config.write_text(yaml.safe_dump(cfg))
    (copy / "resnet50_scratch" / "predictions_final.csv").unlink(missing_ok=True)
    report(copy, tmp_path / "out")
    comparisons = {(c["comparison"], c["epoch"]): c for c in comparisons_of(tmp_path / "out")}
    for question in ("pretrained vs scratch at ResNet50", "depth 50 vs 18, scratch"):
        for epoch in ("selected", "final"):
            assert comparisons[question, epoch]["status"] == (
                "not compared: resnet50 scratch has no finished run yet (epoch 2 of 3)")
    assert comparisons["pretrained vs scratch at ResNet18", "selected"]["status"] == "compared"


def test_a_searched_grid_that_could_not_be_chosen_still_counts_in_its_family(sweep, tmp_path):
    """An arm whose every searched setting has a diverged seed is not chosen, but it was planned: its comparison
    is a member of the question's family, made "not compared" with the reason, and m counts it."""
    grid = tmp_path / "grid"
    source = sweep / "resnet18_scratch"
    shuffle = 0
    for lr in (0.01, 0.1):
        for seed in (0, 1):
            shuffle += 1
            grid_run(source, grid / f"imagenet-lr{lr}" / f"seed{seed}", 18, "imagenet", seed, lr, 0.5, shuffle)
            grid_run(source, grid / f"none-lr{lr}" / f"seed{seed}", 18, "none", seed, lr,
                     math.nan if seed else 0.4, shuffle + 50)
    (grid / "sweep.json").write_text(json.dumps({"searched": ["train.lr"]}))
    out = tmp_path / "out"
    report(grid, out)
    found = json.loads((out / "comparisons.json").read_text())
    question = next(f for f in found["families"] if f["family"] == "the question")
    assert question["m"] == 1 and question["members"] == ["pretrained vs scratch at ResNet18"]
    made = next(c for c in found["comparisons"] if c["epoch"] == "selected")
    assert made["family"] == "the question" and "absent" not in made
    assert made["status"].startswith("not compared: resnet18 scratch: not chosen: no setting of train.lr among its 2")
    answer = (out / "results.md").read_text().split("\n## ")[0]
    assert "| resnet18 scratch | not chosen: no setting of train.lr" in answer


def test_a_grid_selected_by_loss_is_answered_by_its_lowest_held_out_loss(tmp_path):
    """train.select_by=loss: among a searched key's settings the answer takes the one with the lowest mean held-out
    loss over its seeds (held_out_mean gives the loss itself; lower is better), not the one with the best held-out
    QWK, and its row shows that mean loss, named, as the held-out score that chose it. Three learning rates of one
    arm: 0.01 has the best held-out QWK, 0.1 the lowest loss, 0.3 the highest loss (which a choice of the largest
    number would take)."""
    from dr_resnet.results.answer import answer_rows, headline
    from dr_resnet.results.arms import find_runs, group_arms
    from dr_resnet.results.tables import answer_table, markdown

    held_out = {0.01: (0.50, 0.90), 0.1: (0.30, 0.40), 0.3: (0.70, 0.60)}  # rate: (held-out loss, QWK) at its best
    for lr, (loss, qwk) in held_out.items():
        for seed in (0, 1):
            run = synthetic_run(tmp_path / f"lr{lr}" / f"seed{seed}", 18, "none", seed, 0.6,
                                {"train.lr": lr, "train.select_by": "loss"})
            rows = rows_of(run)
            # the epoch whose predictions synthetic_run wrote (its best held-out QWK): both scores peak there
            best = max(rows, key=lambda r: (r["val_qwk"], -r["epoch"]))["epoch"]
            (run / "metrics.jsonl").write_text("".join(
                json.dumps({**r, "val_loss": loss + seed / 50 + abs(r["epoch"] - best) / 10,
                            "val_qwk": qwk + seed / 50 - abs(r["epoch"] - best) / 10}) + "\n" for r in rows))
    arms = group_arms(find_runs(tmp_path))
    assert sorted(a.factors["train.lr"] for a in arms) == ["0.01", "0.1", "0.3"]
    [head] = headline(arms, {"train.lr"})
    assert head.how == "held-out choice among 3 settings of train.lr (train.lr=0.1)"
    assert head.arm.runs is next(a for a in arms if a.factors["train.lr"] == "0.1").runs
    assert (head.held_out, head.metric) == (pytest.approx(0.31), "held-out loss")  # the mean over its two seeds
    [row] = answer_rows([head], tmp_path)
    assert (row["held_out"], row["held_out_metric"]) == (pytest.approx(0.31), "held-out loss")
    assert row["seeds"] == 2 and row["trials"] == 6 and row["qwk"]["over"] == OVER_SEEDS  # scored on test
    lines = markdown(answer_table([row]), level=1)
    [line] = [line for line in lines if line.startswith("| resnet18 scratch")]
    assert line.split(" | ")[1:3] == ["held-out choice among 3 settings of train.lr (train.lr=0.1)", "0.310"]
    assert lines[2].split(" | ")[2] == "held-out loss that chose it"  # one metric for every arm: named once


def test_every_pair_of_initialisations_at_a_depth_is_a_member_of_the_question(tmp_path):
    """Scratch, ImageNet and in-domain (ssl) arms at ResNet18, three seeds each: the three pairs are named for what
    they compare (the later initialisation first, so pretrained vs scratch keeps its direction), all three in the
    question's family (m = 3: one depth, so no depth pair), the arms listed in config.INITIALISATIONS' order, each
    drawn in its initialisation's colour; imagenet+ssl, which the sweep never asked for, is nowhere. The scratch
    and ImageNet runs are from before the record (no "initialisation" in their summary): they read as before, by
    their weights; the ssl runs' summary says ssl, though their backbone file is not here to ask."""
    from dr_resnet.results.arms import find_runs, group_arms
    from dr_resnet.results.plots import INITIALISATION_COLOURS
    from dr_resnet.results.report import arrange

    sweep = tmp_path / "sweep"
    pretraining = {"method": "byol", "epochs": 50, "images": 3000, "cpu_hours": 0.4, "gpu_hours": 0.0,
                   "initialisation": "ssl", "config_hash": "0bb06d56d424314e", "finished": True,
                   "pool": [{"root": "/data/eyepacs", "split": "train", "format": "lab", "images": 1000, "patients": 500},
                            {"root": "/data/aptos", "split": "test", "format": "aptos", "images": 2000, "patients": 2000}]}
    for arm, weights, skill in (("resnet18_ssl", "/elsewhere/backbone.pt", 0.7), ("resnet18_pretrained", "imagenet", 0.6),
                                ("resnet18_scratch", "none", 0.5)):
        for seed in range(3):
            run = synthetic_run(sweep / arm / f"seed{seed}", 18, weights, seed, skill)
            summary = json.loads((run / "summary.json").read_text())
            assert "initialisation" not in summary  # written as a run from before the record
            if arm == "resnet18_ssl":
                (run / "summary.json").write_text(json.dumps({**summary, "initialisation": "ssl",
                                                              "pretraining": pretraining}))
    arms = group_arms(find_runs(sweep))
    assert [(a.name, len(a.runs)) for a in arms] == [("resnet18 scratch", 3), ("resnet18 pretrained", 3),
                                                     ("resnet18 ssl", 3)]
    assert arrange(arms).colours == {
        "resnet18 scratch": INITIALISATION_COLOURS["scratch"], "resnet18 pretrained": INITIALISATION_COLOURS["pretrained"],
        "resnet18 ssl": INITIALISATION_COLOURS["ssl"]}
    out = tmp_path / "out"
    report(sweep, out)
    found = json.loads((out / "comparisons.json").read_text())
    selected = {c["comparison"]: c for c in found["comparisons"] if c["epoch"] == "selected"}
    assert {name: (c["a"], c["b"], c["factor"], c["status"]) for name, c in selected.items()} == {
        "pretrained vs scratch at ResNet18": ("resnet18 pretrained", "resnet18 scratch", "initialisation", "compared"),
        "ssl vs scratch at ResNet18": ("resnet18 ssl", "resnet18 scratch", "initialisation", "compared"),
        "ssl vs pretrained at ResNet18": ("resnet18 ssl", "resnet18 pretrained", "initialisation", "compared")}
    [question] = [f for f in found["families"] if f["family"] == "the question"]
    assert question["m"] == 3 and sorted(question["members"]) == sorted(selected)
    assert all(c["family"] == "the question" and c["qwk"]["family_level"] == pytest.approx(1 - 0.05 / 3)
               for c in selected.values())
    md = (out / "results.md").read_text()
    assert "imagenet+ssl" not in md and "no run of" not in md
    assert md.index("| resnet18 scratch |") < md.index("| resnet18 pretrained |") < md.index("| resnet18 ssl |")
    # the backbone's cost beside its arm in the answer, and what it learned from in the Backbones table
    answer = md.split("# Answer")[1].split("\n#")[0].splitlines()  # the answer table, before the next section
    [ssl_row] = [line for line in answer if line.startswith("| resnet18 ssl |")]
    assert ssl_row.rstrip(" |").endswith("24.0 CPU-min (byol, 50 epochs on 3000 photos)")
    others = [line for line in answer if line.startswith(("| resnet18 scratch |", "| resnet18 pretrained |"))]
    assert len(others) == 2 and all(line.rstrip(" |").endswith("| -") for line in others)
    backbones = md.split("## Backbones")[1]
    assert ("| resnet18 ssl | ssl | /data/eyepacs:train (1000, 500); /data/aptos:test (2000, 2000) | 24.0 CPU-min (byol, "
            "50 epochs on 3000 photos) | 0bb06d56d424314e |") in backbones


def test_a_run_from_a_backbone_records_its_initialisation_and_pretraining_and_the_report_names_its_arm(tmp_path):
    """model.weights = a backbone file with its sidecar: the run trains at lr_base_ssl's rate, records ssl and the
    sidecar's pretraining record in summary.json and config.yaml's `effective`, and the report calls it resnet18 ssl
    even once the backbone and its sidecar are gone."""
    import yaml

    from dr_resnet.model.resnet import build_resnet
    from dr_resnet.results.arms import find_runs, group_arms

    data = preprocessed_dataset(tmp_path, 24, 9, seed=8, size=32)
    backbone = tmp_path / "pretraining" / "backbone.pt"
    backbone.parent.mkdir()
    record = {"method": "byol", "depth": 18, "initialisation": "ssl", "started_from": "none", "epochs": 1,
              "images": 24, "gpu_hours": 0.0, "cpu_hours": 0.01, "finished": True}
    torch.save({"model": {k: v for k, v in build_resnet(18).state_dict().items() if not k.startswith("fc.")},
                "initialisation": "ssl", "pretraining": record}, backbone)
    backbone.with_suffix(".json").write_text(json.dumps(record))  # the sidecar is the record itself
    run = tmp_path / "sweep" / "resnet18_ssl"
    assert train(["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data}", "data.image_size=32",
                  "train.batch_size=8", "train.epochs=1", "train.warmup_epochs=0", "data.workers=0",
                  "data.val_fraction=0", f"model.weights={backbone}", "train.lr_base_ssl=0.032",
                  f"output.dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    effective = yaml.safe_load((run / "config.yaml").read_text())["effective"]
    for recorded in (summary, effective):
        assert recorded["initialisation"] == "ssl" and recorded["pretraining"] == record
    assert effective["lr_rule"] == "0.032 x 8 / 256 (ssl, linear scaling)" and effective["lr"] == pytest.approx(0.001)
    shutil.rmtree(backbone.parent)
    [arm] = group_arms(find_runs(tmp_path / "sweep"))
    assert arm.name == "resnet18 ssl" and arm.runs[0].weights == str(backbone)
