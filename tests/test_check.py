"""Photos checked before a run spends time on them (data/check.py): a truncated JPEG and a blank photo are
found at start, named every one, or left out with data.bad_images=skip; verdicts are cached per file."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from dr_resnet.data.check import check_file, check_images
from dr_resnet.results.report import report
from dr_resnet.training import train

from helpers import demo_args, preprocessed_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return preprocessed_dataset(tmp_path_factory.mktemp("checkdata"), 40, 13, seed=6, size=48)


def broken_copy(data, folder):
    """The dataset with one training photo truncated to a third of its bytes and another all black."""
    copy = folder / "data"
    shutil.copytree(data, copy)
    names = (copy / "train_img.csv").read_text().split()
    truncated, blank = copy / "images" / f"{names[3]}.jpeg", copy / "images" / f"{names[7]}.jpeg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    Image.new("RGB", (48, 48)).save(blank)
    return copy, truncated, blank


def test_a_truncated_and_a_blank_photo_are_found_and_cached(data, tmp_path, monkeypatch):
    monkeypatch.setenv("DR_RESNET_CACHE", str(tmp_path / "cache"))
    copy, truncated, blank = broken_copy(data, tmp_path)
    assert "cannot be decoded" in check_file(truncated).problem and "truncated" in check_file(truncated).problem
    assert check_file(blank).problem.startswith("blank") and check_file(copy / "images" / "10_left.jpeg").problem == ""
    photos = sorted((copy / "images").iterdir())
    first = check_images(photos, workers=2)
    assert {p for p, v in first.items() if v.problem} == {truncated, blank}
    [cache] = (tmp_path / "cache" / "image_checks").iterdir()
    written = cache.stat().st_mtime_ns
    monkeypatch.setattr("dr_resnet.data.check.check_file", lambda path: pytest.fail(f"{path} decoded again"))
    assert check_images(photos) == first and cache.stat().st_mtime_ns == written  # every verdict from the cache
    monkeypatch.undo()
    monkeypatch.setenv("DR_RESNET_CACHE", str(tmp_path / "cache"))
    shutil.copyfile(copy / "images" / "10_left.jpeg", blank)  # mended: its size and time changed
    assert check_images(photos)[blank].problem == ""


def test_training_stops_before_its_first_epoch_naming_every_bad_photo(data, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("DR_RESNET_CACHE", str(tmp_path / "cache"))
    copy, truncated, blank = broken_copy(data, tmp_path)
    run_dir = tmp_path / "run"
    assert train.main(demo_args(copy, run_dir, "train.epochs=1", workers=0)) == 2
    err = capfd.readouterr().err
    assert "2 photo(s) cannot be used:" in err and "data.bad_images=skip" in err
    assert f"{truncated} (row 4, split 'train'): cannot be decoded" in err and f"{blank} (row 8, split 'train'): blank" in err
    assert not (run_dir / "metrics.jsonl").exists()


def test_skip_trains_without_them_and_names_them(data, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("DR_RESNET_CACHE", str(tmp_path / "cache"))
    copy, truncated, blank = broken_copy(data, tmp_path)
    run_dir = tmp_path / "run"
    assert train.main(demo_args(copy, run_dir, "train.epochs=1", "data.bad_images=skip", workers=0)) == 0
    assert "leaving out 2 photo(s) that cannot be used" in capfd.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(s["file"] for s in summary["skipped_images"]) == sorted([str(truncated), str(blank)])
    assert "38 train / 13 test images" in (run_dir / "train.log").read_text()
    report(run_dir, tmp_path / "report")
    assert "| 2 |" in (tmp_path / "report" / "results.md").read_text()


def test_evaluate_names_every_bad_photo_or_skips_them(data, tmp_path, capfd, monkeypatch):
    from dr_resnet.training.evaluate import main as evaluate_main

    monkeypatch.setenv("DR_RESNET_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert train.main(demo_args(data, run_dir, "train.epochs=1", workers=0)) == 0
    copy, truncated, blank = broken_copy(data, tmp_path)
    args = ["--checkpoint", str(run_dir / "checkpoint_best.pt"), "--data-root", str(copy), "--split", "train",
            "--workers", "0", "--device", "cpu", "--resamples", "0"]
    capfd.readouterr()
    assert evaluate_main([*args, "--out", str(tmp_path / "eval")]) == 2
    err = capfd.readouterr().err
    assert str(truncated) in err and str(blank) in err and "--bad-images skip" in err and "resumes" not in err
    assert evaluate_main([*args, "--out", str(tmp_path / "eval"), "--bad-images", "skip"]) == 0
    found = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert found["num_samples"] == 38 and len(found["skipped_images"]) == 2


def test_the_dataset_is_staged_once_a_node_and_read_there(data, tmp_path, capfd):
    """data.stage_to copies the prepared dataset to node-local storage at start (its time logged), the run
    reads the copy, a second start finds it unchanged, and a changed dataset is copied to a new folder (the
    old copy, which another job may be reading, stays)."""
    from dr_resnet.data.stage import copy_name, manifest_of

    run_args = ["train.epochs=1", f"data.stage_to={tmp_path / 'local'}"]
    assert train.main(demo_args(data, tmp_path / "run", *run_args, workers=0)) == 0
    staged = tmp_path / "local" / copy_name(data.resolve(), manifest_of(data.resolve()))
    err = capfd.readouterr().err
    assert f"data.stage_to: staged {data.resolve()} to {staged}:" in err and " s\n" in err
    assert sorted(p.name for p in (staged / "images").iterdir()) == sorted(p.name for p in (data / "images").iterdir())
    assert train.main(demo_args(data, tmp_path / "run2", *run_args, workers=0)) == 0
    assert f"{staged} already holds an unchanged copy" in capfd.readouterr().err
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    assert train.main(demo_args(copy, tmp_path / "run3", *run_args, workers=0)) == 0
    assert "data.stage_to: staged" in capfd.readouterr().err
    assert len([p for p in (tmp_path / "local").iterdir() if not p.name.startswith(".")]) == 2
    # The run's config keeps its own data.root (a resume on another node stages again, and is not refused).
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["root"] == str(data)
