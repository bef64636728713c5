import numpy as np
import pytest

from dr_resnet.data.formats import read_split
from dr_resnet.data.split import main, split
from dr_resnet.data.synthetic import generate
from dr_resnet.patients import patient_of


@pytest.fixture(scope="module")
def eyepacs(tmp_path_factory):
    """800 + 200 EyePACS-style images (400 + 100 patients, two eyes each), kaggle layout: a 20% test
    side of ~200 images, where one image is half a point of balance."""
    return generate(tmp_path_factory.mktemp("pool") / "raw", {"train": 800, "test": 200}, seed=9, fmt="kaggle",
                    size=32, progress=False)


def test_no_patient_on_both_sides_every_image_once_balance_kept(eyepacs, tmp_path, capsys):
    dst = tmp_path / "split"
    assert main(["--src", str(eyepacs), "--dst", str(dst), "--test-fraction", "0.2", "--seed", "3"]) == 0
    train, test = read_split(dst, "train"), read_split(dst, "test")  # validates every row and image
    assert train.format == test.format == "kaggle"
    pool = read_split(eyepacs, "train").names + read_split(eyepacs, "test").names
    assert sorted(train.names + test.names) == sorted(pool)
    assert not {patient_of(n) for n in train.names} & {patient_of(n) for n in test.names}
    assert abs(len(test.names) / len(pool) - 0.2) < 0.01
    everything = np.bincount(np.concatenate([train.labels, test.labels]), minlength=5) / len(pool)
    for side in (train, test):
        share = np.bincount(side.labels, minlength=5) / len(side.labels)
        assert np.abs(share - everything).max() <= 0.01, (side.name, share, everything)
    # Labels travel with their images.
    truth = dict(zip(pool, np.concatenate([read_split(eyepacs, "train").labels, read_split(eyepacs, "test").labels])))
    assert all(truth[n] == g for n, g in zip(test.names, test.labels))
    sources = [eyepacs / side / train.paths[0].name for side in ("train", "test")]
    assert any(src.exists() and src.samefile(train.paths[0]) for src in sources)  # hard-linked, not copied
    out = capsys.readouterr().out
    assert "test" in out and "patients" in out


def test_same_seed_same_split_other_seed_other_split(eyepacs, tmp_path):
    a = split(eyepacs, tmp_path / "a", 0.25, seed=1)["test"][0]
    b = split(eyepacs, tmp_path / "b", 0.25, seed=1)["test"][0]
    c = split(eyepacs, tmp_path / "c", 0.25, seed=2)["test"][0]
    assert a == b and a != c


@pytest.mark.parametrize("fmt", ["lab", "aptos"])
def test_other_formats(tmp_path, fmt):
    src = generate(tmp_path / "raw", {"train": 30, "test": 10}, seed=1, fmt=fmt, size=32, progress=False)
    result = split(src, tmp_path / "out", 0.25, seed=0)
    assert sum(len(names) for names, _, _ in result.values()) == 40
    assert len(read_split(tmp_path / "out", "test").names) == len(result["test"][0])


def test_patient_names():
    assert patient_of("10_left") == patient_of("10_right") == "10"
    assert patient_of("000c1434d8d7") == "000c1434d8d7"


def test_holdout_mask_keeps_patients_whole_and_subset_keeps_rows(eyepacs):
    from dr_resnet.data.dataset import RetinopathyDataset
    from dr_resnet.data.split import holdout_mask

    train = RetinopathyDataset(eyepacs, "train")
    held = holdout_mask(train.patients, train.labels, 0.1, seed=0)
    assert np.array_equal(held, holdout_mask(train.patients, train.labels, 0.1, seed=0))
    val, rest = train.subset(held, "val"), train.subset(~held, "train")
    assert len(val) + len(rest) == len(train) and abs(len(val) / len(train) - 0.1) < 0.01
    assert not {patient_of(n) for n in val.names} & {patient_of(n) for n in rest.names}
    rows = np.flatnonzero(held)
    assert val.names == [train.names[i] for i in rows] and val.paths == [train.paths[i] for i in rows]
    assert np.array_equal(val.labels, train.labels[rows]) and val.split == "val" and train.split == "train"
    assert np.array_equal(val.class_counts + rest.class_counts, train.class_counts)
