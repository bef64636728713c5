"""Photos checked before a run spends time on them (data/check.py): a truncated JPEG and a blank photo are
found at start, named every one, or left out with data.bad_images=skip; verdicts are cached per photo of
the source folder; the processes of a run share the check out (real gloo processes), retry failed reads,
and stop together where their datasets differ."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from PIL import Image

from dr_resnet.data import check
from dr_resnet.data.check import ReadFailure, Verdict, check_file, check_images
from dr_resnet.results.report import report
from dr_resnet.training import train

from helpers import REPO, demo_args, preprocessed_dataset


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
    first = check_images(photos, copy, workers=2)
    assert {p for p, v in first.items() if v.problem} == {truncated, blank}
    [cache] = (tmp_path / "cache" / "image_checks").iterdir()
    written = cache.stat().st_mtime_ns
    monkeypatch.setattr("dr_resnet.data.check.check_file", lambda path: pytest.fail(f"{path} decoded again"))
    assert check_images(photos, copy) == first and cache.stat().st_mtime_ns == written  # every verdict from the cache
    monkeypatch.undo()
    monkeypatch.setenv("DR_RESNET_CACHE", str(tmp_path / "cache"))
    shutil.copyfile(copy / "images" / "10_left.jpeg", blank)  # mended: its size and time changed
    assert check_images(photos, copy)[blank].problem == ""


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


# -- what a failed read is, and what a bad photo is ------------------------------------------------------

def failing_reads(monkeypatch, photo: Path, failures: int) -> list[int]:
    """Reads of `photo` fail with EIO `failures` times (an NFS server's hiccup), mid-stream: its open works,
    its first read raises. Returns the list the failed reads are counted in."""
    real_open, failed = builtins.open, []

    class Flaky:
        def __init__(self, file):
            self._file = file

        def read(self, *args):
            failed.append(1)
            raise OSError(errno.EIO, "Input/output error")

        def __getattr__(self, name):
            return getattr(self._file, name)

    def open_(file, *args, **kwargs):
        opened = real_open(file, *args, **kwargs)
        return Flaky(opened) if str(file) == str(photo) and len(failed) < failures else opened
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(check, "RETRY_S", 0.01, raising=False)
    return failed


def test_a_read_error_with_an_errno_is_retried_and_never_a_verdict_on_the_photo(data, tmp_path, monkeypatch):
    """PIL raises OSError without an errno for a truncated JPEG and UnidentifiedImageError (an OSError, no
    errno) for a file that is no image: verdicts. A read that fails with EIO is the storage's: tried again,
    the photo's verdict after a transient failure, one line naming the file and errno after a lasting one."""
    photo = data / "images" / "10_left.jpeg"
    truncated, cut_in_header, text = tmp_path / "truncated.jpeg", tmp_path / "header.jpeg", tmp_path / "notes.jpeg"
    truncated.write_bytes(photo.read_bytes()[: photo.stat().st_size // 3])
    cut_in_header.write_bytes(photo.read_bytes()[:500])
    text.write_text("not a photo")
    assert check_file(truncated).problem.startswith("cannot be decoded (image file is truncated (")
    assert check_file(cut_in_header) == Verdict("cannot be decoded (Truncated File Read)", 0, 0)
    assert check_file(text).problem.startswith("cannot be decoded (cannot identify image file")
    failed = failing_reads(monkeypatch, photo, failures=2)
    assert check_file(photo) == Verdict("", 48, 48) and len(failed) == 2
    failed = failing_reads(monkeypatch, photo, failures=100)
    answer = check_file(photo)
    assert isinstance(answer, ReadFailure) and len(failed) == check.READ_TRIES
    assert answer.line.startswith(f"cannot read {photo} on ") and "[Errno 5] Input/output error (EIO)" in answer.line
    assert "\n" not in answer.line


# -- several processes: one check a job, the same verdicts everywhere -------------------------------------

def _datasets_in_group(rank: int, port: int, folder: str) -> None:
    """One of two gloo processes building a run's datasets (components.datasets) in the scenarios of
    test_the_processes_of_a_run_share_the_check_and_agree; what each saw goes to folder/rank<r>.json."""
    from datetime import timedelta

    import numpy as np
    import torch.distributed as dist

    from dr_resnet import config
    from dr_resnet.training import components

    base = Path(folder)
    decoded: list[str] = []
    real_check = check.check_file

    def counted(path):
        decoded.append(str(path))
        return real_check(path)
    check.check_file = counted
    check.RETRY_S = 0.01
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))

    def build(cache: str, root: Path, *overrides: str, read_from: Path | None = None) -> dict:
        os.environ["DR_RESNET_CACHE"] = str(base / cache)
        decoded.clear()
        cfg = config.load(REPO / "configs" / "demo.yaml", [f"data.root={root}", "data.image_size=48", "data.workers=0",
                                                           f"output.dir={base / 'run'}", *overrides])
        try:
            built = components.datasets(cfg, read_from)
            return {"decoded": list(decoded), "train": [Path(p).name for p in built.train.paths],
                    "test": len(built.test), "skipped": sorted(Path(s["file"]).name for s in built.skipped)}
        except Exception as exc:
            return {"decoded": list(decoded), "error": str(exc), "type": type(exc).__name__}

    seen = {}
    broken, elsewhere = base / "broken", base / "elsewhere"
    seen["split"] = build("cache", broken, "data.bad_images=skip")
    seen["copy"] = build("cache", broken, "data.bad_images=skip", read_from=elsewhere)  # a staged copy
    real_open, opened = builtins.open, set()

    def flaky_open(file, *args, **kwargs):  # rank 1: each photo's first open fails (EIO), or every one
        if rank == 1 and str(file).endswith(".jpeg") and (lasting or file not in opened):
            opened.add(file)
            raise OSError(errno.EIO, "Input/output error", str(file))
        return real_open(file, *args, **kwargs)
    builtins.open = flaky_open
    lasting = False
    seen["transient"] = build("cache-transient", base / "good")
    seen["failed opens"] = len(opened)
    lasting = True
    seen["lasting"] = build("cache-lasting", base / "good")
    builtins.open = real_open
    seen["fewer rows"] = build("cache", base / "good", read_from=base / ("fewer" if rank == 1 else "good"))
    seen["missing photo"] = build("cache", base / "good", read_from=base / ("missing" if rank == 1 else "good"))
    if rank == 1:  # a held-out part drawn differently on one rank (after the photo check)
        real_holdout = components.holdout_mask
        components.holdout_mask = lambda *args: np.roll(real_holdout(*args), 1)
    seen["held-out"] = build("cache", base / "good", "data.val_fraction=0.25", "data.min_val_images=2")
    (base / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_the_processes_of_a_run_share_the_check_and_agree(data, tmp_path):
    """Two gloo processes: each photo is decoded by exactly one of them and both hold the same verdicts (a
    truncated and a blank photo left out by both); a copy of the folder at another path (a staged copy)
    reuses the verdicts; a transient EIO on one rank is retried and cached as nothing; a lasting one stops
    both with one line naming the file; datasets that differ between the ranks (a row fewer, a photo
    missing, another held-out part) stop both with one line instead of training apart."""
    broken, truncated, blank = broken_copy(data, tmp_path / "b")
    shutil.move(broken, tmp_path / "broken")
    shutil.copytree(tmp_path / "broken", tmp_path / "elsewhere")  # copytree keeps sizes and modification times
    for name in ("good", "fewer", "missing"):
        shutil.copytree(data, tmp_path / name)
    rows = (tmp_path / "fewer" / "train_img.csv").read_text().splitlines()
    labels = (tmp_path / "fewer" / "train_label.csv").read_text().splitlines()
    (tmp_path / "fewer" / "train_img.csv").write_text("\n".join(rows[:-1]) + "\n")
    (tmp_path / "fewer" / "train_label.csv").write_text("\n".join(labels[:-1]) + "\n")
    (tmp_path / "missing" / "images" / f"{rows[0].split(',')[0]}.jpeg").unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_datasets_in_group, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    photos = sorted(p.name for p in (tmp_path / "broken" / "images").iterdir())

    split = [s["split"] for s in seen]
    mine = [{Path(p).name for p in s["decoded"]} for s in split]
    assert sorted(mine[0] | mine[1]) == photos and not mine[0] & mine[1], split  # each photo once
    assert all(len(s["decoded"]) == len(m) for s, m in zip(split, mine)) and abs(len(mine[0]) - len(mine[1])) <= 1
    assert split[0]["skipped"] == split[1]["skipped"] == sorted([truncated.name, blank.name])
    assert split[0]["train"] == split[1]["train"] and len(split[0]["train"]) == 38 and split[0]["test"] == 13
    assert [s["copy"] for s in seen] == [{**split[0], "decoded": []}, {**split[1], "decoded": []}]  # nothing again

    transient = [s["transient"] for s in seen]
    assert seen[0]["failed opens"] == 0 and seen[1]["failed opens"] == len(transient[1]["decoded"]) > 20
    assert "error" not in transient[0] and "error" not in transient[1], transient
    assert transient[0]["train"] == transient[1]["train"] and transient[0]["skipped"] == transient[1]["skipped"] == []
    [cache] = (tmp_path / "cache-transient" / "image_checks").iterdir()
    verdicts = json.loads(cache.read_text())["files"]
    assert len(verdicts) == len(photos) and all(v[2] == "" for v in verdicts.values())

    lasting = [s["lasting"] for s in seen]
    assert [s["type"] for s in lasting] == ["PhotoReadError", "PhotoReadError"], lasting
    assert lasting[1]["error"].startswith(f"cannot read {tmp_path / 'good' / 'images'}/")
    assert "[Errno 5] Input/output error (EIO), 4 tries" in lasting[1]["error"] and "\n" not in lasting[1]["error"]
    assert lasting[0]["error"] == f"rank 1: {lasting[1]['error']}"
    assert not (tmp_path / "cache-lasting" / "image_checks").exists()  # no verdict cached

    fewer = [s["fewer rows"] for s in seen]
    assert [s["type"] for s in fewer] == ["DatasetsDifferError"] * 2 and fewer[0]["error"] == fewer[1]["error"], fewer
    assert fewer[0]["error"].startswith("the processes hold different train sets: 39 images on rank 1 (")
    assert ", 40 on rank 0 (" in fewer[0]["error"] and "\n" not in fewer[0]["error"]
    missing = [s["missing photo"] for s in seen]
    assert missing[1]["type"] == "DatasetError" and "image file missing" in missing[1]["error"], missing
    assert missing[0]["type"] == "DatasetsDifferError" and missing[0]["error"].startswith("rank 1 (")
    assert "could not read its dataset: lab split 'train'" in missing[0]["error"] and "\n" not in missing[0]["error"]
    held_out = [s["held-out"] for s in seen]
    assert [s["type"] for s in held_out] == ["DatasetsDifferError"] * 2, held_out
    assert "different training sets: " in held_out[0]["error"] and "but not the same images or grades" in held_out[0]["error"]


def test_evaluate_after_a_staged_training_decodes_nothing(data, tmp_path, monkeypatch):
    """The cache is keyed by the source folder and each photo's relative path: a training run that read its
    staged copy (data.stage_to) leaves verdicts that `evaluate` on the source folder finds, every one."""
    from dr_resnet.training.evaluate import main as evaluate_main

    monkeypatch.setenv("DR_RESNET_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert train.main(demo_args(data, run_dir, "train.epochs=1", f"data.stage_to={tmp_path / 'local'}", workers=0)) == 0
    decoded, real_check = [], check.check_file

    def counted(path):
        decoded.append(path)
        return real_check(path)
    monkeypatch.setattr(check, "check_file", counted)
    assert evaluate_main(["--checkpoint", str(run_dir / "checkpoint_best.pt"), "--data-root", str(data), "--workers",
                          "0", "--device", "cpu", "--resamples", "0", "--out", str(tmp_path / "eval")]) == 0
    assert decoded == [] and json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == 13
