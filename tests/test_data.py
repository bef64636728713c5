import shutil

import numpy as np
import pytest
import torch

from dr_resnet.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RetinopathyDataset,
    evaluation_transform,
    load_image,
    training_transform,
)
from dr_resnet.data.formats import DatasetError, detect_format, find_splits, read_split
from dr_resnet.data.synthetic import generate, grade_counts


@pytest.fixture(scope="module")
def formats_root(tmp_path_factory):
    """The same 9 train / 7 test images in each of the three formats."""
    base = tmp_path_factory.mktemp("formats")
    return {fmt: generate(base / fmt, {"train": 9, "test": 7}, seed=5, fmt=fmt, size=48, progress=False)
            for fmt in ("lab", "kaggle", "aptos")}


@pytest.mark.parametrize("fmt", ["lab", "kaggle", "aptos"])
def test_every_format_reads_every_row(formats_root, fmt):
    root = formats_root[fmt]
    assert detect_format(root, "train") == fmt
    assert find_splits(root) == [("test", fmt), ("train", fmt)]
    for split, n in (("train", 9), ("test", 7)):
        ds = RetinopathyDataset(root, split, image_size=32)
        assert len(ds) == n
        assert ds.class_counts.tolist() == grade_counts(n).tolist()
        image, label = ds[0]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert label == ds.labels[0]


def test_lab_format_keeps_the_first_row(formats_root):
    """The old lab loader read the headerless CSVs with a header and lost row 1 of each split."""
    root = formats_root["lab"]
    names = (root / "train_img.csv").read_text().split()
    labels = [int(v) for v in (root / "train_label.csv").read_text().split()]
    split = read_split(root, "train")
    assert split.names == names and split.labels.tolist() == labels
    assert split.rows == list(range(1, 10))


def test_lab_images_fall_back_to_the_root_folder(formats_root, tmp_path):
    root = tmp_path / "flat"
    shutil.copytree(formats_root["lab"], root)
    for f in (root / "images").iterdir():
        f.rename(root / f.name)
    (root / "images").rmdir()
    ds = RetinopathyDataset(root, "test")
    assert len(ds) == 7 and all(p.parent == root for p in ds.paths)


def test_same_images_in_all_formats_decode_equal(formats_root):
    lab, kaggle = RetinopathyDataset(formats_root["lab"], "test"), RetinopathyDataset(formats_root["kaggle"], "test")
    assert lab.names == kaggle.names
    assert torch.equal(lab[3][0], kaggle[3][0])


def test_majority_baseline_and_index(synthetic_root):
    ds = RetinopathyDataset(synthetic_root, "test", return_index=True)
    counts = np.bincount(ds.labels, minlength=5)
    assert ds.majority_baseline == counts.max() / 12
    image, label, index = ds[5]
    assert index == 5 and label == ds.labels[5]


def _lab(tmp_path, names, labels, images=None):
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    (root / "train_img.csv").write_text("".join(f"{n}\n" for n in names))
    (root / "train_label.csv").write_text("".join(f"{v}\n" for v in labels))
    for n in names if images is None else images:
        (root / "images" / f"{n}.jpeg").write_bytes(b"x")
    return root


def test_missing_images_are_named_by_row(tmp_path):
    root = _lab(tmp_path, ["a", "b", "c", "d"], [0, 1, 2, 3], images=["a", "c"])
    with pytest.raises(DatasetError) as info:
        read_split(root, "train")
    msg = str(info.value)
    assert "train_img.csv: image file missing in 2 row(s): 2, 4" in msg and "b.jpeg" in msg


@pytest.mark.parametrize("bad", ["5", "-1", "two", "1.5", ""])
def test_bad_labels_are_named_by_row(tmp_path, bad):
    root = _lab(tmp_path, ["a", "b", "c"], [0, bad, 4])
    with pytest.raises(DatasetError, match=r"train_label.csv: .*in 1 row\(s\): 2"):
        read_split(root, "train")


def test_csvs_of_different_length(tmp_path):
    root = _lab(tmp_path, ["a", "b", "c"], [0, 1])
    with pytest.raises(DatasetError, match="train_img.csv has 3 rows but .*train_label.csv has 2"):
        read_split(root, "train")


def test_duplicate_names(tmp_path):
    root = _lab(tmp_path, ["a", "b", "a", "b"], [0, 1, 0, 1], images=["a", "b"])
    with pytest.raises(DatasetError, match=r"duplicate image name in 2 row\(s\): 3, 4 \(e.g. row 3 repeats row 1\)"):
        read_split(root, "train")


def test_empty_split(tmp_path):
    root = _lab(tmp_path, [], [])
    with pytest.raises(DatasetError, match="'train' split has no rows"):
        read_split(root, "train")


def test_all_problems_reported_at_once(tmp_path):
    root = _lab(tmp_path, ["a", "b", "b"], [0, 9, 1], images=["a"])
    msg = str(pytest.raises(DatasetError, read_split, root, "train").value)
    assert "label not an integer" in msg and "duplicate" in msg and "image file missing" in msg


def test_kaggle_header_and_short_rows(tmp_path):
    root = tmp_path / "k"
    (root / "train").mkdir(parents=True)
    (root / "trainLabels.csv").write_text("image,grade\n1_left,0\n")
    with pytest.raises(DatasetError, match=r"header \['image', 'grade'\] lacks column\(s\) 'level' \(label column\)"):
        read_split(root, "train")
    (root / "trainLabels.csv").write_text("image,level\n1_left,0\n1_right\n")
    (root / "train" / "1_left.jpeg").write_bytes(b"x")
    (root / "train" / "1_right.jpeg").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"trainLabels.csv: fewer than the 2 fields its columns need in 1 row\(s\): 3"):
        read_split(root, "train")


def test_format_detection_errors(tmp_path, formats_root):
    with pytest.raises(DatasetError, match="no 'train' split found"):
        detect_format(tmp_path, "train")
    mixed = tmp_path / "mixed"
    shutil.copytree(formats_root["lab"], mixed)
    shutil.copy(formats_root["kaggle"] / "trainLabels.csv", mixed)
    with pytest.raises(DatasetError, match=r"several formats \(lab, kaggle\)"):
        detect_format(mixed, "train")
    assert len(RetinopathyDataset(mixed, "train", format="lab")) == 9


def test_load_image_pads_to_a_centred_square(tmp_path):
    from PIL import Image
    Image.new("RGB", (60, 30), (200, 100, 50)).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", size=60)
    assert image.shape == (3, 60, 60)
    assert image[:, :15].sum() == 0 and image[:, 45:].sum() == 0
    assert image[:, 15:45].float().mean(dim=(1, 2)).tolist() == [200.0, 100.0, 50.0]


def test_transforms(synthetic_root):
    ds = RetinopathyDataset(synthetic_root, "test", image_size=64)
    raw = ds[0][0]
    expected = (raw.float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(evaluation_transform()(raw), expected)
    torch.manual_seed(0)
    augmented = [training_transform()(raw) for _ in range(4)]
    assert all(a.shape == (3, 64, 64) and a.dtype == torch.float32 for a in augmented)
    assert not torch.equal(augmented[0], augmented[1])
    # Rotation and flips keep the content: the fundus stays centred, so the mean barely moves.
    assert all(abs(a.mean() - expected.mean()) < 0.2 for a in augmented)


def test_undecodable_image_names_the_file(tmp_path):
    (tmp_path / "broken.jpeg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match="broken.jpeg: cannot decode image"):
        load_image(tmp_path / "broken.jpeg")


def test_formats_torchvision_cannot_read_fall_back_to_pil(tmp_path):
    from PIL import Image
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpeg")
    Image.new("RGB", (20, 10), (10, 20, 30)).save(tmp_path / "plain.tiff")
    assert load_image(tmp_path / "cmyk.jpeg").shape == (3, 10, 20)
    assert load_image(tmp_path / "plain.tiff")[:, 0, 0].tolist() == [10, 20, 30]
