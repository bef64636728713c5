import csv
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.data.formats import DatasetError, read_split
from dr_resnet.data.preprocess import (
    SKIPPED_FILE,
    VERSION,
    Settings,
    crop_square,
    cut_square,
    main,
    preprocess,
    read_settings,
    retina_box,
    retina_square,
)
from dr_resnet.data.recipe import Recipe
from dr_resnet.data.synthetic import generate

from helpers import REPO

SIZE = 40


def fundus(width=120, height=80, cx=70, cy=40, radius=30, colour=(180, 80, 40), noise=6, seed=0) -> np.ndarray:
    """A bright disc on a noisy dark canvas (noise below the threshold, as JPEG borders are)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = rng.integers(0, noise, size=(height, width, 3)).astype(np.uint8)
    image[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = colour
    return image


def bright_box(path) -> tuple[int, int, int, int]:
    return retina_box(np.asarray(Image.open(path).convert("L")), 10)


def test_retina_box_ignores_noise_and_specks():
    image = fundus()
    image[2, 2] = 255  # a single hot pixel in the border
    grey = np.asarray(Image.fromarray(image).convert("L"))
    box = retina_box(grey, 10)
    assert np.abs(np.array(box) - (40, 10, 101, 71)).max() <= 1, box
    assert retina_box(np.zeros((20, 20), np.uint8), 10) is None


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "CMYK", "P"])
def test_modes_give_rgb_centred_square(tmp_path, mode):
    path = tmp_path / f"eye.{'png' if mode in ('RGBA', 'P') else 'jpeg'}"
    Image.fromarray(fundus()).convert(mode).save(path)
    out = crop_square(path, Settings(size=SIZE))
    assert out.mode == "RGB" and out.size == (SIZE, SIZE)
    # The disc fills the square: bright at the centre, black in the corners.
    pixels = np.asarray(out.convert("L"))
    assert pixels[SIZE // 2, SIZE // 2] > 40 and max(pixels[0, 0], pixels[-1, -1]) < 10


def test_clipped_disc_is_padded_to_a_centred_square(tmp_path):
    # A disc wider than the canvas is tall (top and bottom cut off, as in many EyePACS photos).
    Image.fromarray(fundus(width=200, height=60, cx=100, cy=30, radius=45)).save(tmp_path / "wide.png")
    out = np.asarray(crop_square(tmp_path / "wide.png", Settings(size=90)).convert("L"))
    rows = np.flatnonzero((out > 10).mean(axis=1) > 0.01)
    assert 13 <= rows[0] <= 16 and 73 <= rows[-1] <= 76  # 60 of 90 rows are retina, centred
    assert out[:12].max() < 10 and out[78:].max() < 10


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape, a blue mark in the disc's upper left; EXIF says "rotate 90 CW to view" (6).
    stored = fundus(width=160, height=80, cx=100, cy=40, radius=35)
    stored[14:30, 74:90] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rotated.jpeg", exif=exif, quality=95)
    Image.fromarray(stored).save(tmp_path / "stored.jpeg", quality=95)
    out = np.asarray(crop_square(tmp_path / "rotated.jpeg", Settings(size=SIZE)), dtype=int)
    unrotated = np.asarray(crop_square(tmp_path / "stored.jpeg", Settings(size=SIZE)), dtype=int)
    turned = np.rot90(unrotated, k=-1)  # what a viewer shows
    assert np.abs(out - turned).mean() < 2
    assert np.abs(out - unrotated).mean() > 10


def test_large_jpeg_uses_reduced_decode_and_matches_full_decode(tmp_path):
    big = fundus(width=1600, height=1200, cx=800, cy=600, radius=560, noise=4)
    Image.fromarray(big).save(tmp_path / "big.jpeg", quality=95)
    Image.fromarray(big).save(tmp_path / "big.png")
    fast = np.asarray(crop_square(tmp_path / "big.jpeg", Settings(size=128)), dtype=int)
    full = np.asarray(crop_square(tmp_path / "big.png", Settings(size=128)), dtype=int)
    assert np.abs(fast - full).mean() < 2


def test_odd_sized_jpeg_is_decoded_at_the_reduction_chosen(tmp_path):
    """1601 x 1201 pixels for a 64-px crop: decoded at 1/8 (PIL's draft, asked for the ceiling of a side
    over 8, fell back to 1/4), and the crop is still the full decode's."""
    Image.fromarray(fundus(width=1601, height=1201, cx=800, cy=600, radius=560, noise=4)).save(tmp_path / "odd.jpeg")
    image, square = retina_square(tmp_path / "odd.jpeg", Settings(size=64))
    assert image.size == (201, 151) and (square[2] - square[0]) * image.width >= 64
    full = Image.open(tmp_path / "odd.jpeg").convert("RGB")
    reduced = np.asarray(cut_square(image, square, 64), dtype=int)
    assert np.abs(reduced - np.asarray(cut_square(full, square, 64), dtype=int)).mean() < 2


def _bench_module():
    """bench/preprocess_speed.py: its full-size synthetic photos, its decode counter, and the two-decode path
    of preprocess version 1 that it times the one decode against."""
    spec = importlib.util.spec_from_file_location("preprocess_speed", REPO / "bench" / "preprocess_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Full-size JPEGs: three whose retina spans the short side (as EyePACS photos' do), and one of odd size
    (3884 x 2588) whose retina spans about 1700 of its 2588 rows (a photo on a larger black canvas)."""
    bench = _bench_module()
    folder = tmp_path_factory.mktemp("full_size")
    photos = {}
    for index, (width, height) in ((0, (3888, 2592)), (2, (3216, 2136)), (8, (3456, 2304))):
        photos[f"{width}x{height}"] = folder / f"{width}x{height}.jpeg"
        bench.full_size_photo(index, width, height).save(photos[f"{width}x{height}"], quality=89)
    canvas = Image.new("RGB", (3884, 2588))
    canvas.paste(bench.full_size_photo(3, 2400, 1700), (700, 444))
    photos["small retina"] = folder / "3884x2588.jpeg"
    canvas.save(photos["small retina"], quality=89)
    return bench, photos


def test_one_decode_serves_locating_and_cropping_and_crops_as_two_did(full_size):
    """One decode for a photo whose retina spans the short side, a second, finer one only for a smaller
    retina; the image cropped is at the coarsest reduction that keeps `size` pixels across the retina (the
    3456 x 2304 photo's retina needs only 1/4, but 80% of its short side needs 1/2: decoded at 1/2, reduced
    in memory), so the crop never enlarges and costs no more to resize than before; and it is the two-decode
    path's crop: the box within 8 full-size pixels (one pixel of that path's 1/8 locating decode, the
    precision it had: under 2.5 output pixels for these retinas), the output within 1.5 grey levels on
    average (a box a pixel off moves the disc's rim and the vessels' edges, not the picture), and no
    further from a crop of the full-size decode than that path's was. (On the odd-sized photo that path
    decoded at 1/4, where PIL's draft had fallen back to a finer scale when the retina was located, and
    enlarged its crop: it is compared with the full-size decode only.)"""
    bench, photos = full_size
    settings = Settings(size=512)
    for name, decodes, scale in (("3888x2592", 1, 4), ("3216x2136", 1, 2), ("3456x2304", 1, 4), ("small retina", 2, 2)):
        path = photos[name]
        with bench.DecodeCounter() as counter:
            image, square = retina_square(path, settings)
        full = Image.open(path).convert("RGB")
        assert counter.count == decodes, name
        assert image.size == (-(-full.width // scale), -(-full.height // scale)), name
        assert settings.size <= (square[2] - square[0]) * image.width < 2 * settings.size or scale == 8, name
        before_image, before = bench.two_decode_square(path, settings)
        box_shift = bench.box_in_full_pixels(square, full.size) - bench.box_in_full_pixels(before, full.size)
        assert np.abs(box_shift).max() <= 8, (name, box_shift)
        now = np.asarray(cut_square(image, square, settings.size), dtype=float)
        then = np.asarray(cut_square(before_image, before, settings.size), dtype=float)
        if name != "small retina":
            assert np.abs(now - then).mean() < 1.5, name
        now_error = np.abs(now - np.asarray(cut_square(full, square, settings.size))).mean()
        then_error = np.abs(then - np.asarray(cut_square(full, before, settings.size))).mean()
        assert now_error < 1 and now_error <= then_error + 0.05, (name, now_error, then_error)


@pytest.fixture
def raw(tmp_path):
    return generate(tmp_path / "raw", {"train": 10, "test": 5}, seed=1, fmt="kaggle", size=96, progress=False)


def test_preprocess_writes_a_dataset_of_the_same_format(raw, tmp_path):
    dst = tmp_path / "out"
    assert preprocess(raw, dst, Settings(size=SIZE), workers=2, progress=False) == []
    assert (dst / "trainLabels.csv").read_bytes() == (raw / "trainLabels.csv").read_bytes()
    for split, n in (("train", 10), ("test", 5)):
        ds = RetinopathyDataset(dst, split)
        assert ds.format == "kaggle" and len(ds) == n
        assert all(Image.open(p).size == (SIZE, SIZE) for p in ds.paths)


def test_rerun_skips_finished_images_and_refuses_other_settings(raw, tmp_path):
    dst = tmp_path / "out"
    preprocess(raw, dst, Settings(size=SIZE), progress=False)
    done = read_split(dst, "train").paths
    stamps = {p: p.stat().st_mtime_ns for p in done}
    done[0].unlink()
    preprocess(raw, dst, Settings(size=SIZE), progress=False)
    assert done[0].exists()
    assert all(p.stat().st_mtime_ns == stamps[p] for p in done[1:])
    with pytest.raises(DatasetError, match="was made with .*'size': 40.*--overwrite"):
        preprocess(raw, dst, Settings(size=SIZE * 2), progress=False)
    preprocess(raw, dst, Settings(size=SIZE * 2), overwrite=True, progress=False)
    assert Image.open(done[1]).size == (SIZE * 2, SIZE * 2)


def _break(raw):
    """Row 3 of train: all black; row 5: truncated JPEG; row 2 of test: not an image."""
    names = read_split(raw, "train").names
    Image.new("RGB", (90, 70)).save(raw / "train" / f"{names[1]}.jpeg")
    data = (raw / "train" / f"{names[3]}.jpeg").read_bytes()
    (raw / "train" / f"{names[3]}.jpeg").write_bytes(data[: len(data) // 2])
    test_name = read_split(raw, "test").names[0]
    (raw / "test" / f"{test_name}.jpeg").write_bytes(b"garbage")
    return names[1], names[3], test_name


def test_a_folder_of_version_1_is_still_read_but_not_added_to(raw, tmp_path, capsys):
    """A folder preprocess wrote before it recorded a version (nor --normalize): training and predict read
    its settings as before, but preprocess adds no crop of another version to it."""
    dst = tmp_path / "out"
    preprocess(raw, dst, Settings(size=SIZE), progress=False)
    (dst / "preprocess.json").write_text('{"size": 40, "threshold": 10, "quality": 95}\n')  # before --normalize
    assert read_settings(dst) == Settings(size=SIZE) and Recipe.of_data(dst, 32).preprocess == Settings(size=SIZE)
    assert len(RetinopathyDataset(dst, "train")) == 10
    missing = read_split(dst, "train").paths[0]
    missing.unlink()
    assert main(["--src", str(raw), "--dst", str(dst), "--size", str(SIZE), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{dst / 'preprocess.json'}: {dst} holds crops of preprocess version 1" in err
    assert f"this is version {VERSION}: use another --dst, or --overwrite to redo every image" in err
    assert not missing.exists()  # nothing was added


def test_the_version_is_recorded_and_overwrite_redoes_every_image(raw, tmp_path):
    dst = tmp_path / "out"
    preprocess(raw, dst, Settings(size=SIZE), progress=False)
    manifest = json.loads((dst / "preprocess.json").read_text())
    assert manifest["version"] == VERSION == 2
    (dst / "preprocess.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(DatasetError, match="holds crops of preprocess version 1"):
        preprocess(raw, dst, Settings(size=SIZE), progress=False)
    done = read_split(dst, "train").paths + read_split(dst, "test").paths
    stamps = {p: p.stat().st_mtime_ns for p in done}
    preprocess(raw, dst, Settings(size=SIZE), overwrite=True, progress=False)
    assert all(p.stat().st_mtime_ns != stamps[p] for p in done)  # every image redone
    assert json.loads((dst / "preprocess.json").read_text())["version"] == VERSION
    preprocess(raw, dst, Settings(size=SIZE), progress=False)  # this version's folder: accepted
    assert read_settings(dst) == Settings(size=SIZE)


def test_bad_images_are_an_error_naming_each_file(raw, tmp_path):
    black, truncated, garbage = _break(raw)
    with pytest.raises(DatasetError) as info:
        preprocess(raw, tmp_path / "out", Settings(size=SIZE), progress=False)
    msg = str(info.value)
    assert "3 image(s) could not be preprocessed" in msg and "--skip-bad" in msg
    assert f"train row 3: {raw / 'train' / black}.jpeg: no retina found" in msg
    assert f"train row 5: {raw / 'train' / truncated}.jpeg: cannot be decoded" in msg
    assert f"test row 2: {raw / 'test' / garbage}.jpeg: not an image" in msg
    assert not (tmp_path / "out" / "trainLabels.csv").exists()


def test_skip_bad_leaves_them_out_and_lists_them(raw, tmp_path, capsys):
    black, truncated, garbage = _break(raw)
    dst = tmp_path / "out"
    assert main(["--src", str(raw), "--dst", str(dst), "--size", str(SIZE), "--workers", "1", "--skip-bad"]) == 0
    with open(dst / SKIPPED_FILE) as f:
        rows = list(csv.DictReader(f))
    assert [(r["split"], r["row"]) for r in rows] == [("test", "2"), ("train", "3"), ("train", "5")]
    train = read_split(dst, "train")
    assert len(train.names) == 8
    assert black not in train.names and truncated not in train.names
    assert len(read_split(dst, "test").names) == 4
    err = capsys.readouterr()
    assert "skipped 3 (listed in" in err.out and "no retina found" in err.err


def test_cli_error_exits_2_with_one_line(tmp_path, capsys):
    assert main(["--src", str(tmp_path), "--dst", str(tmp_path / "out")]) == 2
    assert "no dataset split files found in" in capsys.readouterr().err


def test_graham_normalisation_removes_illumination_keeps_lesions_masks_the_rim():
    from dr_resnet.data.preprocess import graham_normalize
    size = 96
    yy, xx = np.mgrid[0:size, 0:size]
    shade = 120 + 60 * xx / size  # uneven illumination across the retina
    image = np.stack([shade, shade * 0.5, shade * 0.25], axis=-1)
    image[40:43, 40:43] -= 60  # a small dark lesion
    out = np.asarray(graham_normalize(Image.fromarray(image.astype(np.uint8)), radius=size / 2), dtype=int)
    assert out.shape == (size, size, 3) and out.min() >= 0 and out.max() <= 255
    inner = out[25:35, 55:75]  # smooth retina away from the lesion: illumination gone, close to 128
    assert np.abs(inner - 128).max() <= 4
    assert out[41, 41, 0] < 60  # the lesion stands out, amplified
    assert (out[0, 0] == 128).all() and (out[-1, -1] == 128).all()  # the rim beyond 0.9 R is neutral


def test_graham_option_is_recorded_and_reruns_are_identical(raw, tmp_path):
    dst = tmp_path / "out"
    assert main(["--src", str(raw), "--dst", str(dst), "--size", "64", "--normalize", "graham", "--workers", "1"]) == 0
    first = {p.name: p.read_bytes() for p in (dst / "train").iterdir()}
    assert main(["--src", str(raw), "--dst", str(dst), "--size", "64", "--normalize", "graham", "--workers", "2",
                 "--overwrite"]) == 0
    assert {p.name: p.read_bytes() for p in (dst / "train").iterdir()} == first  # deterministic re-run
    image = np.asarray(Image.open(next(iter(sorted((dst / "train").iterdir())))), dtype=int)
    assert image.shape == (64, 64, 3) and abs(image.mean() - 128) < 12
    with pytest.raises(DatasetError, match="'normalize': 'graham'"):
        preprocess(raw, dst, Settings(size=64), progress=False)
