"""Every data.format on a synthetic copy of the layout its publisher ships: every row read (and the rows
a filter or a dropped label leaves out counted, not lost), a bad row named, describe and preprocess on
each; the generic csv format on a messy table."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from dr_resnet.config import ConfigError, data_settings, load
from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.data.describe import main as describe_main
from dr_resnet.data.formats import DatasetError, TableOptions, detect_format, read_split, split_names
from dr_resnet.data.preprocess import Settings, preprocess
from dr_resnet.data.synthetic import generate

from helpers import IDRID_LABELS, published_copy

PUBLISHED = ("eyepacs", "idrid", "messidor2", "ddr", "folders")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """12 train and 9 test synthetic photos (kaggle layout), the images every copy is made of."""
    return generate(tmp_path_factory.mktemp("published") / "src", {"train": 12, "test": 9}, seed=4, fmt="kaggle",
                    size=56, progress=False)


@pytest.fixture(scope="module")
def copies(source, tmp_path_factory):
    base = tmp_path_factory.mktemp("copies")
    return {kind: (base / kind, published_copy(source, base / kind, kind)) for kind in PUBLISHED}


@pytest.mark.parametrize("kind", PUBLISHED)
def test_each_published_layout_is_read_row_for_row(copies, kind, caplog):
    root, expected = copies[kind]
    assert sorted(split_names(root, kind)) == sorted(s for s in expected if s not in ("public", "private"))
    with caplog.at_level(logging.INFO, logger="dr_resnet.data.formats"):
        for split, rows in expected.items():
            read = read_split(root, split, kind)
            assert list(zip(read.names, read.labels.tolist())) == rows, split
            assert all(p.is_file() for p in read.paths)
    ds = RetinopathyDataset(root, "test", format=kind, image_size=32)
    image, label = ds[len(ds) - 1]
    assert image.shape == (3, 32, 32) and label == expected["test"][-1][1]
    if kind == "messidor2":  # the ungradable rows are counted in the log, not silently gone
        assert "row(s) left out by the filter adjudicated_gradable=1" in caplog.text
    if kind == "ddr":
        assert "row(s) left out by the label map (5=drop)" in caplog.text


def test_eyepacs_public_and_private_halves_make_the_test_split(copies):
    root, expected = copies["eyepacs"]
    public, private = read_split(root, "public", "eyepacs"), read_split(root, "private", "eyepacs")
    assert sorted(public.names + private.names) == sorted(read_split(root, "test", "eyepacs").names)
    assert len(public.names) == len(expected["public"]) == 3


def test_describe_shows_eyepacs_halves_and_names_the_formats_to_try(copies, capsys):
    root, expected = copies["eyepacs"]
    assert describe_main([str(root), "--format", "eyepacs"]) == 0
    out = capsys.readouterr().out
    assert "    of which public: 3 images (Usage=Public)" in out
    assert f"    of which private: {len(expected['private'])} images (Usage=Private)" in out
    idrid, _ = copies["idrid"]
    assert describe_main([str(idrid)]) == 2
    err = capsys.readouterr().err
    assert "auto detects lab, kaggle, aptos, folders; name another layout with --format (eyepacs | idrid" in err


def test_folders_are_detected_and_a_folder_that_is_not_a_grade_is_named(copies, tmp_path):
    import shutil

    root, _ = copies["folders"]
    assert detect_format(root, "train") == "folders"
    bad = tmp_path / "folders"
    shutil.copytree(root, bad)
    (bad / "train" / "moderate").mkdir()
    (bad / "train" / "2" / "notes.txt").write_text("x")
    message = str(pytest.raises(DatasetError, read_split, bad, "train", "folders").value)
    assert f"{bad / 'train'}: folder(s) ['moderate'] are not grades" in message
    assert "2/notes.txt" in message


def test_a_bad_row_in_a_published_table_is_named_with_its_file_and_line(copies, tmp_path):
    import shutil

    root, _ = copies["idrid"]
    bad = tmp_path / "idrid"
    shutil.copytree(root, bad)
    labels = bad / IDRID_LABELS.format("b.", "Testing")
    rows = list(csv.reader(labels.open()))
    rows[4][1] = "7"  # line 5 of the file
    rows[6][0] = "IDRiD_999"  # line 7: no such image
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    message = str(pytest.raises(DatasetError, read_split, bad, "test", "idrid").value)
    assert f"{labels}: label not an integer in 0..4 in 1 row(s): 5" in message
    assert f"{labels}: image file missing in 1 row(s): 7 (e.g. IDRiD_999.jpg not in {bad}" in message


def test_the_csv_format_reads_a_messy_table_with_every_option(source, tmp_path, caplog):
    """Header names with stray spaces, an empty trailing column, names with and without extension, a
    grading scale of its own mapped to 0..4, a column filter: the data.* keys say how."""
    split = read_split(source, "test", "kaggle")
    (tmp_path / "pics").mkdir()
    rows = [[" file ", "DR ", "site", ""]]
    for i, (n, g, p) in enumerate(zip(split.names, split.labels, split.paths)):
        (tmp_path / "pics" / f"{n}.jpeg").write_bytes(p.read_bytes())
        rows.append([n if i % 2 else f"{n}.jpeg", f"R{int(g)}", "a" if i < 7 else "b", ""])
    with open(tmp_path / "grades.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    data = data_settings(["data.test_csv=grades.csv", "data.test_images=pics", "data.image_column=file",
                          "data.label_column=DR", "data.image_suffix=.jpeg", "data.filter=site=a",
                          "data.label_map=R0=0,R1=1,R2=2,R3=3,R4=4"], format="csv", root=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="dr_resnet.data.formats"):
        read = read_split(tmp_path, "test", "csv", TableOptions.of(data))
    assert read.names == [n if i % 2 else f"{n}.jpeg" for i, n in enumerate(split.names[:7])]
    assert read.labels.tolist() == split.labels[:7].tolist()
    assert f"{tmp_path / 'grades.csv'}: 2 row(s) left out by the filter site=a" in caplog.text
    unmapped = TableOptions.of(data_settings(["data.test_csv=grades.csv", "data.test_images=pics",
                                              "data.image_column=file", "data.label_column=DR"], format="csv"))
    message = str(pytest.raises(DatasetError, read_split, tmp_path, "test", "csv", unmapped).value)
    assert "label not an integer in 0..4 in 9 row(s): 2, 3" in message and "data.label_map" in message
    missing = TableOptions.of(data_settings(["data.test_csv=grades.csv", "data.label_column=grade"], format="csv"))
    message = str(pytest.raises(DatasetError, read_split, tmp_path, "test", "csv", missing).value)
    assert "lacks column(s) 'image' (image column), 'grade' (label column)" in message


def test_csv_keys_are_checked_where_they_are_set():
    with pytest.raises(ConfigError, match="data.format=csv reads the tables data.train_csv and data.test_csv"):
        load(None, ["data.format=csv", "data.test_csv=t.csv", "output.dir=x"])
    with pytest.raises(DatasetError, match=r"data.label_map='5': '5' is not label=grade"):
        TableOptions.of(data_settings(["data.label_map=5"])).labels()
    with pytest.raises(ConfigError, match="only data.\\* keys"):
        data_settings(["train.lr=0.1"])


@pytest.mark.parametrize("kind", PUBLISHED)
def test_describe_and_preprocess_take_every_format(copies, kind, tmp_path, capsys):
    root, expected = copies[kind]
    assert describe_main([str(root), "--format", kind]) == 0
    out = capsys.readouterr().out
    for split in split_names(root, kind):
        assert f"  {split} ({kind}): {len(expected[split])} images" in out
    # The rows a dataset's own rules leave out are said by describe and preprocess, with why.
    rules = {"messidor2": "row(s) left out by the filter adjudicated_gradable=1",
             "ddr": "row(s) left out by the label map (5=drop)"}
    if kind in rules:
        assert rules[kind] in out
    said = []
    # The preprocessed copy is the same layout: read with the same format, the same rows and grades; its
    # tables hold exactly the rows prepared.
    preprocess(root, tmp_path / "prepared", Settings(size=32), progress=False, fmt=kind, say=said.append)
    assert any(rules[kind] in line for line in said) if kind in rules else said == []
    for split in split_names(root, kind):
        before, after = read_split(root, split, kind), read_split(tmp_path / "prepared", split, kind)
        assert after.names == before.names and np.array_equal(after.labels, before.labels)
        assert all(p.suffix == ".jpeg" for p in after.paths) and after.left_out == []


def test_training_reads_its_splits_through_the_csv_keys(copies, tmp_path):
    """The IDRiD copy named only through the generic csv keys (paths with spaces, names without extension):
    a run trains on its 12 images and tests on its 9, and config.yaml keeps the keys it read them with."""
    import yaml

    from dr_resnet.training.train import main

    from helpers import demo_args, metrics_rows

    root, expected = copies["idrid"]
    keys = ["data.format=csv", f"data.train_csv={IDRID_LABELS.format('a.', 'Training')}",
            f"data.test_csv={IDRID_LABELS.format('b.', 'Testing')}", "data.train_images=1. Original Images/a. Training Set",
            "data.test_images=1. Original Images/b. Testing Set", "data.image_column=Image name",
            "data.label_column=Retinopathy grade", "data.image_suffix=.jpg"]
    args = demo_args(root, tmp_path / "run", *keys, "train.epochs=1", "data.image_size=32", "train.warmup_epochs=0",
                     batch_size=4, workers=0)
    assert main(args) == 0
    row = metrics_rows(tmp_path / "run")[-1]
    assert np.sum(row["confusion_matrix"]) == len(expected["test"]) == 9
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["format"] == "csv" and saved["image_column"] == "Image name" and saved["image_suffix"] == ".jpg"


def test_commands_take_options_and_data_keys_in_any_order(source, tmp_path, capsys):
    """`describe DIR --format F data.KEY=VALUE`, the README's order, and keys before the options."""
    split = read_split(source, "test", "kaggle")
    (tmp_path / "pics").mkdir()
    with open(tmp_path / "grades.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "level"])
        for n, g, p in zip(split.names, split.labels, split.paths):
            (tmp_path / "pics" / f"{n}.jpeg").write_bytes(p.read_bytes())
            writer.writerow([n, int(g)])
    keys = ["data.test_csv=grades.csv", "data.test_images=pics", "data.image_column=file"]
    assert describe_main([str(tmp_path), "--format", "csv", *keys]) == 0
    first = capsys.readouterr().out
    assert f"test (csv): {len(split.names)} images" in first
    assert describe_main([str(tmp_path), *keys[:1], "--format", "csv", *keys[1:]]) == 0
    assert capsys.readouterr().out == first


def test_messidor2_pairs_make_each_exam_one_patient(copies, tmp_path, caplog):
    """messidor-2.csv pairs each exam's two images: one patient, kept whole by the held-out draw and the
    bootstrap; without the file each image is its own patient, with a warning naming it."""
    import shutil

    from dr_resnet.data.split import holdout_mask

    root, expected = copies["messidor2"]
    split = read_split(root, "test", "messidor2")
    pairs = [line.split(";") for line in (root / "messidor-2.csv").read_text().split()[1:]]
    exam = {name: left.rsplit(".", 1)[0] for left, right in pairs for name in (left, right)}
    # An image in no pair (the copy's 21st) is its own patient.
    assert split.patients == [exam.get(n, n.rsplit(".", 1)[0]) for n in split.names]
    assert split.patient_source == "the pairs in messidor-2.csv"
    assert len(set(split.patients)) < len(split.names)  # some exam has both images graded
    held = holdout_mask(split.patients, split.labels, 0.3, seed=0)
    assert not {p for p, h in zip(split.patients, held) if h} & {p for p, h in zip(split.patients, held) if not h}
    alone = tmp_path / "no_pairs"
    shutil.copytree(root, alone)
    (alone / "messidor-2.csv").unlink()
    with caplog.at_level(logging.WARNING, logger="dr_resnet.data.formats"):
        unpaired = read_split(alone, "test", "messidor2")
    assert len(set(unpaired.patients)) == len(unpaired.names) and "messidor-2.csv not found" in caplog.text


def test_a_filtered_copy_holds_what_was_kept_and_records_the_filter(source, tmp_path, capsys):
    """preprocess with data.filter prepares the kept rows only: the copy's table holds just those (so it
    reads without the filter) and preprocess.json records the filter and what it left out."""
    import json

    from dr_resnet.data.preprocess import main as preprocess_main

    split = read_split(source, "test", "kaggle")
    (tmp_path / "raw" / "pics").mkdir(parents=True)
    with open(tmp_path / "raw" / "grades.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "level", "site"])
        for i, (n, g, p) in enumerate(zip(split.names, split.labels, split.paths)):
            (tmp_path / "raw" / "pics" / f"{n}.jpeg").write_bytes(p.read_bytes())
            writer.writerow([n, int(g), "a" if i < 6 else "b"])
    keys = ["data.test_csv=grades.csv", "data.test_images=pics"]
    assert preprocess_main(["--src", str(tmp_path / "raw"), "--dst", str(tmp_path / "out"), "--size", "32",
                            "--workers", "1", "--format", "csv", *keys, "data.filter=site=a"]) == 0
    assert "test: 3 row(s) left out by the filter site=a (grades.csv)" in capsys.readouterr().out
    copy = read_split(tmp_path / "out", "test", "csv", TableOptions.of(data_settings(keys, format="csv")))
    assert copy.names == split.names[:6] and copy.labels.tolist() == split.labels[:6].tolist()
    recorded = json.loads((tmp_path / "out" / "preprocess.json").read_text())["selection"]
    assert recorded["filter"] == "site=a" and recorded["left_out"] == {"test": ["3 row(s) left out by the filter site=a"]}
    assert describe_main([str(tmp_path / "out"), "--format", "csv", *keys]) == 0
    assert "test (csv): 6 images" in capsys.readouterr().out


def test_aptos_as_shipped_with_its_unlabelled_test_csv(tmp_path, capsys):
    """APTOS 2019's test.csv has only id_code (its labels were never published): describe lists it as
    unlabelled, preprocess prepares its images, split pools only the labelled rows, and training names
    the ways to a labelled test part."""
    from dr_resnet.data.split import main as split_main
    from dr_resnet.training.train import main as train_main

    from helpers import demo_args

    root = generate(tmp_path / "aptos", {"train": 16, "test": 6}, seed=3, fmt="aptos", size=48, progress=False)
    ids = [row[0] for row in csv.reader(open(root / "test.csv"))][1:]
    (root / "test.csv").write_text("id_code\n" + "".join(f"{i}\n" for i in ids))
    assert describe_main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "test (aptos): 6 images, unlabelled (prediction only: test.csv has no grades)" in out
    assert "train (aptos): 16 images" in out
    preprocess(root, tmp_path / "prepared", Settings(size=32), progress=False)
    prepared = read_split(tmp_path / "prepared", "test", "aptos", unlabelled_ok=True)
    assert not prepared.labelled and prepared.names == ids and all(p.suffix == ".jpeg" for p in prepared.paths)
    assert split_main(["--src", str(root), "--dst", str(tmp_path / "split"), "--test-fraction", "0.25"]) == 0
    assert "left out the 'test' split: test.csv has no grades (prediction only)" in capsys.readouterr().out
    pooled = read_split(tmp_path / "split", "train", "aptos").names + read_split(tmp_path / "split", "test", "aptos").names
    assert sorted(pooled) == sorted(read_split(root, "train", "aptos").names)
    assert train_main(demo_args(tmp_path / "prepared", tmp_path / "run", "data.format=aptos", workers=0)) == 2
    err = capsys.readouterr().err
    assert "test.csv has no 'diagnosis' column: the aptos 'test' split" in err and "python -m dr_resnet.split" in err
    assert "data.test_csv" in err


def test_grades_written_as_whole_floats_read_as_integers(source, tmp_path):
    """A table pandas saved again writes 2.0 for 2: read as 2; 2.5 is still an error naming the row."""
    split = read_split(source, "test", "kaggle")
    (tmp_path / "test").mkdir()
    rows = [["image", "level"]]
    for n, g, p in zip(split.names, split.labels, split.paths):
        (tmp_path / "test" / f"{n}.jpeg").write_bytes(p.read_bytes())
        rows.append([n, f"{float(g)}"])
    with open(tmp_path / "testLabels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert read_split(tmp_path, "test", "kaggle").labels.tolist() == split.labels.tolist()
    rows[2][1] = "2.5"
    with open(tmp_path / "testLabels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DatasetError, match="label not an integer in 0..4 in 1 row"):
        read_split(tmp_path, "test", "kaggle")


def test_split_pools_eyepacs_as_shipped_and_refuses_what_it_cannot_write(copies, tmp_path, capsys):
    """On an EyePACS root (trainLabels.csv and retinopathy_solution.csv) split pools both splits, not
    trainLabels.csv alone, and writes the kaggle layout; a layout it cannot write is refused by name."""
    from dr_resnet.data.split import main as split_main

    root, expected = copies["eyepacs"]
    assert split_main(["--src", str(root), "--dst", str(tmp_path / "out"), "--test-fraction", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "EyePACS as shipped (--format eyepacs)" in out and "pooling the eyepacs split(s) train, test" in out
    written = read_split(tmp_path / "out", "train", "kaggle").names + read_split(tmp_path / "out", "test", "kaggle").names
    assert sorted(written) == sorted(n for s in ("train", "test") for n, _ in expected[s])
    for kind in ("idrid", "messidor2", "csv"):
        assert split_main(["--src", str(root), "--dst", str(tmp_path / kind), "--format", kind]) == 2
        assert f"--format {kind} is read but not written" in capsys.readouterr().err


def test_two_files_whose_extensions_differ_only_in_case_are_an_error_naming_both(source, tmp_path):
    import shutil

    shutil.copytree(source, tmp_path / "k")
    name = read_split(tmp_path / "k", "test", "kaggle").names[2]
    jpeg = tmp_path / "k" / "test" / f"{name}.jpeg"
    shutil.copyfile(jpeg, jpeg.with_suffix(".JPEG"))
    message = str(pytest.raises(DatasetError, read_split, tmp_path / "k", "test", "kaggle").value)
    assert f"image '{name}' is {jpeg} and {jpeg.with_suffix('.JPEG')}" in message


def test_an_official_validation_split_is_the_held_out_part(copies, tmp_path):
    """DDR ships valid.txt: data.val_split=valid chooses the epoch on it, whole, instead of a fraction of
    training."""
    import json

    from dr_resnet.training.train import main

    from helpers import demo_args, metrics_rows

    root, expected = copies["ddr"]
    run_dir = tmp_path / "run"
    assert main(demo_args(root, run_dir, "data.format=ddr", "data.val_split=valid", "data.image_size=32",
                          "train.epochs=2", "train.warmup_epochs=0", batch_size=4, workers=0)) == 0
    rows = metrics_rows(run_dir)
    assert all("val_qwk" in r for r in rows) and sum(map(sum, rows[-1]["val_confusion_matrix"])) == len(expected["valid"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["selected_on"] == "val" and sum(map(sum, rows[-1]["confusion_matrix"])) == len(expected["test"])
    assert f"held-out part: the 'valid' split ({len(expected['valid'])} images)" in (run_dir / "train.log").read_text()


def test_split_says_the_rows_a_datasets_rules_leave_out(copies, tmp_path, capsys):
    """A label the dataset's rules drop (data.label_map=7=drop): split names the count, file and rule."""
    import shutil

    from dr_resnet.data.split import main as split_main

    root = tmp_path / "eyepacs"
    shutil.copytree(copies["eyepacs"][0], root)
    labels = (root / "trainLabels.csv").read_text().splitlines()
    labels[3] = labels[3].rsplit(",", 1)[0] + ",7"
    (root / "trainLabels.csv").write_text("\n".join(labels) + "\n")
    assert split_main(["--src", str(root), "--dst", str(tmp_path / "out"), "data.label_map=7=drop"]) == 0
    assert "train: 1 row(s) left out by the label map (7=drop) (trainLabels.csv)" in capsys.readouterr().out
