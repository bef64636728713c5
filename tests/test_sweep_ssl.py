"""launch.sweep's pretraining step (launch/backbones.py): an ssl arm fine-tunes every seed from one backbone the
sweep pretrains first, cached and reused by later sweeps; on SLURM its runs wait on the pretraining job; a backbone
that cannot be made leaves its arms not run. The local sweeps run the real submitit local executor at 32 px."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dr_resnet import config
from launch.sweep import main

from helpers import REPO, preprocessed_dataset

TINY = ["data.image_size=32", "data.workers=0", "data.val_fraction=0", "train.epochs=1", "train.batch_size=8",
        "train.warmup_epochs=0", "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.hidden_dim=64",
        "pretrain.projection_dim=32", "pretrain.warmup_epochs=0"]


def sweep_file(path: Path, out: Path, arms: dict[str, list[str]], data: Path | str = "data/none") -> Path:
    path.write_text(yaml.safe_dump({"name": path.stem, "config": str(REPO / "configs" / "demo.yaml"), "out": str(out),
                                    "arms": arms, "overrides": [f"data.root={data}", *TINY]}))
    return path


SCRATCH_AND_SSL = {"resnet18_scratch": ["model.depth=18", "model.weights=none"],
                   "resnet18_ssl": ["model.depth=18", "model.weights=ssl"]}


def backbone_folders(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []


@pytest.mark.slow
def test_a_sweep_pretrains_once_for_every_seed_and_a_second_sweep_reuses_the_backbone(tmp_path, capsys):
    data = preprocessed_dataset(tmp_path / "d", 40, 13, seed=5, size=32)
    first = sweep_file(tmp_path / "first.yaml", tmp_path / "a", SCRATCH_AND_SSL, data)
    argv = ["--config", str(first), "--executor", "local", "--seeds", "1,2", "--time", "20"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    cache = tmp_path / "backbones"  # the sweep folder's parent / backbones
    (folder,) = backbone_folders(cache)
    assert folder.name.startswith("resnet18_ssl-")
    manifest = json.loads((tmp_path / "a" / "sweep.json").read_text())
    (entry,) = manifest["backbones"].values()
    assert entry["folder"] == str(folder) and entry["status"] == "pretrained" and entry["job_id"]
    assert sorted(entry["runs"]) == ["resnet18_ssl_seed1", "resnet18_ssl_seed2"]
    record = json.loads((folder / "backbone.json").read_text())
    assert record["finished"] and record["initialisation"] == "ssl" and record["config_hash"] == entry["config_hash"]
    assert folder.name == f"resnet18_ssl-{record['config_hash']}"
    assert json.loads((folder / "job.json").read_text())["job_id"] == entry["job_id"]
    pretraining = yaml.safe_load((folder / "config.yaml").read_text())
    assert pretraining["train"]["seed"] == 0 and pretraining["model"]["weights"] == "none"  # the recipe's seed
    for seed in (1, 2):
        run = tmp_path / "a" / "resnet18_ssl" / f"seed{seed}"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["weights"] == str(folder / "backbone.pt") and saved["train"]["seed"] == seed
        assert json.loads((run / "summary.json").read_text())["initialisation"] == "ssl"
        assert "(ssl, linear scaling)" in (run / "train.log").read_text()  # the ssl arms' learning-rate rule
        assert manifest["runs"][f"resnet18_ssl_seed{seed}"]["backbone"] == folder.name
        scratch = tmp_path / "a" / "resnet18_scratch" / f"seed{seed}"
        assert json.loads((scratch / "summary.json").read_text())["initialisation"] == "scratch"
    job = (folder / "job.json").read_text()
    made_at = (folder / "backbone.pt").stat().st_mtime_ns

    # The same sweep again: every run finished, nothing pretrained again.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier") == 4
    # A second sweep file with another out: folder finds the backbone beside it and fine-tunes from it.
    second = sweep_file(tmp_path / "second.yaml", tmp_path / "b", {"resnet18_ssl": ["model.depth=18", "model.weights=ssl"]},
                        data)
    assert main(["--config", str(second), "--executor", "local", "--seeds", "3", "--time", "20"]) == 0
    out = capsys.readouterr().out
    assert f"resnet18_ssl: backbone {folder} (pretrained earlier): reused" in out
    assert backbone_folders(cache) == [folder] and (folder / "job.json").read_text() == job
    assert (folder / "backbone.pt").stat().st_mtime_ns == made_at
    (entry,) = json.loads((tmp_path / "b" / "sweep.json").read_text())["backbones"].values()
    assert entry["status"] == "reused" and "job_id" not in entry
    run = tmp_path / "b" / "resnet18_ssl" / "seed3"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["weights"] == str(folder / "backbone.pt")
    assert json.loads((run / "summary.json").read_text())["initialisation"] == "ssl"


@pytest.mark.slow
def test_a_backbone_that_cannot_be_made_leaves_its_arms_not_run_never_trained_from_scratch(tmp_path, torch_home, capsys):
    data = preprocessed_dataset(tmp_path / "d", 40, 13, seed=5, size=32)
    arms = {"resnet18_ssl": ["model.depth=18", "model.weights=ssl"],
            "resnet18_imagenet+ssl": ["model.depth=18", "model.weights=imagenet+ssl"]}  # no ImageNet weights here
    code = main(["--config", str(sweep_file(tmp_path / "s.yaml", tmp_path / "s", arms, data)), "--executor", "local",
                 "--seeds", "0,1", "--time", "20", "pretrain.batch_size=64"])  # a batch larger than the 40 photos
    err = capsys.readouterr().err
    assert code == 1, err  # a failed pretraining fails the sweep, as a failed run does
    manifest = json.loads((tmp_path / "s" / "sweep.json").read_text())
    statuses = {b["initialisation"]: b for b in manifest["backbones"].values()}
    assert statuses["ssl"]["status"] == "failed" and "pretrain.batch_size=64" in statuses["ssl"]["reason"]
    assert statuses["imagenet+ssl"]["status"] == "not run" and "job_id" not in statuses["imagenet+ssl"]
    assert "ImageNet weights missing" in statuses["imagenet+ssl"]["reason"]
    for arm, why in (("resnet18_ssl", "pretrain.batch_size=64"), ("resnet18_imagenet+ssl", "ImageNet weights missing")):
        for seed in (0, 1):
            run = tmp_path / "s" / arm / f"seed{seed}"
            status = json.loads((run / "launch_status.json").read_text())
            assert status["status"] == "not run" and why in status["detail"]
            assert not (run / "metrics.jsonl").exists() and not (run / "summary.json").exists()
            assert manifest["runs"][f"{arm}_seed{seed}"]["status"] == "not run"
        assert f"{arm}_seed0: NOT RUN, never trained from scratch instead" in err


def test_the_slurm_dry_run_makes_the_fine_tuning_wait_on_the_pretraining_job(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: a dry run needs none
    path = sweep_file(tmp_path / "s.yaml", tmp_path / "runs" / "s", SCRATCH_AND_SSL, tmp_path)
    assert main(["--config", str(path), "--dry-run", "--executor", "slurm", "--seeds", "4,5",
                 "--slurm", "mail-type=END"]) == 0
    out = capsys.readouterr().out
    scripts = {s.split(":")[0].split(" (")[0]: s for s in out.split("# ---- ")[1:]}
    (pretraining,) = [name for name in scripts if name.startswith("pretraining ")]
    name = pretraining.removeprefix("pretraining ").split(" for ")[0]
    folder = tmp_path / "runs" / "backbones" / name
    script = scripts[pretraining]
    job_id = script.split("(job ")[1].split(")")[0]
    assert f"output.dir={folder} " in script and "model.weights=none" in script and "train.seed=" not in script
    assert f"#SBATCH --job-name={name}" in script and f"#SBATCH --output={folder}/submitit/%j_0_log.out" in script
    assert "--dependency" not in script
    for seed in (4, 5):
        ssl = scripts[f"resnet18_ssl_seed{seed}"]
        assert f"model.weights={folder / 'backbone.pt'}" in ssl.splitlines()[0]
        for line in (f"#SBATCH --dependency=afterok:{job_id}", "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --requeue",
                     "#SBATCH --mail-type=END"):
            assert line in ssl.splitlines(), line
        assert "--dependency" not in scripts[f"resnet18_scratch_seed{seed}"]
        assert "#SBATCH --requeue" in scripts[f"resnet18_scratch_seed{seed}"]
    assert not (tmp_path / "runs").exists()  # nothing written: no sweep folder, no backbone folder
    # A dependency of the cluster's own (--slurm) is kept: both must hold.
    assert main(["--config", str(path), "--dry-run", "--runs", "resnet18_ssl", "--slurm", "dependency=after:77"]) == 0
    assert f"#SBATCH --dependency=after:77,afterok:{job_id}" in capsys.readouterr().out.splitlines()


def pretraining_folder(capsys, path: Path, *args: str) -> str:
    assert main(["--config", str(path), "--print-config", "--runs", "resnet18_ssl", *args]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    folders = [d["output"]["dir"] for d in documents if Path(d["output"]["dir"]).name.startswith("resnet18_ssl-")]
    assert len(folders) == 1  # one pretraining, whatever the seeds
    return folders[0]


def test_a_backbone_is_named_by_the_settings_that_decide_it(tmp_path, capsys):
    path = sweep_file(tmp_path / "s.yaml", tmp_path / "runs" / "s", SCRATCH_AND_SSL, tmp_path)
    shared = pretraining_folder(capsys, path)
    assert shared.startswith(str(tmp_path / "runs" / "backbones" / "resnet18_ssl-"))
    # seeds, the labelled share and the fine-tuning's own settings share it
    assert pretraining_folder(capsys, path, "--seeds", "1,2,3") == shared
    assert pretraining_folder(capsys, path, "data.train_fraction=0.25", "train.lr=0.3", "train.epochs=2") == shared
    # what the backbone learns from, how and where it starts, does not
    for changed in ("pretrain.epochs=2", "pretrain.pools=/elsewhere", "data.image_size=48", "train.seed=7",
                    "model.zero_init_residual=false", "data.test_split=other"):
        assert pretraining_folder(capsys, path, changed) != shared, changed
    assert pretraining_folder(capsys, path, "--backbones", str(tmp_path / "cache")).startswith(str(tmp_path / "cache"))
    # the pretraining command records the same hash the sweep names the folder by
    cfg = config.load(REPO / "configs" / "demo.yaml", [f"data.root={tmp_path}", *TINY, "model.weights=none",
                                                       "output.dir=elsewhere"])
    assert shared.endswith("-" + config.pretraining_hash(cfg))
    assert not (tmp_path / "runs").exists()


def test_training_alone_with_the_sweeps_keyword_fails_in_one_line(tmp_path, capsys):
    from dr_resnet.training.train import main as train

    assert train(["--config", str(REPO / "configs" / "demo.yaml"), "model.weights=ssl", f"output.dir={tmp_path / 'r'}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "model.weights=ssl is launch.sweep's keyword" in line and "python -m dr_resnet.pretrain" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_cache_lock_holds_a_second_process_until_the_first_lets_go(tmp_path):
    from launch.backbones import exclusive

    lock, done = tmp_path / ".b.lock", tmp_path / "done"
    code = (f"from launch.backbones import exclusive\nfrom pathlib import Path\n"
            f"with exclusive(Path({str(lock)!r}), 'test'):\n    Path({str(done)!r}).write_text('x')\n")
    with exclusive(lock, "test"):
        other = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        time.sleep(3)  # long enough for the other process to start and reach the lock
        assert other.poll() is None and not done.exists()
    assert other.wait(timeout=60) == 0 and done.exists()
