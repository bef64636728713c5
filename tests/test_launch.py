"""The submitit launcher without SLURM: dry-run scripts, argument errors, a local-executor sweep; the
sbatch script's process and CPU counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dr_resnet.config import ConfigError
from dr_resnet.training.distributed import master_port
from launch.sweep import gpu_slots, main, slurm_minutes

from helpers import (
    REPO,
    metrics_rows,
    preprocessed_dataset,
)

SWEEP = str(REPO / "configs" / "sweep.yaml")


def test_dry_run_prints_each_arms_sbatch_script_and_submits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, sbatch or scontrol: a dry run needs none
    assert main(["--config", SWEEP, "--out", str(tmp_path / "sweep"), "--nodes", "2", "--gpus-per-node", "4",
                 "--partition", "gpu", "--account", "lab", "--qos", "high", "--time", "720", "--mem", "200",
                 "--constraint", "a100", "--exclude", "node7", "--dry-run", "train.epochs=8"]) == 0
    out = capsys.readouterr().out
    scripts = out.split("# ---- ")[1:]
    assert [s.split(":")[0] for s in scripts] == ["resnet18_pretrained", "resnet18_scratch", "resnet50_pretrained",
                                                  "resnet50_scratch"]
    for script in scripts:
        for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --time=720",
                     "#SBATCH --mem=200G", "#SBATCH --constraint=a100", "#SBATCH --exclude=node7",
                     "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert line in script, (line, script)
        assert "train.epochs=8" in script and "output.dir=" in script
        # base.yaml's 8 data workers + the training process; every srun ends the job when a rank dies.
        assert "#SBATCH --cpus-per-task=9" in script
        assert "srun --unbuffered" in script and "--kill-on-bad-exit=1 --cpus-per-task=9" in script
    assert "output.dir=" + str(tmp_path / "sweep" / "resnet50_scratch") in out
    assert not (tmp_path / "sweep").exists()


def test_seeds_give_each_arm_a_run_per_seed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["--config", SWEEP, "--out", str(tmp_path / "s"), "--dry-run", "--runs", "resnet18_scratch",
                 "--seeds", "0,2"]) == 0
    scripts = capsys.readouterr().out.split("# ---- ")[1:]
    assert [s.split(":")[0] for s in scripts] == ["resnet18_scratch_seed0", "resnet18_scratch_seed2"]
    for seed, script in zip((0, 2), scripts):
        for part in (f"train.seed={seed}", f"wandb.name=resnet18_scratch_seed{seed}", "wandb.group=",
                     "output.dir=" + str(tmp_path / "s" / "resnet18_scratch" / f"seed{seed}")):
            assert part in script.splitlines()[0], part
    with pytest.raises(SystemExit):
        main(["--config", SWEEP, "--dry-run", "--seeds", "0,x"])
    with pytest.raises(SystemExit):
        main(["--config", SWEEP, "--dry-run", "--seeds", "1,1"])
    assert "a seed appears twice" in capsys.readouterr().err


def test_dry_run_defaults_fit_the_data_workers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["--config", SWEEP, "--out", str(tmp_path / "s"), "--gpus-per-node", "4", "--dry-run",
                 "--runs", "resnet18_scratch", "data.workers=6"]) == 0
    out = capsys.readouterr().out
    # 4 x (6 + 6 + 0.4) = 49.6 GB, rounded up: each task's fork server holds 0.4 GB of its own
    assert "4 task(s), 7 CPU(s) a task, 50G a node, 4 GPU(s) a node" in out
    assert "#SBATCH --cpus-per-task=7" in out and "#SBATCH --mem=50G" in out
    assert main(["--config", SWEEP, "--out", str(tmp_path / "s"), "--dry-run", "--runs", "resnet18_scratch"]) == 0
    assert "#SBATCH --mem=15G" in capsys.readouterr().out  # one task, base.yaml's 8 workers: 6 + 8 + 0.4 = 14.4
    assert main(["--config", SWEEP, "--out", str(tmp_path / "s"), "--dry-run", "--runs", "resnet18_scratch",
                 "--cpus-per-task", "3", "--mem", "20"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=3" in out and "#SBATCH --mem=20G" in out and "--cpus-per-task=3" in out


@pytest.mark.parametrize("text,minutes", [("90", 90), ("12:00:00", 720), ("1-00:00:00", 1440), ("2-12", 3600),
                                          ("1-2:30", 1590), ("45:30", 46), ("0:30:00", 30)])
def test_time_limits_in_slurms_formats(text, minutes):
    assert slurm_minutes(text) == minutes


def test_the_clusters_own_options_reach_the_script_submitit_writes(tmp_path, capsys, monkeypatch):
    """SLURM's time and memory formats, --gres in place of --gpus-per-node, setup lines before srun in
    their order, and any other sbatch option through --slurm, in the exact script a submission writes."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["--config", SWEEP, "--out", str(tmp_path / "s"), "--runs", "resnet18_scratch", "--dry-run",
                 "--time", "1-00:00:00", "--mem", "64g", "--gres", "gpu:a100:4", "--setup", "module load cuda/12.4",
                 "--setup", "source ~/venvs/dr/bin/activate", "--slurm", "mail-type=END", "--slurm=--hint=nomultithread",
                 "--slurm", "exclusive"]) == 0
    script = capsys.readouterr().out.split("# ---- ")[1]
    lines = script.splitlines()
    for line in ("#SBATCH --time=1440", "#SBATCH --mem=64G", "#SBATCH --gres=gpu:a100:4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --mail-type=END", "#SBATCH --hint=nomultithread", "#SBATCH --exclusive"):
        assert line in lines, line
    assert not any(line.startswith("#SBATCH --gpus-per-node") for line in lines)
    setup = lines.index("module load cuda/12.4")
    assert lines[setup + 1] == "source ~/venvs/dr/bin/activate"
    assert setup < next(i for i, line in enumerate(lines) if line.startswith("srun "))
    for bad, message in ((["--time", "1-xx"], "--time '1-xx' is not minutes"), (["--mem", "lots"], "--mem 'lots'"),
                         (["--gres", "gpu:4", "--gpus-per-node", "4"], "--gres and --gpus-per-node")):
        with pytest.raises(SystemExit):
            main(["--config", SWEEP, "--dry-run", *bad])
        assert message in capsys.readouterr().err


def test_an_array_sweep_is_one_script_with_a_task_per_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["--config", SWEEP, "--out", str(tmp_path / "grid"), "--runs", "resnet18_scratch,resnet50_scratch",
                 "--seeds", "0,1", "--array-parallelism", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "one job array of 4 runs" in out
    tasks = [line.split(": ")[1] for line in out.splitlines() if line.startswith("# ---- array task")]
    assert tasks == ["resnet18_scratch_seed0", "resnet18_scratch_seed1", "resnet50_scratch_seed0", "resnet50_scratch_seed1"]
    lines = out.splitlines()
    assert "#SBATCH --array=0-3%2" in lines and "#SBATCH --job-name=grid" in lines
    assert f"#SBATCH --output={tmp_path / 'grid' / 'submitit'}/%A_%a_0_log.out" in lines
    assert out.count("#!/bin/bash") == 1 and not (tmp_path / "grid").exists()


@pytest.mark.slow
def test_a_local_array_sweep_of_two_arms_and_two_seeds_runs_each_in_its_folder(tmp_path, capsys):
    data = preprocessed_dataset(tmp_path, 24, 9, seed=4, size=32)
    out = tmp_path / "grid"
    assert main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--out", str(out), "--executor", "local",
                 "--runs", "resnet18_scratch,resnet50_scratch", "--seeds", "0,1", "--array",
                 f"data.root={data}", "data.image_size=32", "train.epochs=1", "train.batch_size=8", "data.workers=0",
                 "train.warmup_epochs=0", "data.val_fraction=0"]) == 0
    manifest = json.loads((out / "sweep.json").read_text())
    assert sorted(manifest["runs"]) == ["resnet18_scratch_seed0", "resnet18_scratch_seed1", "resnet50_scratch_seed0",
                                        "resnet50_scratch_seed1"]
    for arm in ("resnet18_scratch", "resnet50_scratch"):
        for seed in (0, 1):
            run = out / arm / f"seed{seed}"
            assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 1
            assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == seed
    assert "resnet50_scratch/seed1" in (out / "results.md").read_text()


BASE = str(REPO / "configs" / "base.yaml")  # the script reads the config (data.stage_to) also in a dry run


def sbatch_dry_run(tmp_path, *args: str, **slurm) -> str:
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[1-2]",
           "SLURM_NNODES": "2", "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **slurm}
    result = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), "--config", BASE, *args],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("slurm,processes", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4), ({"SLURM_GPUS_PER_NODE": "a100:2"}, 2), ({"SLURM_GPUS_PER_NODE": "8"}, 8),
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3), ({}, 1), ({"SLURM_GPUS_ON_NODE": "4", "NPROC_PER_NODE": "2"}, 2)])
def test_sbatch_script_counts_processes_from_slurms_gpus_and_gives_them_the_cpus(tmp_path, slurm, processes):
    out = sbatch_dry_run(tmp_path, SLURM_CPUS_PER_TASK="36", **slurm)
    command = out.strip().splitlines()[-1]
    # One task (one torchrun) a node, whatever --ntasks-per-node the job was submitted with.
    assert command.startswith("srun --kill-on-bad-exit=1 --nodes 2 --ntasks 2 --ntasks-per-node=1 --cpus-per-task 36 ")
    assert f"--nnodes 2 --nproc_per_node {processes} " in command and "--rdzv_id 4242" in command
    assert f":{master_port(4242)} " in command  # the rendezvous port rule of dr_resnet.distributed
    assert command.endswith(f"-m dr_resnet.train --config {BASE}")
    assert f"2 node(s) x {processes} process(es)" in out and "36 CPU(s) a node" in out
    assert "dr_resnet.stage" not in out  # no data.stage_to: no staging step


def test_the_sbatch_script_stages_the_dataset_in_a_step_of_its_own_before_training(tmp_path):
    """data.stage_to: one task a node copies the dataset in its own step, under no process group's timeout,
    then the training step starts; a '$TMPDIR' reaches the nodes unexpanded (each expands its own)."""
    lines = sbatch_dry_run(tmp_path, "data.stage_to=$TMPDIR", SLURM_CPUS_PER_TASK="9").strip().splitlines()
    assert lines[-2] == (f"srun --kill-on-bad-exit=1 --nodes 2 --ntasks 2 --ntasks-per-node=1 --cpus-per-task 9 "
                         f"{sys.executable} -m dr_resnet.stage --train --config {BASE} data.stage_to=$TMPDIR")
    assert lines[-1].endswith(f"-m dr_resnet.train --config {BASE} data.stage_to=$TMPDIR")


def test_the_sbatch_script_runs_its_setup_first_and_says_how_to_submit_it_outside_slurm(tmp_path):
    """SETUP runs before anything needs Python (here it chooses the interpreter the job uses); outside a
    SLURM job the script says how to submit it; slurm/sweep.sh --help prints its usage."""
    out = sbatch_dry_run(tmp_path, PYTHON="no-such-python", SETUP=f"export MARK=1; PYTHON={sys.executable}")
    assert out.splitlines()[0] == f"setup: export MARK=1; PYTHON={sys.executable}"
    assert f"--cpus-per-task 1 {sys.executable} -m torch.distributed.run" in out.strip().splitlines()[-1]
    outside = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), "--config", "configs/base.yaml"],
                             env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, cwd=tmp_path)
    assert outside.returncode == 2 and "is a SLURM batch script: submit it with sbatch" in outside.stderr
    usage = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sh"), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: ") and "SETUP (shell lines" in usage.stdout
    assert not (tmp_path / "--help").exists()


def test_gpu_slots_never_share_a_gpu():
    assert gpu_slots([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert gpu_slots([4, 6, 7], 1) == [[4], [6], [7]]
    assert gpu_slots([0, 1, 2], 2) == [[0, 1]]
    with pytest.raises(ConfigError, match="--gpus-per-node 2: only 1 GPU"):
        gpu_slots([0], 2)


@pytest.mark.slow
def test_local_executor_runs_arms_that_share_gpus_one_after_another(tmp_path, capsys):
    """One GPU id for two arms: the second is submitted only once the first has ended (on this CPU
    machine the jobs train on CPU; what is checked is the launcher's GPU bookkeeping)."""
    data = preprocessed_dataset(tmp_path, 24, 9, seed=4, size=32)
    out = tmp_path / "sweep"
    code = main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor", "local", "--gpus-per-node", "1",
                 "--visible-gpus", "0", "--runs", "resnet18_scratch,resnet50_scratch", "--out", str(out), "--time", "10",
                 f"data.root={data}", "data.image_size=32", "train.batch_size=4", "train.epochs=1", "data.workers=0"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert runs["resnet18_scratch"]["gpus"] == [0] and runs["resnet50_scratch"]["gpus"] == [0]
    first_done = (out / "resnet18_scratch" / "summary.json").stat().st_mtime
    assert runs["resnet50_scratch"]["submitted_at"] >= first_done
    for arm in runs:
        assert json.loads((out / arm / "summary.json").read_text())["epochs_completed"] == 1


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


@pytest.mark.slow
def test_local_sweep_runs_scratch_arms_and_marks_missing_weights_not_run(tmp_path, torch_home, capsys):
    data = preprocessed_dataset(tmp_path, 24, 9, seed=4, size=32)
    out = tmp_path / "sweep"
    code = main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor", "local", "--tasks-per-node", "2",
                 "--runs", "resnet18_pretrained,resnet18_scratch", "--out", str(out), "--time", "10", "--seeds", "0,1",
                 f"data.root={data}", "data.image_size=32", "train.batch_size=4", "train.epochs=1", "data.workers=0"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "resnet18_pretrained_seed0: NOT RUN, never trained from scratch instead" in captured.err
    assert "resnet18-f37072fd.pth" in captured.err
    not_run = out / "resnet18_pretrained" / "seed0"
    reason = json.loads((not_run / "launch_status.json").read_text())["reason"]
    assert reason.startswith("ImageNet weights missing:") and not (not_run / "metrics.jsonl").exists()
    for seed in (0, 1):
        run_dir = out / "resnet18_scratch" / f"seed{seed}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["num_test_samples"] == 9
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"] == seed
        assert (run_dir / "predictions.csv").is_file() and summary["intervals"]["unit"] == "patients"
    # Two seeds train differently.
    assert metrics_rows(out / "resnet18_scratch" / "seed0") != metrics_rows(out / "resnet18_scratch" / "seed1")
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["runs"]["resnet18_pretrained_seed1"]["status"] == "not run"
    assert manifest["runs"]["resnet18_scratch_seed1"]["status"] == "submitted"
    assert Path(manifest["runs"]["resnet18_scratch_seed0"]["log"]).is_file()
    results = (out / "results.md").read_text()
    assert "| resnet18_pretrained/seed0 | not run: ImageNet weights missing:" in results  # results.md: the page's columns
    assert "| resnet18 scratch | 0, 1 | " in results  # the seeds table
    assert ("| pretrained vs scratch at ResNet18 | resnet18 pretrained | resnet18 scratch | not compared: resnet18 pretrained "
            "has no predictions.csv (not run: ImageNet weights missing") in results
    assert (out / "accuracy_resnet18.png").is_file() and (out / "confusion_matrices.png").is_file()


@pytest.mark.slow
def test_wait_exits_1_when_a_run_fails(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor", "local", "--runs",
                 "resnet18_scratch", "--out", str(out), "--time", "10", f"data.root={tmp_path / 'no_data'}"])
    assert code == 1
    err = capsys.readouterr().err
    # the run's own error (its train.log): a failure of what it trains, said in its own words, not the job's exit
    assert "resnet18_scratch: FAILED" in err and "no_data is not a directory" in err
    status = json.loads((out / "resnet18_scratch" / "launch_status.json").read_text())
    assert status["status"] == "failed" and "no_data is not a directory" in status["reason"]
    assert "| resnet18_scratch | failed: job " in (out / "results.md").read_text()


def test_sbatch_sweep_script_reads_the_arms_from_the_sweep_file(tmp_path):
    """slurm/sweep.sh submits the sweep file's arms, with their overrides: the arms live in one place."""
    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(f"name: two\nconfig: {REPO / 'configs' / 'base.yaml'}\narms:\n"
                          "  r34_scratch: [model.depth=34, model.weights=none]\n"
                          "  r18_small: [model.depth=18, data.image_size=256]\noverrides: [train.epochs=8]\n")
    env = {**os.environ, "DRY_RUN": "1", "SWEEP_FILE": str(sweep_file), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sh"), str(tmp_path / "runs"), "--nodes", "2", "--",
                             "data.root=/data/x"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["r34_scratch", "r18_small"]
    assert (f"--nodes 2 {REPO / 'slurm' / 'train.sbatch'} --config {REPO / 'configs' / 'base.yaml'} model.depth=34 "
            f"model.weights=none train.epochs=8 output.dir={tmp_path / 'runs' / 'r34_scratch'} wandb.group=runs "
            f"data.root=/data/x") in lines[0]
    assert "model.depth=18 data.image_size=256 train.epochs=8" in lines[1]
    assert not (tmp_path / "runs").exists()


def test_the_batch_script_follows_the_one_requeue_policy():
    from launch import requeue

    directives = [line for line in (REPO / "slurm" / "train.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    for line in requeue.SBATCH_LINES:
        assert line in directives, line
    assert not [line for line in directives if "--signal" in line and line not in requeue.SBATCH_LINES]
    # torchrun's grace for the workers' checkpoint after the signal: the lead time less a margin, not its 30 s
    assert requeue.SHUTDOWN_LINE in (REPO / "slurm" / "train.sbatch").read_text().splitlines()
    assert 30 < requeue.SHUTDOWN_S < requeue.SIGNAL_LEAD_S
    # The stop signal goes to the steps' tasks (scancel --signal, naming this array task alone), never to srun,
    # which would kill the step.
    script = (REPO / "slurm" / "train.sbatch").read_text()
    assert 'scancel --signal=TERM "$JOB"' in script and 'kill -TERM "$training"' in script.split("else")[-1]
    assert 'JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}' in script


def test_the_batch_scripts_trap_fits_in_the_signals_lead_time():
    """USR1 comes SIGNAL_LEAD_S before the limit: the trap's every SLURM call is cut off after SLURM_CALL_S,
    so that the calls and torchrun's SHUTDOWN_S for the checkpoint end before it, with seconds to spare."""
    import re

    from launch import requeue

    script = (REPO / "slurm" / "train.sbatch").read_text()
    assert requeue.SLURM_CALL_LINE in script.splitlines()
    trap = script[script.index("requeue() {"):script.index("trap requeue USR1")]
    calls = re.findall(r'(timeout "\$SLURM_CALL_S" )?\b(squeue|scancel|scontrol)\b', re.sub(r'echo "[^"]*"', "", trap))
    assert sorted(name for _, name in calls) == ["scancel", "scontrol", "squeue"]
    assert all(bounded for bounded, _ in calls) and len(calls) == requeue.TRAP_CALLS, calls
    assert requeue.SIGNAL_LEAD_S - requeue.SHUTDOWN_S - requeue.TRAP_CALLS * requeue.SLURM_CALL_S == requeue.SPARE_S >= 5


def test_the_batch_scripts_cpus_are_one_gpus_as_launch_sweep_counts_them():
    """launch.sweep gives a task data.workers + 1 CPUs; train.sbatch's default is one GPU's of base.yaml."""
    from dr_resnet import config

    workers = config.load(REPO / "configs" / "base.yaml").data.workers
    assert f"#SBATCH --cpus-per-task={workers + 1}" in (REPO / "slurm" / "train.sbatch").read_text().splitlines()


def test_the_launcher_calls_no_private_submitit_method():
    import ast

    tree = ast.parse((REPO / "launch" / "sweep.py").read_text())
    called = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute)}
    read = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not {name for name in called | read if name.startswith("_") and not name.startswith("__")}


def test_the_sweep_prints_each_runs_resolved_config_and_lists_every_key(tmp_path, capsys):
    import yaml

    from dr_resnet import config

    assert main(["--config", SWEEP, "--out", str(tmp_path / "s"), "--runs", "resnet18_scratch,resnet50_scratch",
                 "--seeds", "3", "--print-config", "train.epochs=8"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["output"]["dir"] for d in documents] == [str(tmp_path / "s" / arm / "seed3")
                                                       for arm in ("resnet18_scratch", "resnet50_scratch")]
    assert [d["model"]["depth"] for d in documents] == [18, 50]
    assert all(d["train"]["epochs"] == 8 and d["train"]["seed"] == 3 for d in documents)
    assert not (tmp_path / "s").exists()  # nothing submitted, no folder made
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(f"  {k.key} = " in text for k in config.key_help())


def test_the_slurm_tests_leave_the_machine_alone_unless_asked(tmp_path):
    """Without DR_RESNET_SLURM_TESTS=1 the tests that would install SLURM and write /etc skip, saying how
    to run them; nothing under /etc/slurm is written."""
    env = {k: v for k, v in os.environ.items() if k != "DR_RESNET_SLURM_TESTS"}
    before = sorted(Path("/etc/slurm").iterdir()) if Path("/etc/slurm").is_dir() else None
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_slurm.py"), "-k", "array_sweep_runs_two_arms"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout[-2000:]
    assert "set DR_RESNET_SLURM_TESTS=1 to run them" in done.stdout
    assert (sorted(Path("/etc/slurm").iterdir()) if Path("/etc/slurm").is_dir() else None) == before


def test_a_grid_gives_every_arm_the_same_trials_with_stable_names(tmp_path, capsys):
    """--grid (and the sweep file's grid:) expand to a trial per combination for every arm, each in
    SWEEP_DIR/<arm>/<trial>[/seed<k>]/ with a name made of its values, the same on every machine."""
    import yaml

    from launch.trials import expand, parse_grid, trial_name

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "grid", "config": str(REPO / "configs" / "demo.yaml"),
                                          "arms": {"r18": ["model.depth=18", "model.weights=none"],
                                                   "r50": ["model.depth=50", "model.weights=none"]},
                                          "grid": {"data.image_size": [64, 96]}}))
    assert main(["--config", str(sweep_file), "--out", str(tmp_path / "out"), "--grid", "train.lr=0.01,0.05",
                 "--seeds", "0,1", "--print-config"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert len(docs) == 2 * 2 * 2 * 2  # arms x image sizes x rates x seeds
    folders = sorted(d["output"]["dir"].split("/out/")[1] for d in docs)
    assert folders[:4] == ["r18/image_size64-lr0.01/seed0", "r18/image_size64-lr0.01/seed1",
                           "r18/image_size64-lr0.05/seed0", "r18/image_size64-lr0.05/seed1"]
    per_arm = {arm: sorted({f.split("/")[1] for f in folders if f.startswith(arm + "/")}) for arm in ("r18", "r50")}
    assert per_arm["r18"] == per_arm["r50"] and len(per_arm["r18"]) == 4
    for d in docs:  # each run holds its trial's values
        trial = d["output"]["dir"].split("/")[-2]
        assert trial == trial_name({"data.image_size": str(d["data"]["image_size"]), "train.lr": str(d["train"]["lr"])})
        assert d["wandb"]["name"].endswith(f"_{trial}_seed{d['train']['seed']}")
    # Stable: the same values give the same names, in the given order; long ones are shortened by a hash.
    assert [trial_name(t) for t in expand(parse_grid(["train.lr=0.1,1e-3", "model.head=ce"]))] == [
        "lr0.1-headce", "lr1e-3-headce"]
    long = trial_name({f"train.key{i}": "x" * 10 for i in range(8)})
    assert len(long) == 60 and long == trial_name({f"train.key{i}": "x" * 10 for i in range(8)})
    with pytest.raises(Exception, match="set by an override and searched by the grid"):
        from launch.sweep import launch, parse_args
        launch(parse_args(["--config", str(sweep_file), "--grid", "train.lr=0.1,0.2", "train.lr=0.3",
                           "--print-config"]), None)


def test_a_sweep_run_again_skips_the_runs_that_finished(tmp_path, capsys):
    """After an interruption the same command goes on: runs that finished are not trained again."""
    from helpers import preprocessed_dataset

    data = preprocessed_dataset(tmp_path / "d", 24, 9, seed=2, size=32)
    args = ["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor", "local", "--runs", "resnet18_scratch",
            "--out", str(tmp_path / "sweep"), "--grid", "train.lr=0.01,0.02", "--time", "20", f"data.root={data}",
            "data.image_size=32", "train.epochs=1", "train.batch_size=8", "data.workers=0", "train.warmup_epochs=0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "resnet18_scratch_lr0.01: done" in first and "resnet18_scratch_lr0.02: done" in first
    runs = tmp_path / "sweep" / "resnet18_scratch"
    stamps = {p: (p / "checkpoint_last.pt").stat().st_mtime_ns for p in runs.iterdir()}
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier") == 2
    assert {p: (p / "checkpoint_last.pt").stat().st_mtime_ns for p in runs.iterdir()} == stamps


def test_print_arms_refuses_a_sweep_with_trials_that_one_line_an_arm_would_drop(capsys):
    """slurm/sweep.sh submits one job an arm from --print-arms' lines: a grid or search there would be silently
    dropped, so --print-arms refuses such a sweep with one line naming the launcher that runs its trials."""
    from launch.sweep import main

    assert main(["--config", str(REPO / "configs" / "demo_tune.yaml"), "--print-arms"]) == 2
    assert "has a grid or search" in capsys.readouterr().err
    assert main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--print-arms", "--grid", "train.lr=0.1,0.2"]) == 2
    capsys.readouterr()
    assert main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--print-arms"]) == 0
    assert capsys.readouterr().out.count("\n") == 4


def test_overrides_may_come_between_and_after_the_options():
    """`section.key=value` anywhere on the line goes to every run, as with dr_resnet.train: after --runs too."""
    from launch.sweep import parse_args

    args = parse_args(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--executor", "local", "data.root=d",
                       "--runs", "resnet18_scratch", "data.workers=1", "--dry-run"])
    assert args.overrides == ["data.root=d", "data.workers=1"] and args.runs == "resnet18_scratch" and args.dry_run
