"""One patient identity (dr_resnet.patients), read by the held-out draw, the bootstrap and predictions files:
names with extensions, any case and folders, and a table's own patient column."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from dr_resnet.config import data_settings
from dr_resnet.data.formats import DatasetError, TableOptions, read_split
from dr_resnet.data.split import holdout_mask
from dr_resnet.patients import patient_of, patients_of, per_image, shared_patients
from dr_resnet.results.predictions import read_predictions, write_predictions
from dr_resnet.results.stats import resampling_units


def test_a_patients_eyes_are_one_patient_whatever_the_name_looks_like():
    for name in ("10_left", "10_right", "10_left.jpeg", "10_RIGHT.JPEG", "10_Left.png", "train/10_left.jpeg",
                 "C:\\photos\\10_right.tif"):
        assert patient_of(name) == "10", name
    assert patient_of("000c1434d8d7.png") == patient_of("000c1434d8d7") == "000c1434d8d7"  # APTOS: per image
    assert patient_of("IM002385.JPG") == "IM002385"
    assert patient_of("left_10.jpeg") == "left_10"  # only a suffix names the eye
    assert patient_of("10_left.bak") == "10_left.bak"  # not an image extension: part of the name
    assert patients_of(["a", "b"], ["p1", "p1"]) == ["p1", "p1"]
    with pytest.raises(ValueError, match="1 patient ids for 2 images"):
        patients_of(["a", "b"], ["p1"])
    assert per_image(["a", "b"]) and not per_image(["a", "a"])
    assert shared_patients(["3", "1", "2"], ["2", "3", "4"]) == ["2", "3"]


def write_table(folder, rows, header=("image", "level", "patient")):
    (folder / "pics").mkdir(exist_ok=True)
    for row in rows:
        Image.new("RGB", (8, 8), (row[1] * 40, 0, 0)).save(folder / "pics" / row[0].rsplit("/", 1)[-1])
    with open(folder / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_names_with_extensions_keep_both_eyes_on_one_side_of_the_held_out_draw(tmp_path):
    """The csv format accepts names with their extension; patient_of used to miss the eye there, so a
    held-out draw put the other eye of most held-out patients into training."""
    grades = np.random.default_rng(0).choice(5, size=80, p=[0.6, 0.1, 0.15, 0.1, 0.05])
    rows = [(f"{i // 2}_{'left' if i % 2 == 0 else 'RIGHT'}.jpeg", int(g), "") for i, g in enumerate(grades)]
    write_table(tmp_path, [r[:2] for r in rows], header=("image", "level"))
    options = TableOptions.of(data_settings(["data.train_csv=table.csv", "data.train_images=pics"], format="csv"))
    split = read_split(tmp_path, "train", "csv", options)
    assert len(set(split.patients)) == 40
    held = holdout_mask(split.patients, split.labels, 0.25, seed=0)
    inside = {p for p, h in zip(split.patients, held) if h}
    outside = {p for p, h in zip(split.patients, held) if not h}
    assert inside and not inside & outside
    units, unit = resampling_units(split.patients)
    assert unit == "patients" and units.max() + 1 == 40


def test_a_patient_column_is_the_identity(tmp_path):
    """Names that carry no patient (IDRiD-like) with a table column naming it: data.patient_column."""
    rows = [(f"IM{i:04d}.png", i % 5, f"P{i // 3}") for i in range(30)]
    write_table(tmp_path, rows)
    keys = ["data.train_csv=table.csv", "data.train_images=pics", "data.patient_column=patient"]
    split = read_split(tmp_path, "train", "csv", TableOptions.of(data_settings(keys, format="csv")))
    assert split.patients == [r[2] for r in rows]
    held = holdout_mask(split.patients, split.labels, 0.3, seed=1)
    assert not ({p for p, h in zip(split.patients, held) if h} & {p for p, h in zip(split.patients, held) if not h})
    without = read_split(tmp_path, "train", "csv", TableOptions.of(data_settings(keys[:2], format="csv")))
    assert without.patients == [r[0][:-4] for r in rows] and per_image(without.patients)
    # A row without a patient is an error naming the column and the row; a missing column names it.
    write_table(tmp_path, rows[:3] + [(rows[3][0], rows[3][1], "")] + rows[4:])
    message = str(pytest.raises(DatasetError, read_split, tmp_path, "train", "csv",
                                TableOptions.of(data_settings(keys, format="csv"))).value)
    assert "empty patient id (column 'patient') in 1 row(s): 5" in message
    keys[2] = "data.patient_column=subject"
    message = str(pytest.raises(DatasetError, read_split, tmp_path, "train", "csv",
                                TableOptions.of(data_settings(keys, format="csv"))).value)
    assert "'subject' (patient column)" in message
    with pytest.raises(DatasetError, match="data.patient_column=patient names a table column, but the folders format"):
        (tmp_path / "f" / "train" / "0").mkdir(parents=True)
        read_split(tmp_path / "f", "train", "folders", TableOptions(patient_column="patient"))


def test_predictions_carry_each_images_patient_and_epoch(tmp_path):
    path = tmp_path / "predictions.csv"
    names, labels = ["IM1.png", "IM2.png", "IM3.png"], np.array([0, 2, 4])
    write_predictions(path, names, labels, labels, np.eye(5)[labels], labels / 4, "classification", ["a", "a", "b"], 7)
    found = read_predictions(path)
    assert found.patients == ["a", "a", "b"] and found.epoch == 7 and found.names == names
    write_predictions(path, ["3_left.jpeg", "3_right.jpeg"], labels[:2], labels[:2], np.eye(5)[labels[:2]],
                      labels[:2] / 4, "classification")
    found = read_predictions(path)
    assert found.patients == ["3", "3"] and found.epoch is None
    # A file written before the patient and epoch columns: patients from the names.
    old = tmp_path / "old.csv"
    old.write_text("image,true_grade,grade,score,referable_score\n7_left,1,1,1.0,0.1\n7_right,2,2,2.0,0.9\n")
    found = read_predictions(old)
    assert found.patients == ["7", "7"] and found.epoch is None
    # Names and patients the csv module quotes (a comma, a quote) read back as written; a regression head's score.
    names, patients = ['a,"b".png', "c d.png", "e.png"], ["p,1", "p,1", 'q"']
    write_predictions(path, names, labels, labels, labels * 1.25, labels / 4, "regression", patients, 3)
    found = read_predictions(path)
    assert (found.names, found.patients, found.epoch) == (names, patients, 3)
    assert found.values.tolist() == [0.0, 2.5, 5.0] and found.referable_scores.tolist() == [0.0, 0.5, 1.0]


def test_patients_in_both_training_and_test_are_counted_warned_and_reported(tmp_path, capfd):
    """A per-image split (the lab's) puts a patient's eyes on both sides: describe, training's log and
    summary.json and the report all say how many."""
    import json

    from dr_resnet.data.describe import main as describe_main
    from dr_resnet.results.report import report
    from dr_resnet.training.train import main as train_main

    from helpers import demo_args, preprocessed_dataset

    root = preprocessed_dataset(tmp_path / "d", 40, 13, seed=5, size=48)
    train_names = (root / "train_img.csv").read_text().split()
    train_labels = (root / "train_label.csv").read_text().split()
    moved = [i for i, n in enumerate(train_names) if n in ("10_right", "11_right", "12_right")]
    assert len(moved) == 3
    with open(root / "test_img.csv", "a") as f:
        f.writelines(f"{train_names[i]}\n" for i in moved)
    with open(root / "test_label.csv", "a") as f:
        f.writelines(f"{train_labels[i]}\n" for i in moved)
    (root / "train_img.csv").write_text("".join(f"{n}\n" for i, n in enumerate(train_names) if i not in moved))
    (root / "train_label.csv").write_text("".join(f"{g}\n" for i, g in enumerate(train_labels) if i not in moved))

    assert describe_main([str(root)]) == 0
    out = capfd.readouterr().out
    assert "  train (lab): 37 images, 20 patients" in out and "  test (lab): 16 images, 10 patients" in out
    assert "patients in both 'test' and 'train': 3 (e.g. '10')" in out
    assert "patients: from the image names (<patient>_left / <patient>_right)" in out

    run_dir = tmp_path / "run"
    assert train_main(demo_args(root, run_dir, "train.epochs=1", workers=0)) == 0
    assert ("3 of the 10 patients of the 'test' split also have images in training (e.g. patient '10'): test figures "
            "may be optimistic") in capfd.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["patients_in_train_and_test"] == 3 and summary["patients"]["patients_in_train_and_held_out"] == 0
    report(run_dir, tmp_path / "report")
    with open(tmp_path / "report" / "results.csv") as f:
        assert next(csv.DictReader(f))["patients_in_train_and_test"] == "3"
    assert "test patients also in training" in (tmp_path / "report" / "report.html").read_text()
