"""The photos self-supervised pretraining sees (dr_resnet/pretraining/pool.py): data.root's training split whole plus
the named pools (an APTOS-like unlabelled test.csv among them), each counted in the record; and the refusal of any
pool that holds the evaluation's test photos or patients: the test split itself, a copy of it under another folder,
a photo of a test patient's other eye."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dr_resnet.config import ConfigError, DataConfig
from dr_resnet.data.check import BadImagesError
from dr_resnet.data.dataset import UnreadableImageError, load_image
from dr_resnet.data.formats import SplitLayout, read_split
from dr_resnet.data.synthetic import generate
from dr_resnet.pretraining.pool import PoolDataset, PoolOverlapError, PoolRepeatError, PoolSource, parse_pools, photo_pool

SIZE = 32


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DR_RESNET_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """data.root: 20 training photos (10 patients, both eyes), 7 test photos (patients 100010..100013, the last
    with its left eye only)."""
    return generate(tmp_path_factory.mktemp("pool") / "lab", {"train": 20, "test": 7}, seed=3, size=SIZE,
                    progress=False)


@pytest.fixture(scope="module")
def aptos(tmp_path_factory) -> Path:
    """APTOS's layout with an unlabelled test.csv (id_code alone, as Kaggle ships it): 6 photos."""
    root = generate(tmp_path_factory.mktemp("pool") / "aptos", {"test": 6}, seed=4, fmt="aptos", size=SIZE,
                    progress=False)
    with open(root / "test.csv", newline="") as f:
        ids = [row["id_code"] for row in csv.DictReader(f)]
    (root / "test.csv").write_text("id_code\n" + "".join(f"{i}\n" for i in ids))
    return root


def settings(data: Path, **values) -> DataConfig:
    return DataConfig(root=str(data), image_size=SIZE, workers=1, **values)


def test_the_pool_is_the_whole_training_split_and_each_named_pool_counted(data, aptos, tmp_path):
    other = generate(tmp_path / "other", {"train": 8}, seed=9, size=SIZE, progress=False)  # names 10_left.. again
    pool, test = photo_pool(settings(data, train_fraction=0.25, val_fraction=0.2), f"{aptos}:test, {other}")
    train, unlabelled, second = read_split(data, "train"), read_split(aptos, "test", unlabelled_ok=True), \
        read_split(other, "train")
    assert not unlabelled.labelled
    assert pool.paths == [*train.paths, *unlabelled.paths, *second.paths]  # nothing held out, no fraction taken
    assert pool.names == [*train.names, *unlabelled.names, *second.names]
    assert pool.record() == [
        {"root": str(data.resolve()), "split": "train", "format": "lab", "images": 20, "patients": 10},
        {"root": str(aptos.resolve()), "split": "test", "format": "aptos", "images": 6, "patients": 6},
        {"root": str(other.resolve()), "split": "train", "format": "lab", "images": 8, "patients": 4}]
    assert len(set(pool.patients)) == 10 + 6 + 4  # the other dataset's patient 10 is not data.root's patient 10
    assert pool.named == [False, True, True] and pool.skipped == []
    assert test.split == "test" and len(test) == 7
    photos = PoolDataset(pool, SIZE)
    image, index = photos[21]
    assert index == 21 and image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
    assert torch.equal(image, load_image(unlabelled.paths[1], SIZE))


def test_the_test_split_itself_is_refused(data):
    with pytest.raises(PoolOverlapError) as error:
        photo_pool(settings(data), f"{data}:test")
    line = str(error.value)
    assert "\n" not in line and f"{data.resolve()}:test shares 7 image(s) and 4 patient(s)" in line
    assert "100010_left, 100010_right, 100011_left)" in line and "Name another split" in line


def test_a_copy_of_the_test_photos_elsewhere_is_refused_by_name_and_size(data, tmp_path, caplog):
    copy = tmp_path / "copy"
    (copy / "images").mkdir(parents=True)
    test = read_split(data, "test")
    for path in test.paths:
        shutil.copyfile(path, copy / "images" / path.name)
    SplitLayout.of(copy, "archive", "lab").write_index(test.names, test.labels)
    with pytest.raises(PoolOverlapError, match=r"copy:archive shares 7 image\(s\) and 4 patient\(s\)"):
        photo_pool(settings(data), f"{copy}:archive")
    for path in test.paths:  # saved again at another quality (a preprocessed copy): another size, every name kept
        Image.open(path).save(copy / "images" / path.name, quality=30)
    with pytest.raises(PoolOverlapError, match=r"copy:archive shares 7 image\(s\)"):
        photo_pool(settings(data), f"{copy}:archive")
    # two of the seven names: another dataset's photos with the same kind of name, warned of, not refused
    SplitLayout.of(copy, "few", "lab").write_index(test.names[:2], test.labels[:2])
    pool, _ = photo_pool(settings(data), f"{copy}:few")
    assert pool.record()[1]["images"] == 2
    assert "2 photo(s) carry the name of a test photo at another size" in caplog.text


def test_a_pool_sharing_only_a_patient_with_the_test_split_is_refused(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    train = read_split(root, "train")
    shutil.copyfile(train.paths[0], root / "images" / "100013_right.jpeg")  # the right eye of a test patient
    shutil.copyfile(train.paths[1], root / "images" / "555_left.jpeg")
    SplitLayout.of(root, "extra", "lab").write_index(["555_left", "100013_right"], [0, 0])
    with pytest.raises(PoolOverlapError, match=r":extra shares 0 image\(s\) and 1 patient\(s\) with it \(e.g. patient "
                                               r"100013\)"):
        photo_pool(settings(root), f"{root}:extra")
    SplitLayout.of(root, "extra", "lab").write_index(["555_left"], [0])
    pool, _ = photo_pool(settings(root), f"{root}:extra")
    assert [s["images"] for s in pool.record()] == [20, 1]


def test_a_pool_repeating_the_training_split_is_refused(data):
    with pytest.raises(PoolRepeatError, match="repeats 20 photo"):
        photo_pool(settings(data), f"{data}:train")


def test_a_bad_photo_in_a_pool_stops_or_is_left_out(data, aptos, tmp_path):
    copy = tmp_path / "aptos"
    shutil.copytree(aptos, copy)
    broken = read_split(copy, "test", unlabelled_ok=True).paths[2]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3])
    with pytest.raises(BadImagesError, match=str(broken)):
        photo_pool(settings(data), f"{copy}:test")
    pool, _ = photo_pool(settings(data, bad_images="skip"), f"{copy}:test")
    assert [s["images"] for s in pool.record()] == [20, 5] and broken not in pool.paths
    assert [b["file"] for b in pool.skipped] == [str(broken)]


def test_an_unreadable_pool_photo_names_its_file_row_and_source(data, aptos, tmp_path):
    copy = tmp_path / "aptos"
    shutil.copytree(aptos, copy)
    pool, _ = photo_pool(settings(data), f"{copy}:test")
    pool.paths[-1].unlink()
    with pytest.raises(UnreadableImageError, match=rf"{pool.paths[-1]} \(row 7 of the 'test' split in {copy.resolve()}"):
        PoolDataset(pool, SIZE)[len(pool) - 1]


def test_pools_are_parsed_and_a_bad_entry_names_the_key():
    assert parse_pools("") == []
    assert parse_pools(" /a , /b:valid, /c::aptos, /d:test:eyepacs,") == [
        PoolSource(Path("/a")), PoolSource(Path("/b"), "valid"), PoolSource(Path("/c"), "train", "aptos"),
        PoolSource(Path("/d"), "test", "eyepacs")]
    for entry, why in (("/a:b:lab:x", "has 3 ':'"), (":train", "names no folder"), ("/a:train:png", "the format 'png'"),
                       ("/a:train:csv", "csv format"), ("/a, /a/:train", "repeats the split")):
        with pytest.raises(ConfigError) as error:
            parse_pools(entry)
        assert str(error.value).startswith(f"pretrain.pools={entry!r}: entry ") and why in str(error.value)

