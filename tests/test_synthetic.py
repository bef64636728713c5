import numpy as np
import pytest
from PIL import Image

from dr_resnet.data.formats import read_split
from dr_resnet.data.synthetic import EYEPACS_BALANCE, generate, grade_counts, lesions_for_grade, main, render_fundus, split_grades


@pytest.mark.parametrize("n", [0, 4, 5, 12, 250, 1000, 35126])
def test_grade_counts_sum_and_balance(n):
    counts = grade_counts(n)
    assert counts.sum() == n and len(counts) == 5
    if n >= 5:
        assert counts.min() >= 1  # tiny splits still hold every grade
    if n >= 1000:
        assert np.abs(counts / n - np.array(EYEPACS_BALANCE)).max() < 0.005


def test_counts_are_within_one_of_the_exact_share():
    eyepacs = (25810, 2443, 5292, 873, 708)
    assert grade_counts(35126, balance=eyepacs, min_per_class=0).tolist() == list(eyepacs)
    for n in (7, 99, 1234):
        exact = np.array(EYEPACS_BALANCE) / sum(EYEPACS_BALANCE) * n
        assert np.abs(grade_counts(n, min_per_class=0) - exact).max() < 1


def test_split_grades_are_a_seeded_permutation():
    a, b, c = split_grades(200, 1, "train"), split_grades(200, 1, "train"), split_grades(200, 2, "train")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(a, minlength=5).tolist() == grade_counts(200).tolist()
    assert not np.array_equal(split_grades(200, 1, "test"), a)


def test_lesions_grow_with_grade():
    rng = np.random.default_rng(0)
    totals = []
    for grade in range(5):
        draws = [lesions_for_grade(grade, rng) for _ in range(300)]
        totals.append(np.mean([d.microaneurysms + d.haemorrhages + d.exudates + d.cotton_wool for d in draws]))
        if grade == 0:
            assert all(d == lesions_for_grade(0, rng) for d in draws)
        assert all(d.new_vessels > 0 for d in draws) == (grade == 4)
        assert all(d.cotton_wool == 0 for d in draws) == (grade < 2)
    assert totals == sorted(totals[:4]) + [totals[4]] and totals[3] > totals[2] > totals[1] > totals[0] == 0


def test_images_vary_in_canvas_and_have_a_black_border():
    sizes = set()
    for i in range(12):
        image = np.asarray(render_fundus(0, seed=0, split="train", index=i, size=96))
        sizes.add(image.shape[:2])
        assert image.shape[1] >= image.shape[0]  # landscape canvas, like a camera's
        grey = image.mean(axis=2)
        assert grey[0, 0] < 10 and grey[-1, -1] < 10 and grey.max() > 100
    assert len(sizes) >= 10


def test_lesions_change_pixels_but_not_geometry():
    healthy = np.asarray(render_fundus(0, 0, "train", 3, 96), dtype=int)
    severe = np.asarray(render_fundus(3, 0, "train", 3, 96), dtype=int)
    assert healthy.shape == severe.shape
    assert np.abs(healthy - severe).mean() > 0.5


@pytest.mark.parametrize("fmt,index_files", [("lab", ["train_img.csv", "train_label.csv", "test_img.csv"]),
                                             ("kaggle", ["trainLabels.csv", "testLabels.csv"]),
                                             ("aptos", ["train.csv", "test.csv"])])
def test_cli_writes_the_real_layout_deterministically(tmp_path, fmt, index_files, capsys):
    args = ["--train", "10", "--test", "5", "--seed", "4", "--format", fmt, "--size", "48", "--workers", "2"]
    assert main(["--out", str(tmp_path / "a")] + args) == 0
    assert main(["--out", str(tmp_path / "b")] + args) == 0
    assert main(["--out", str(tmp_path / "c")] + args[:5] + ["5"] + args[6:]) == 0
    assert "train: 10 images, grades 0..4 = [5, 1, 2, 1, 1]" in capsys.readouterr().out
    for name in index_files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a, b, c = (read_split(tmp_path / d, "train") for d in "abc")
    assert a.format == fmt and len(a.names) == 10
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a.paths, b.paths))
    assert any(pa.read_bytes() != pc.read_bytes() for pa, pc in zip(a.paths, c.paths))
    if fmt != "aptos":
        assert a.names[:4] == ["10_left", "10_right", "11_left", "11_right"]
    assert Image.open(a.paths[0]).format == ("PNG" if fmt == "aptos" else "JPEG")


def test_lesion_masks_mark_exactly_the_drawn_lesions(tmp_path):
    from dr_resnet.data.synthetic import lesion_mask_path

    with_masks = generate(tmp_path / "m", {"test": 12}, seed=2, size=64, progress=False, lesion_masks=True)
    without = generate(tmp_path / "n", {"test": 12}, seed=2, size=64, progress=False)
    labels = [int(x) for x in (with_masks / "test_label.csv").read_text().split()]
    names = (with_masks / "test_img.csv").read_text().split()
    assert len(names) == len(labels) == 12
    for i, (name, grade) in enumerate(zip(names, labels)):
        assert (with_masks / "images" / f"{name}.jpeg").read_bytes() == (without / "images" / f"{name}.jpeg").read_bytes()
        with Image.open(lesion_mask_path(with_masks, name)) as mask, Image.open(with_masks / "images" / f"{name}.jpeg") as photo:
            assert mask.size == photo.size and mask.mode == "L"
            values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        assert (values.any()) == (grade > 0)  # grade 0 has no lesions; every other grade has some
        photo, drawn = render_fundus(grade, 2, "test", i, 64, lesion_mask=True)
        assert np.array_equal(np.asarray(drawn), values)
