"""The submitit launcher without SLURM: dry-run scripts, argument errors, a local-executor sweep."""

import json
from pathlib import Path

import pytest

from conftest import preprocessed_dataset
from launch.sweep import main

REPO = Path(__file__).resolve().parent.parent
SWEEP = str(REPO / "configs" / "sweep.yaml")


def test_dry_run_prints_each_arms_sbatch_script_and_submits_nothing(tmp_path, capsys):
    assert main(["--config", SWEEP, "--out", str(tmp_path / "sweep"), "--nodes", "2", "--gpus-per-node", "4",
                 "--partition", "gpu", "--account", "lab", "--qos", "high", "--time", "720", "--mem", "200",
                 "--constraint", "a100", "--exclude", "node7", "--dry-run", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    scripts = out.split("# ---- ")[1:]
    assert [s.split(":")[0] for s in scripts] == ["resnet18_pretrained", "resnet18_scratch", "resnet50_pretrained",
                                                  "resnet50_scratch"]
    for script in scripts:
        for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --time=720",
                     "#SBATCH --mem=200GB", "#SBATCH --constraint=a100", "#SBATCH --exclude=node7",
                     "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert line in script, (line, script)
        assert "train.epochs=3" in script and "output.dir=" in script
    assert "output.dir=" + str(tmp_path / "sweep" / "resnet50_scratch") in out
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args,message", [
    (["--runs", "resnet34_scratch"], "unknown arm(s) ['resnet34_scratch']"),
    (["train.epochz=3"], "unknown key 'train.epochz'"),
    (["--config", "nowhere.yaml"], "sweep file not found"),
])
def test_errors_are_named_before_anything_is_submitted(tmp_path, capsys, args, message):
    argv = ["--config", SWEEP, "--out", str(tmp_path / "s"), "--executor", "local", *args]
    if args[0] == "--config":
        argv = [*args, "--out", str(tmp_path / "s"), "--executor", "local"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_local_sweep_runs_scratch_arms_and_marks_missing_weights_not_run(tmp_path, torch_home, capsys):
    data = preprocessed_dataset(tmp_path, 24, 9, seed=4, size=32)
    out = tmp_path / "sweep"
    code = main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor", "local", "--tasks-per-node", "2",
                 "--runs", "resnet18_pretrained,resnet18_scratch", "--out", str(out), "--time", "10",
                 f"data.root={data}", "data.image_size=32", "train.batch_size=4", "train.epochs=1", "data.workers=0"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "resnet18_pretrained: NOT RUN, never trained from scratch instead" in captured.err
    assert "resnet18-f37072fd.pth" in captured.err
    reason = json.loads((out / "resnet18_pretrained" / "launch_status.json").read_text())["reason"]
    assert reason.startswith("ImageNet weights missing:") and not (out / "resnet18_pretrained" / "metrics.jsonl").exists()
    summary = json.loads((out / "resnet18_scratch" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_test_samples"] == 9
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["runs"]["resnet18_pretrained"]["status"] == "not run"
    assert manifest["runs"]["resnet18_scratch"]["status"] == "submitted"
    assert Path(manifest["runs"]["resnet18_scratch"]["log"]).is_file()
    assert "| resnet18_pretrained | 18 | imagenet | not run: ImageNet weights missing:" in (out / "results.md").read_text()
    assert (out / "accuracy_resnet18.png").is_file() and (out / "confusion_matrices.png").is_file()


def test_wait_exits_1_when_a_run_fails(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor", "local", "--runs",
                 "resnet18_scratch", "--out", str(out), "--time", "10", f"data.root={tmp_path / 'no_data'}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "resnet18_scratch: FAILED" in err and "exited with code 2" in err
    status = json.loads((out / "resnet18_scratch" / "launch_status.json").read_text())
    assert status["status"] == "failed" and "exited with code 2" in status["reason"]
    assert "| resnet18_scratch | 18 | none | failed: job " in (out / "results.md").read_text()
