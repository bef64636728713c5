"""Using a trained model: the recipe a run records, predict on raw and prepared photos (every head, bad
files, inputs), Grad-CAM heat maps and their lesion scores. Real training runs, real files."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dr_resnet import config
from dr_resnet.data.dataset import RetinopathyDataset, load_image
from dr_resnet.data.preprocess import Settings, crop_square, preprocess
from dr_resnet.data.recipe import Recipe
from dr_resnet.results.metrics import confusion_matrix
from dr_resnet.serving.cam import cam_targets, grad_cam, lesion_scores
from dr_resnet.serving.grading import load_grader
from dr_resnet.serving.predict import main as predict_main
from dr_resnet.training import checkpoint
from dr_resnet.training.evaluate import main as evaluate_main

from helpers import metrics_rows, published_copy

RAW_VS_PREPARED_TOLERANCE = 0.06  # largest change of a grade probability from preprocess's JPEG (quality 95) step


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def image_list(path: Path, images: list[Path], column: str = "image") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([column, "note"])
        writer.writerows([[str(p), "x"] for p in images])
    return path


def test_training_records_the_recipe_provenance_and_epoch_metrics(runs, photos):
    run_dir = runs["classification"]
    state = checkpoint.TrainingState.load(run_dir / "checkpoint_best.pt")
    assert state.recipe == Recipe(48, Settings(size=48)).to_dict()
    assert Recipe.from_dict(state.recipe) == Recipe.of_data(photos / "data", 48)
    train_set, test_set = RetinopathyDataset(photos / "data", "train"), RetinopathyDataset(photos / "data", "test")
    splits = state.provenance["data"]["splits"]
    assert splits == {"train": {"images": 40, "class_counts": train_set.class_counts.tolist()},
                      "test": {"images": 24, "class_counts": test_set.class_counts.tolist()}}
    assert state.provenance["torch"] == str(torch.__version__)
    assert state.metrics == next(r for r in metrics_rows(run_dir) if r["epoch"] == state.epoch)
    # config.yaml holds the recipe too, and still loads as the run's config.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["recipe"] == state.recipe
    assert config.load(run_dir / "config.yaml") == config.from_dict(state.config)


def test_predict_on_raw_photos_agrees_with_predict_on_their_prepared_copies(runs, photos, tmp_path):
    """predict on raw photos sees what predict on preprocess's copies sees, but for the copies' JPEG
    step: each raw photo becomes exactly the image preprocess crops, and each copy is exactly that image
    saved as preprocess saves it. The model's outputs then differ by what JPEG's rounding does to them
    (on a barely trained model whose probabilities lie within hundredths of each other, so grades near a
    tie may swap and are not compared; how far a probability moves depends on the model the CPU's float
    rounding trained: at most 0.024 on one machine, 0.032 on another, with the same code)."""
    import io

    names = sorted(p.stem for p in (photos / "raw" / "images").iterdir())
    raw = [next((photos / "raw" / "images").glob(f"{n}.*")) for n in names]
    prepared = [photos / "data" / "images" / f"{n}.jpeg" for n in names]
    settings = Settings(size=48)
    recipe = Recipe(48, settings)
    for photo, copy in zip(raw, prepared):
        cropped = crop_square(photo, settings)
        assert torch.equal(recipe.prepare(photo), torch.from_numpy(np.array(cropped)).permute(2, 0, 1)), photo
        encoded = io.BytesIO()
        cropped.save(encoded, format="JPEG", quality=settings.quality)
        assert encoded.getvalue() == copy.read_bytes(), copy
    ckpt = runs["classification"] / "checkpoint_best.pt"
    for name, images in (("raw", raw), ("prepared", prepared)):
        assert predict_main(["--checkpoint", str(ckpt), "--images", str(image_list(tmp_path / f"{name}.csv", images)),
                             "--out", str(tmp_path / f"{name}_out.csv"), "--workers", "0"]) == 0
    from_raw, from_prepared = read_rows(tmp_path / "raw_out.csv"), read_rows(tmp_path / "prepared_out.csv")
    assert [r["path"] for r in from_raw] == [str(p) for p in raw] and len(from_raw) == 64
    assert all(r["error"] == "" for r in from_raw + from_prepared)
    p_raw = np.array([[float(r[f"p_grade{k}"]) for k in range(5)] for r in from_raw])
    p_prepared = np.array([[float(r[f"p_grade{k}"]) for k in range(5)] for r in from_prepared])
    assert np.abs(p_raw - p_prepared).max() < RAW_VS_PREPARED_TOLERANCE
    assert np.abs(p_raw - p_prepared).mean() < RAW_VS_PREPARED_TOLERANCE / 6  # 0.005 on average here
    grades_raw = p_raw.argmax(axis=1)
    assert [int(r["grade"]) for r in from_raw] == grades_raw.tolist()
    # The model tells photos apart by more than JPEG's rounding moves them on average: the comparison means
    # something (against the largest move the ratio hangs on the CPU's rounding: 1.9 on one machine, above 2 on
    # another).
    assert np.abs(p_prepared - p_prepared.mean(axis=0)).max() > 4 * np.abs(p_raw - p_prepared).mean()


def test_prepared_photos_are_used_as_they_are(photos, tmp_path):
    prepared = next((photos / "data" / "images").iterdir())
    assert torch.equal(Recipe(48, Settings(size=48)).prepare(prepared), load_image(prepared, 48))
    # A model trained at 32 px on 48 px prepared photos: resized as training's loader did, not cropped again.
    assert torch.equal(Recipe(32, Settings(size=48)).prepare(prepared), load_image(prepared, 32))
    # Graham-normalised photos (grey outside the disc) are recognised by their size as well.
    preprocess(photos / "raw", tmp_path / "graham", Settings(size=40, normalize="graham"), progress=False)
    graham = next((tmp_path / "graham" / "images").iterdir())
    recipe = Recipe.of_data(tmp_path / "graham", 40)
    assert recipe.preprocess.normalize == "graham" and torch.equal(recipe.prepare(graham), load_image(graham, 40))
    raw = photos / "raw" / "images" / graham.name
    assert torch.equal(recipe.prepare(raw), torch.from_numpy(np.array(crop_square(raw, recipe.preprocess))).permute(2, 0, 1))


@pytest.mark.parametrize("head,tta", [("classification", "none"), ("classification", "flips"), ("regression", "none"),
                                      ("ordinal", "flips")])
def test_predict_reproduces_evaluates_confusion_matrix(runs, photos, tmp_path, head, tta):
    ckpt = runs[head] / "checkpoint_best.pt"
    test_set = RetinopathyDataset(photos / "data", "test")
    assert evaluate_main(["--checkpoint", str(ckpt), "--data-root", str(photos / "data"), "--out", str(tmp_path / "eval"),
                          "--workers", "0", "--device", "cpu", "--tta", tta, "--batch-size", "16"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert predict_main(["--checkpoint", str(ckpt), "--images", str(image_list(tmp_path / "test.csv", test_set.paths)),
                         "--out", str(tmp_path / "p.csv"), "--workers", "1", "--tta", tta, "--batch-size", "16"]) == 0
    rows = read_rows(tmp_path / "p.csv")
    grades = np.array([int(r["grade"]) for r in rows])
    assert confusion_matrix(test_set.labels, grades).tolist() == evaluated["confusion_matrix"]
    assert [r["referable"] for r in rows] == [str(int(g >= 2)) for g in grades]
    if head == "regression":
        thresholds = checkpoint.load(ckpt)["head"]["thresholds"]
        assert {r["thresholds"] for r in rows} == {" ".join(f"{t:g}" for t in thresholds)}
        scores = np.array([float(r["score"]) for r in rows])
        assert np.array_equal(grades, np.searchsorted(thresholds, scores, side="right"))
        assert np.array_equal(np.array([float(r["referable_score"]) for r in rows]), scores)
    else:
        p = np.array([[float(r[f"p_grade{k}"]) for k in range(5)] for r in rows])
        assert np.allclose(p.sum(axis=1), 1, atol=1e-5) and (p >= -1e-7).all()
        assert np.allclose([float(r["referable_score"]) for r in rows], p[:, 2:].sum(axis=1), atol=1e-5)
        if head == "classification":
            assert np.array_equal(grades, p.argmax(axis=1))


def test_external_validation_on_raw_and_prepared_copies_in_other_formats(runs, photos, tmp_path):
    """A run evaluated on two other datasets: IDRiD's layout holding the raw photos (prepared on the fly
    by the model's recipe) and the folders layout holding the prepared copies. The prepared copy scores
    exactly what the run's own test split scored at its selected epoch; the raw photos score within the
    JPEG step of it; the report shows the three side by side."""
    import shutil

    from dr_resnet.results.report import report

    run = tmp_path / "resnet18_scratch"
    shutil.copytree(runs["classification"], run)
    idrid, folders = tmp_path / "B. Disease Grading", tmp_path / "graded_folders"
    published_copy(photos / "raw", idrid, "idrid")
    published_copy(photos / "data", folders, "folders")
    for root, fmt in ((idrid, "idrid"), (folders, "folders")):
        assert evaluate_main(["--checkpoint", str(run / "checkpoint_best.pt"), "--data-root", str(root), "--format", fmt,
                              "--workers", "0", "--device", "cpu", "--resamples", "200"]) == 0
    from_raw = json.loads((run / "evaluations" / "idrid-test" / "metrics.json").read_text())
    from_copy = json.loads((run / "evaluations" / "graded_folders-test" / "metrics.json").read_text())
    own = next(r for r in metrics_rows(run) if r["epoch"] == from_copy["epoch"])
    assert from_copy["format"] == "folders" and from_raw["format"] == "idrid"
    assert from_copy["num_samples"] == from_raw["num_samples"] == 24
    assert from_copy["confusion_matrix"] == own["confusion_matrix"] and from_copy["qwk"] == pytest.approx(own["test_qwk"])
    raw_p = np.array([[float(r[f"p_grade{k}"]) for k in range(5)]
                      for r in read_rows(run / "evaluations" / "idrid-test" / "predictions.csv")])
    copy_rows = {r["image"]: r for r in read_rows(run / "evaluations" / "graded_folders-test" / "predictions.csv")}
    names = RetinopathyDataset(photos / "data", "test").names  # IDRiD_001 ... in the test split's order
    copy_p = np.array([[float(copy_rows[n][f"p_grade{k}"]) for k in range(5)] for n in names])
    assert np.abs(raw_p - copy_p).max() < RAW_VS_PREPARED_TOLERANCE
    report(run)
    page = (run / "results.md").read_text()
    section = page[page.index("## Test results on other datasets"):]
    assert [line.split(" | ")[1:3] for line in section.splitlines() if line.startswith(f"| {run.name} |")] == [
        [config.load(run / "config.yaml").data.root.rsplit("/", 1)[-1], "test (its own)"],
        ["graded_folders", "test"], ["idrid", "test"]]  # a published layout by its name, else the folder's
    # Another dataset in a folder of the same name: its own evaluation folder, nothing overwritten.
    other = tmp_path / "elsewhere" / "graded_folders"
    shutil.copytree(folders, other)
    assert evaluate_main(["--checkpoint", str(run / "checkpoint_best.pt"), "--data-root", str(other), "--format",
                          "folders", "--workers", "0", "--device", "cpu", "--resamples", "0"]) == 0
    evaluated = sorted(p.name for p in (run / "evaluations").iterdir())
    assert len(evaluated) == 3 and "graded_folders-test" in evaluated and "idrid-test" in evaluated
    assert json.loads((run / "evaluations" / "graded_folders-test" / "metrics.json").read_text())["data_root"] == str(
        folders.resolve())


def test_bad_files_get_their_row_and_the_batch_goes_on(runs, photos, tmp_path, capsys):
    good = sorted((photos / "raw" / "images").iterdir())[:3]
    (tmp_path / "notes.jpeg").write_text("not an image")
    Image.new("RGB", (90, 60)).save(tmp_path / "black.png")
    (tmp_path / "cut.jpeg").write_bytes(good[0].read_bytes()[:300])
    inputs = [good[0], tmp_path / "notes.jpeg", good[1], tmp_path / "black.png", tmp_path / "missing.jpg",
              tmp_path / "cut.jpeg", good[2]]
    ckpt = str(runs["ordinal"] / "checkpoint_best.pt")
    out = tmp_path / "p.csv"
    args = ["--checkpoint", ckpt, "--out", str(out), "--workers", "2", "--batch-size", "2", "--images", *map(str, inputs)]
    assert predict_main(args) == 0
    assert "graded 3 of 7 images" in capsys.readouterr().out
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in inputs]
    errors = [r["error"] for r in rows]
    assert [bool(e) for e in errors] == [False, True, False, True, True, True, False]
    assert errors[1].startswith(f"{tmp_path / 'notes.jpeg'}: not an image")
    assert errors[3].startswith(f"{tmp_path / 'black.png'}: no retina found")
    assert errors[4] == f"{tmp_path / 'missing.jpg'}: no such file"
    assert errors[5].startswith(f"{tmp_path / 'cut.jpeg'}: ")
    assert all(r["grade"] == "" and r["p_grade0"] == "" for r in rows if r["error"])
    assert predict_main(args + ["--strict"]) == 1
    assert predict_main(["--checkpoint", ckpt, "--out", str(out), "--workers", "0",
                         "--images", str(tmp_path / "notes.jpeg"), str(tmp_path / "missing.jpg")]) == 1
    assert len(read_rows(out)) == 2


def test_inputs_folders_csvs_and_their_errors(runs, photos, tmp_path, capsys):
    nested = tmp_path / "clinic" / "2026" / "week1"
    nested.mkdir(parents=True)
    sources = sorted((photos / "raw" / "images").iterdir())[:4]
    for p in sources[:2]:
        (tmp_path / "clinic" / p.name).write_bytes(p.read_bytes())
    for p in sources[2:]:
        (nested / p.name.replace(".jpeg", ".JPG")).write_bytes(p.read_bytes())
    (nested / "readme.txt").write_text("not listed")
    # An APTOS-style CSV: names without a suffix, relative to the CSV's folder.
    (tmp_path / "clinic" / "list.csv").write_text("id_code,diagnosis\n" + "".join(f"{p.stem},0\n" for p in sources[:2]))
    ckpt = str(runs["classification"] / "checkpoint_best.pt")
    out = tmp_path / "p.csv"
    assert predict_main(["--checkpoint", ckpt, "--out", str(out), "--workers", "0",
                         "--images", str(tmp_path / "clinic"), str(tmp_path / "clinic" / "list.csv")]) == 0
    listed = [r["path"] for r in read_rows(out)]
    assert listed == sorted(str(p) for p in (tmp_path / "clinic").rglob("*") if p.suffix.lower() in (".jpeg", ".jpg")) \
        + [str(tmp_path / "clinic" / p.name) for p in sources[:2]]
    assert all(r["error"] == "" for r in read_rows(out))
    (tmp_path / "bad.csv").write_text("name,level\na,0\n")
    capsys.readouterr()
    assert predict_main(["--checkpoint", ckpt, "--out", str(out), "--images", str(tmp_path / "bad.csv")]) == 2
    assert f"{tmp_path / 'bad.csv'}: no image column" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(tmp_path / "none.pt"), "--images", str(sources[0])]) == 2
    assert "model not found" in capsys.readouterr().err


def test_a_checkpoint_without_a_recipe_still_grades_with_a_warning(runs, photos, tmp_path, caplog):
    state = checkpoint.load(runs["classification"] / "checkpoint_best.pt")
    del state["recipe"], state["provenance"], state["metrics"]
    checkpoint.save(state, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING):
        grader = load_grader(tmp_path / "old.pt", torch.device("cpu"))
    assert grader.recipe.assumed and "records no preprocessing recipe" in caplog.text
    assert grader.recipe == Recipe(48, Settings(size=48))  # the data root's preprocess.json is still there
    state["config"]["data"]["root"] = str(tmp_path / "gone")
    checkpoint.save(state, tmp_path / "older.pt")
    assert load_grader(tmp_path / "older.pt", torch.device("cpu")).recipe == Recipe(48, Settings(size=48))


def manual_grad_cam(network, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM written out: layer4's activations weighted by the target's spatially averaged gradients,
    summed over channels, ReLU, upsampled bilinearly, divided by the maximum."""
    kept = {}
    handle = network.layer4.register_forward_hook(lambda m, i, o: kept.update(a=o))
    with torch.enable_grad():
        outputs = network(inputs)
        chosen = outputs.gather(1, targets.view(-1, 1)).sum()
        grads, = torch.autograd.grad(chosen, kept["a"])
    handle.remove()
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * kept["a"]).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    return cam / cam.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, 1, 1)


@pytest.mark.parametrize("head", ["classification", "ordinal"])
def test_grad_cam_is_grad_cam_of_the_predicted_grade(runs, photos, head):
    pytest.importorskip("captum", reason="heat maps need the [cam] extra (captum)")
    grader = load_grader(runs[head] / "checkpoint_best.pt", torch.device("cpu"))
    images = torch.stack([grader.recipe.prepare(p) for p in sorted((photos / "raw" / "images").iterdir())[:6]])
    grades = torch.from_numpy(grader.grade(images).grades)
    targets = cam_targets(head, grades)
    if head == "ordinal":
        assert torch.equal(targets, (grades - 1).clamp(min=0))
    inputs = grader.model.normalize(images)
    maps = grad_cam(grader.network, inputs, targets)
    assert maps.shape == (6, 48, 48) and maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps, manual_grad_cam(grader.network, inputs, targets), atol=1e-5)


def test_cam_writes_a_heat_map_per_graded_photo(runs, photos, tmp_path):
    sources = sorted((photos / "raw" / "images").iterdir())[:5]
    # An exported model has no network to explain: a clear error (with captum or without).
    from dr_resnet.serving.export import export
    path, _, _ = export(runs["regression"] / "checkpoint_best.pt", "torchscript", tmp_path / "exported")
    assert predict_main(["--checkpoint", str(path), "--images", str(sources[0]), "--cam", str(tmp_path / "c2")]) == 2
    pytest.importorskip("captum", reason="heat maps need the [cam] extra (captum)")
    (tmp_path / "broken.jpeg").write_text("no")
    # Two photos with the same name in different folders keep both maps.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / sources[0].name).write_bytes(sources[0].read_bytes())
    inputs = [*sources, tmp_path / "broken.jpeg", tmp_path / "again" / sources[0].name]
    assert predict_main(["--checkpoint", str(runs["regression"] / "checkpoint_best.pt"), "--images", *map(str, inputs),
                         "--out", str(tmp_path / "p.csv"), "--cam", str(tmp_path / "cam"), "--workers", "0"]) == 0
    rows = read_rows(tmp_path / "p.csv")
    maps = sorted((tmp_path / "cam").iterdir())
    assert len(maps) == 6 and [r["cam"] != "" for r in rows] == [True] * 5 + [False, True]
    assert rows[0]["cam"] != rows[-1]["cam"]
    for row in rows:
        if row["cam"]:
            with Image.open(row["cam"]) as im:
                assert im.size == (48, 48) and im.mode == "RGB"


def without_captum(monkeypatch) -> None:
    """captum as if it were not installed: its import fails, as on a machine without the [cam] extra."""
    for name in [m for m in sys.modules if m == "captum" or m.startswith("captum.")] + ["captum"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_heat_maps_without_captum_stop_at_once_with_one_line_naming_the_extra(runs, photos, tmp_path, monkeypatch,
                                                                              capsys):
    """captum is the [cam] extra: predict --cam without it exits 2 before grading, with one line that says
    what to install, and writes neither the predictions nor the heat-map folder; grading alone still works."""
    without_captum(monkeypatch)
    source = str(sorted((photos / "raw" / "images").iterdir())[0])
    args = ["--checkpoint", str(runs["classification"] / "checkpoint_best.pt"), "--images", source, "--workers", "0"]
    assert predict_main([*args, "--out", str(tmp_path / "p.csv"), "--cam", str(tmp_path / "cam")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err], err
    from dr_resnet.serving.cam import CAM_EXTRA

    assert err.startswith("error: heat maps need captum") and err.endswith(CAM_EXTRA)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "cam").exists()
    assert predict_main([*args, "--out", str(tmp_path / "graded.csv")]) == 0
    assert len(read_rows(tmp_path / "graded.csv")) == 1


def test_lesion_scores_count_mass_area_and_pointing():
    heat = np.zeros((10, 10))
    heat[2, 2], heat[7, 7] = 3.0, 1.0
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:4, 2:4] = True  # 4 of 100 pixels
    scores = lesion_scores(heat, mask, tolerance=1)
    assert scores["mass_on_lesions"] == 0.75 and scores["lesion_area"] == 0.04
    assert scores["energy_ratio"] == pytest.approx(18.75) and scores["pointing_hit"]
    assert scores["pointing_chance"] == pytest.approx(16 / 100)  # 4x4 once grown by a pixel
    heat[5, 5] = 10
    assert not lesion_scores(heat, mask)["pointing_hit"]


def test_grad_cam_keeps_no_graph_for_the_parameters():
    """Grad-CAM needs the gradient of layer4's output only: what autograd saves for backward is a small
    share of what it saves with every parameter's graph (as predict did before), the maps are the same
    bit for bit, and the parameters are trainable again afterwards."""
    LayerGradCam = pytest.importorskip("captum.attr", reason="heat maps need the [cam] extra (captum)").LayerGradCam

    from dr_resnet.model.resnet import build_resnet

    torch.manual_seed(0)
    network = build_resnet(18, 5).eval()
    inputs, targets = torch.randn(2, 3, 96, 96), torch.tensor([1, 3])

    def saved_bytes(work) -> tuple[int, object]:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = work()
        return total[0], result

    ours, maps = saved_bytes(lambda: grad_cam(network, inputs, targets))
    with torch.enable_grad():
        every, _ = saved_bytes(lambda: LayerGradCam(network, network.layer4).attribute(inputs, target=targets))
    assert ours < every / 4, (ours, every)
    assert all(p.requires_grad for p in network.parameters())
    for p in network.parameters():
        p.requires_grad_(False)
    assert torch.equal(maps, grad_cam(network, inputs, targets))  # frozen or not: the same maps


def test_predict_reads_a_datasets_own_table(runs, tmp_path, capsys):
    """predict --images ROOT --format aptos --split test: APTOS's unlabelled test.csv names its photos by
    id_code in test_images/; predict grades them in the table's order, as training would read them."""
    from dr_resnet.data.synthetic import generate

    root = generate(tmp_path / "aptos", {"train": 4, "test": 6}, seed=5, fmt="aptos", size=64, progress=False)
    ids = [row[0] for row in csv.reader(open(root / "test.csv"))][1:]
    (root / "test.csv").write_text("id_code\n" + "".join(f"{i}\n" for i in ids))
    out = tmp_path / "graded.csv"
    assert predict_main(["--checkpoint", str(runs["classification"] / "checkpoint_best.pt"), "--images", str(root),
                         "--format", "aptos", "--split", "test", "--out", str(out), "--workers", "0"]) == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(root / "test_images" / f"{i}.png") for i in ids]
    assert all(r["error"] == "" for r in rows)
    with pytest.raises(SystemExit):
        predict_main(["--checkpoint", "x.pt", "--images", "a.png", "data.image_column=x"])
    assert "give its --format" in capsys.readouterr().err
