"""Submit the sweep file's arms (depth x initialisation: the four runs, ResNet18/50 x pretrained/scratch, by
default), or a subset, with submitit: one job per run, each task running the same training entry as torchrun.
SLURM by default, or this machine's processes.

    python -m launch.sweep --config configs/sweep.yaml --nodes 2 --gpus-per-node 4 --partition gpu --time 720
    python -m launch.sweep --config configs/demo_sweep.yaml --executor local --tasks-per-node 2
    python -m launch.sweep ... --dry-run          # print each job's sbatch script, submit nothing

Each run's directory is SWEEP_DIR/<arm>/ (with --grid KEY=V1,V2: SWEEP_DIR/<arm>/<trial>/; with --seeds 0,1,2:
.../seed<k>/ under it, one W&B run each in the sweep's group, tagged with its seed); a search's trials are
t<i>-<values, rounded> (launch/trials.py); a finished run is not run again; submitit's logs are
SWEEP_DIR/submitit/<job>_<task>_log.out; the manifest (runs, job ids, arguments, a search's drawn values, the
searched keys and the factors) is SWEEP_DIR/sweep.json (--tune's phase 1: SWEEP_DIR/tune/sweep.json). A pretrained
arm whose ImageNet weights cannot be had is not trained from scratch instead: it is reported as not run, with the
missing file named.

An arm with model.weights=ssl (or imagenet+ssl) fine-tunes from a backbone the sweep pretrains first
(python -m dr_resnet.pretrain), once per pretraining config and pool: every seed, trial and data.train_fraction
of the arm shares it (its train.seed is the recipe's, not a --seeds value: the seeds vary the fine-tuning). It is
cached in --backbones (default: the sweep folder's parent's backbones/), named by a hash of the settings that
decide it, and reused by any later or concurrent sweep; on SLURM the fine-tuning jobs wait for its job
(--dependency=afterok), locally it runs first. A backbone that cannot be made leaves its arms not run
(launch/backbones.py).

A searched key (a learning rate: every search: key, and a grid key named in searched: or by --searched) is tuned:
chosen on held-out figures, then the choice run on fresh seeds (--tune). Any other grid key is a factor (a data
fraction, the schedule's length, an ablation): the experiment itself, every value reported, none chosen. In W&B,
--tune's phase-1 trials are tagged tune, phase 2's runs final, an earlier winner's runs set aside superseded; the
winners are artifacts of the sweep's one tuning run. --keep-checkpoints winners deletes the losing runs'
checkpoints once the winners are chosen (launch/pruning.py).

Resources: each task gets data.workers + 1 CPUs (the decoders and the training process) and each node
tasks x (6.4 + data.workers) GB, rounded up (6 for the training process, 1 a decoder, 0.4 for the fork server
that starts the decoders), unless --cpus-per-task / --mem say otherwise; every srun passes
--kill-on-bad-exit=1, so one crashed rank ends the job instead of leaving the others waiting in NCCL.
The local executor with --gpus-per-node gives each arm GPUs of its own and runs the arms that do not
fit once earlier ones have finished.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml

from dr_resnet import config, processes
from dr_resnet.config import ConfigError
from dr_resnet.errors import run_command
from dr_resnet.files import write_text
from dr_resnet.results import tuning
from dr_resnet.results.rundir import CONFIG_FILE, LAST_CHECKPOINT, STATUS_FILE, is_finished, last_launch_error

from . import backbones, interrupt, pruning, requeue, trials
from .task import TrainTask
from .watch import LiveView, watch

# W&B tags that tell --tune's runs apart: phase 1's trials, phase 2's runs, and an earlier winner's runs set aside
TUNE_TAG, FINAL_TAG, SUPERSEDED_TAG = "tune", "final", "superseded"
TUNING_ID_FILE = ".wandb_tuning_id"  # SWEEP_DIR/.wandb_tuning_id: the sweep's one W&B run of job type tune

@dataclass
class Sweep:
    """A sweep file: the recipe every arm starts from, each arm's own overrides, overrides for all."""

    name: str
    base_config: Path
    arms: dict[str, list[str]]
    overrides: list[str] = field(default_factory=list)
    out: str = ""
    grid: dict[str, list[str]] = field(default_factory=dict)  # section.key -> values: a trial per combination
    grid_per_arm: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # an arm's own grid keys
    search: trials.Search | None = None  # trials drawn per arm (trials.Search)
    searched: list[str] = field(default_factory=list)  # grid keys that are tuned, not factors (trials.roles)

    @staticmethod
    def load(path: str | Path) -> "Sweep":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep file not found: {path}")
        content = yaml.safe_load(path.read_text()) or {}
        known = ("name", "config", "arms", "overrides", "out", "grid", "search", "searched")
        unknown = set(content) - set(known)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} (known: {', '.join(known)})")
        if not isinstance(content.get("arms"), dict) or not content["arms"]:
            raise ConfigError(f"{path}: 'arms' must map arm names to lists of section.key=value overrides")
        arms = list(content["arms"])
        grid, grid_per_arm = trials.split_per_arm(content.get("grid"), f"{path}: grid", arms)
        grid, grid_per_arm = (trials.grid_of(grid, f"{path}: grid"),
                              {arm: trials.grid_of(g, f"{path}: grid: arms: {arm}") for arm, g in grid_per_arm.items()})
        trials.equal_keys({arm: set(grid) | set(grid_per_arm.get(arm, {})) for arm in arms}, f"{path}: grid", "varies")
        searched = content.get("searched") or []
        if not isinstance(searched, list) or not all(isinstance(k, str) and "." in k for k in searched):
            raise ConfigError(f"{path}: 'searched' lists grid keys as section.key names, e.g. searched: [train.lr]")
        return Sweep(str(content.get("name") or path.stem), (path.parent / content.get("config", "base.yaml")).resolve(),
                     {arm: [str(o) for o in (ovs or [])] for arm, ovs in content["arms"].items()},
                     [str(o) for o in content.get("overrides") or []], str(content.get("out") or ""),
                     grid, grid_per_arm, trials.Search.of(content.get("search"), f"{path}: search", arms), searched)


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    prog = "dr-sweep" if Path(sys.argv[0]).name == "dr-sweep" else "python -m launch.sweep"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1] + "\n\n" + config.help_text())
    p.add_argument("--config", default="configs/sweep.yaml", help="sweep file (arms and their recipe)")
    p.add_argument("--runs", help="comma-separated subset of the arms (default: all)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a trial per combination of these values, for every arm (repeat for more keys; with the sweep "
                        "file's grid:), each in SWEEP_DIR/<arm>/<trial>/, e.g. --grid train.lr=0.01,0.05; a factor "
                        "(every value reported, none chosen) unless named by --searched")
    p.add_argument("--searched", action="append", default=[], metavar="KEY",
                   help="a grid key that is tuned (chosen on held-out figures, as --tune does), not a factor of the "
                        "experiment (repeat for more keys; with the sweep file's searched:); search: keys always are")
    p.add_argument("--seeds", help="comma-separated train.seed values: every arm once per seed, in "
                                   "SWEEP_DIR/<arm>/seed<k>/ (default: one run per arm, in SWEEP_DIR/<arm>/)")
    p.add_argument("--tune", type=int, metavar="N",
                   help="two phases: N trials an arm drawn from the sweep file's search: or the points of a grid over "
                        "searched keys (on --tune-seed, in "
                        "SWEEP_DIR/tune/<arm>/<trial>/), each arm's winner chosen on its held-out figures only "
                        "(SWEEP_DIR/tuning.json), then the winners on every --seeds (SWEEP_DIR/<arm>/<trial>/seed<k>/) "
                        "and the report; waits for phase 1 (run again after an interruption: nothing runs twice)")
    p.add_argument("--tune-seed", type=int, default=0,
                   help="--tune: phase 1's train.seed (default 0). Give --seeds without it (e.g. 1,2,3): a winner "
                        "rerun on the seed it won on would carry its lucky draw into the comparison")
    p.add_argument("--keep-checkpoints", choices=pruning.KEEP_CHECKPOINTS, default="all",
                   help="--tune: winners deletes the checkpoints of the finished runs that lost once each arm's "
                        "winner is chosen (phase 1's other trials, an earlier winner's runs), keeping their "
                        "summaries, logs and predictions (default: all, nothing deleted)")
    p.add_argument("--parallel", type=int,
                   help="local executor without GPUs: at most this many runs at once (default: all of them)")
    p.add_argument("--out", help="sweep folder (default: the sweep file's 'out', else runs/<name>)")
    p.add_argument("--backbones", metavar="DIR",
                   help="where the backbones of ssl and imagenet+ssl arms are pretrained and cached, one folder each "
                        "named by its settings' hash, shared by every sweep that names the same DIR (default: the "
                        "sweep folder's parent / backbones, so runs/demo -> runs/backbones); needs a file system "
                        "with working flock")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                   help="slurm: a SLURM job per run (submitit) | local: processes on this machine")
    p.add_argument("--nodes", type=int, default=1, help="nodes per run")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node a run takes (0: none, CPU processes)")
    p.add_argument("--tasks-per-node", type=int, help="processes per node (default: the GPUs per node, else 1)")
    p.add_argument("--cpus-per-task", type=int, help="default: data.workers + 1 (the decoders and the training process)")
    p.add_argument("--partition", help="sbatch's --partition")
    p.add_argument("--account", help="sbatch's --account")
    p.add_argument("--qos", help="sbatch's --qos")
    p.add_argument("--time", default="60", help="time limit: minutes, or SLURM's formats (12:00:00, 1-00:00:00, 2-12)")
    p.add_argument("--mem", help="memory per node: SLURM's format (64G, 64000M, 1T) or a number of GB "
                                 "(default: tasks per node x (6.4 + data.workers) GB, rounded up; each task's "
                                 "fork server, which starts its decoders, holds 0.4 GB of its own)")
    p.add_argument("--gres", help="generic resources, as sbatch takes them (gpu:4, gpu:a100:4): in place of "
                                  "--gpus-per-node on clusters that count GPUs so; its GPU count sets the tasks per node")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line the job runs before training (repeat: in order), e.g. 'module load cuda/12.4'")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option (repeat), e.g. --slurm mail-type=END --slurm reservation=ml")
    p.add_argument("--array", action="store_true",
                   help="submit every run (arms x seeds) as one SLURM job array; each keeps its own folder")
    p.add_argument("--array-parallelism", type=int, help="with --array (implied): at most this many runs at once")
    p.add_argument("--visible-gpus", help="local executor: the GPUs the arms may use, e.g. 0,1,2,3 "
                                          "(default: CUDA_VISIBLE_DEVICES, else every GPU torch sees)")
    p.add_argument("--constraint", help="sbatch's --constraint")
    p.add_argument("--exclude", help="nodes to avoid")
    p.add_argument("--signal-delay", type=int, default=requeue.SIGNAL_LEAD_S,
                   help="seconds before the time limit to checkpoint and requeue")
    p.add_argument("--wait", action="store_true", help="wait for every job, then write the report; exit 1 if any failed")
    p.add_argument("--dry-run", action="store_true", help="print each job's sbatch script; submit nothing")
    p.add_argument("--print-arms", action="store_true",
                   help="print each arm as a tab-separated line: name, recipe file, overrides (slurm/sweep.sh reads it)")
    p.add_argument("--print-config", action="store_true",
                   help="print each run's resolved config (YAML documents, one per run) and exit; submit nothing")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_intermixed_args(argv)  # overrides may come before, between or after the options
    try:
        args.time = slurm_minutes(args.time)
        args.mem = slurm_memory(args.mem) if args.mem else None
        args.slurm = dict(slurm_option(o) for o in args.slurm)
        gres_gpus = gpus_in_gres(args.gres) if args.gres else 0
    except ValueError as exc:
        p.error(str(exc))
    if args.gres and args.gpus_per_node:
        p.error("--gres and --gpus-per-node both ask for GPUs: give one")
    if args.array_parallelism is not None:
        if args.array_parallelism < 1:
            p.error("--array-parallelism must be >= 1")
        args.array = True
    args.tasks_per_node = args.tasks_per_node or max(1, args.gpus_per_node or gres_gpus)
    try:
        args.seeds = [int(k) for k in args.seeds.split(",") if k.strip()] if args.seeds else []
    except ValueError:
        p.error(f"--seeds takes integers separated by commas, got {args.seeds!r}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: a seed appears twice ({args.seeds})")
    if args.executor == "local" and args.nodes != 1:
        p.error("--executor local runs on this machine: --nodes must be 1")
    if args.tune is not None and args.tune < 1:
        p.error("--tune N: N trials an arm, N >= 1")
    if args.keep_checkpoints != "all" and args.tune is None:
        p.error(f"--keep-checkpoints {args.keep_checkpoints} prunes once --tune has chosen the winners: give --tune N")
    if args.parallel is not None and (args.parallel < 1 or args.executor != "local" or args.gpus_per_node):
        p.error("--parallel N (N >= 1) limits the local executor's runs on CPU (with GPUs each run waits for a free group)")
    if args.executor == "local" and args.array and args.gpus_per_node:
        p.error("--array with the local executor's GPU groups: leave --array out (each run waits for a free group)")
    return args


def slurm_minutes(text: str | int) -> int:
    """A time limit in minutes from SLURM's formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (partial minutes up)."""
    value = str(text).strip()
    days, dash, rest = value.partition("-")
    if not dash:
        days, rest = "0", value
    try:
        parts = [int(x) for x in rest.split(":")]
        day_count = int(days)
    except ValueError:
        raise ValueError(f"--time {text!r} is not minutes or SLURM's D-HH:MM:SS") from None
    if dash:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts[:3]
    if len(parts) > 3 or min(day_count, hours, minutes, seconds) < 0:
        raise ValueError(f"--time {text!r} is not minutes or SLURM's D-HH:MM:SS")
    total = day_count * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ValueError(f"--time {text!r}: the time limit must be positive")
    return total


def slurm_memory(text: str) -> str:
    """--mem as sbatch takes it: a number with K, M, G or T (64G), or a bare number of GB (64 -> 64G)."""
    value = str(text).strip().upper().removesuffix("B")
    number, unit = (value[:-1], value[-1]) if value[-1:] in "KMGT" else (value, "G")
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"--mem {text!r} is not a memory size (64G, 64000M, 1T, or a number of GB)")
    return f"{int(number)}{unit}"


def slurm_option(text: str) -> tuple[str, str]:
    """--slurm KEY=VALUE (KEY as sbatch spells it, without the dashes) -> (key, value); KEY alone: a flag."""
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-")
    if not key or " " in key:
        raise ValueError(f"--slurm {text!r} is not KEY=VALUE (an sbatch option without its dashes, e.g. mail-type=END)")
    return key, value.strip() if sep else True


def gpus_in_gres(gres: str) -> int:
    """The GPUs a --gres asks for per node (gpu:4, gpu:a100:4 -> 4; gpu -> 1; no gpu entry -> 0)."""
    for entry in gres.split(","):
        fields = entry.strip().split(":")
        if fields[0] == "gpu":
            if len(fields) == 1:
                return 1
            if not fields[-1].isdigit():
                raise ValueError(f"--gres {gres!r}: the GPU count must end the entry (gpu:4, gpu:a100:4)")
            return int(fields[-1])
    return 0


def arm_argv(sweep: Sweep, arm: str, run_dir: Path, cli_overrides: list[str], seed: int | None = None,
             group: str = "", trial: dict[str, str] | None = None, trial_name: str = "") -> list[str]:
    """The training arguments of one run: recipe, arm, sweep-wide and command-line overrides, the trial's
    values, its folder (and a W&B run name that tells its trial and seed apart). The W&B group is the sweep
    folder's name (`group`), as slurm/sweep.sh sets it: one rule for both launchers."""
    trial = trial or {}
    label = "_".join(filter(None, [arm, trial_name, f"seed{seed}" if seed is not None else ""]))
    named = [f"wandb.name={label}"] if seed is not None or trial else []
    named += [f"wandb.trial={','.join(trial)}"] if trial else []
    seeded = [f"train.seed={seed}"] if seed is not None else []
    return ["--config", str(sweep.base_config), *sweep.arms[arm], *sweep.overrides, *cli_overrides,
            *trials.overrides_of(trial), *seeded, *named, f"output.dir={run_dir}", f"wandb.group={group or sweep.name}"]


def run_names(arm_trials: dict[str, dict[str, dict[str, str]]], seeds: list[int], under: str = "", seed_folders: bool = True
              ) -> dict[str, tuple[str, str, int | None, str, dict[str, str]]]:
    """Each run's name -> (arm, folder under the sweep folder, seed, trial name, trial values): one per arm, trial
    (name -> values) and seed ([under/]<arm>[/<trial>][/seed<k>]; no seed folder with seed_folders=False: one seed)."""
    found = {}
    for arm, named in arm_trials.items():
        for trial, values in named.items():
            for seed in seeds or [None]:
                parts = [arm, trial, f"seed{seed}" if seed is not None and seed_folders else ""]
                found["_".join(filter(None, parts))] = (arm, "/".join(filter(None, [under, *parts])), seed, trial, values)
    return found


def missing_weights(cfg: config.Config) -> str:
    """Why the arm's weights cannot be had ('' when they can: none to load, or ImageNet's downloaded if
    possible, or the file (a backbone's, or any) is there)."""
    weights = cfg.model.weights
    if not cfg.model.pretrained:
        return ""
    from dr_resnet.model.resnet import WeightsNotFoundError, imagenet_cache_path, load_imagenet_state_dict

    if weights.lower() == "imagenet":
        try:
            load_imagenet_state_dict(cfg.model.depth)  # into torchvision's cache, where every task reads it
            return ""
        except WeightsNotFoundError as exc:
            return f"ImageNet weights missing: {imagenet_cache_path(cfg.model.depth)}\n{exc}"
    return "" if Path(weights).is_file() else f"weights file not found: {weights}"


@dataclass(frozen=True)
class Resources:
    """What each job asks for: CPUs per task, torch threads per task, memory per node (sbatch's format)."""

    cpus_per_task: int
    threads: int
    mem: str


def resources(args: argparse.Namespace, configs: list[config.Config]) -> Resources:
    """--cpus-per-task / --mem, or defaults that fit the arms' data.workers: a decoder per core plus one
    core for the training process; the training process keeps the cores its decoders do not use."""
    workers = max(cfg.data.workers for cfg in configs)
    cpus = args.cpus_per_task or workers + 1
    return Resources(cpus, max(1, cpus - workers), args.mem or default_memory(args.tasks_per_node, workers))


def default_memory(tasks_per_node: int, workers: int) -> str:
    """A node's memory request: per task 6 GB for the training process, 1 GB a decoder and the fork server's
    own 0.4 GB (processes.FORK_SERVER_GB), rounded up to whole GB (sbatch takes whole numbers)."""
    return f"{math.ceil(tasks_per_node * (6 + workers + processes.FORK_SERVER_GB))}G"


def make_executor(args: argparse.Namespace, folder: Path, res: Resources, scripts: list[str] | None = None):
    """submitit's SLURM executor (or, for a dry run without SLURM installed, one that only renders
    scripts, into `scripts` when given: executors that share it number their jobs as one), or its local
    executor."""
    if args.executor == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(tasks_per_node=args.tasks_per_node, timeout_min=args.time)
        if args.gpus_per_node:
            executor.update_parameters(gpus_per_node=args.gpus_per_node)
        return executor
    executor = DryRunSlurmExecutor(folder, scripts) if args.dry_run else submitit.SlurmExecutor(folder=folder)
    slurm = {"partition": args.partition, "account": args.account, "qos": args.qos, "constraint": args.constraint,
             "exclude": args.exclude, "gpus_per_node": args.gpus_per_node, "gres": args.gres,
             "setup": list(args.setup) or None, "array_parallelism": args.array_parallelism}
    executor.update_parameters(nodes=args.nodes, ntasks_per_node=args.tasks_per_node, cpus_per_task=res.cpus_per_task,
                               time=args.time, mem=res.mem, stderr_to_stdout=True,
                               signal_delay_s=args.signal_delay,
                               # srun no longer inherits sbatch's --cpus-per-task (SLURM 22.05+): name it.
                               srun_args=["--kill-on-bad-exit=1", f"--cpus-per-task={res.cpus_per_task}"],
                               # --slurm KEY=VALUE last: the cluster's own word wins
                               additional_parameters={**requeue.REQUEUE, **args.slurm},
                               **{k: v for k, v in slurm.items() if v})
    return executor


class DryRunSlurmExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor with sbatch left out, for a dry run (also where SLURM is not installed):
    each submission's script, submitit's own as it would go to sbatch, is kept in `scripts` and nothing
    is queued; job ids count the scripts (1, 2, ...: a fine-tuning job's dependency names its pretraining
    job's). It overrides two of the hooks submitit's executors are made of (the executor's affinity
    and the submission command) and calls none of submitit's private methods."""

    def __init__(self, folder: Path, scripts: list[str] | None = None) -> None:
        super().__init__(folder=folder)
        self.scripts: list[str] = [] if scripts is None else scripts

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        self.scripts.append(Path(submission_file_path).read_text())
        return [sys.executable, "-c", f"print('Submitted batch job {len(self.scripts)} (dry run)')"]


def start_now(submission: Callable[[], Any]) -> Any:
    """Make a submission as it is: SLURM's jobs are the scheduler's, not this process's children (the local
    executor's go through interrupt.LocalJobs.start instead)."""
    return submission()


def submit_each(executor, tasks: dict, slots: list[list[int]] = (), array_name: str = "",
                start: Callable[[Callable[[], Any]], Any] = start_now, after: dict[str, str] | None = None):
    """Submit each named task (a picklable callable: a TrainTask, or any other, an evaluation say) as
    one job on `executor`, named after it on SLURM; with array_name, all of them as one job array of
    that name (submitit's batch submission). With GPU slots (the local executor), each job gets a group
    of its own and waits until one is free. `start` makes each submission (start_now, or a launcher's
    LocalJobs.start). `after`: name -> the SLURM job it waits for (its backbone's pretraining): that
    job's sbatch options gain --dependency=afterok:<id> (an array waits for all of them), the others' are
    the executor's own (requeue.REQUEUE, --slurm's). Yields (name, job, gpus or None) as each job goes in."""
    after = after or {}
    slurm = isinstance(executor, submitit.SlurmExecutor)
    sbatch_options = dict(executor.parameters.get("additional_parameters") or {}) if slurm else {}
    if array_name:
        if slurm:
            executor.update_parameters(job_name=array_name, additional_parameters=backbones.dependency(
                sbatch_options, [after[name] for name in tasks if name in after]))

        def submit_array() -> list:
            with executor.batch():
                submitted = [executor.submit(task) for task in tasks.values()]
            return submitted
        jobs = start(submit_array)
        for name, job in zip(tasks, jobs):
            yield name, job, None
        return
    scheduler = GpuSlots(list(slots)) if slots else None
    for name, task in tasks.items():
        gpus = None
        if scheduler is not None:
            gpus = scheduler.acquire()
            if gpus is not None:  # a GPU group; None: a CPU slot (--parallel)
                executor.update_parameters(visible_gpus=gpus)
        if slurm:  # SLURM: the job's name in squeue, and what it waits for
            executor.update_parameters(job_name=name, additional_parameters=backbones.dependency(
                sbatch_options, [after[name]] if name in after else []))
        job = start(functools.partial(executor.submit, task))
        if scheduler is not None:
            scheduler.hold(job, gpus)
        yield name, job, gpus


def dry_run(args: argparse.Namespace, res: Resources, plans: dict, out: Path, made: dict | None = None) -> None:
    """Print each backbone's pretraining job (or that it is reused), then each arm's training arguments and
    the sbatch script submitit writes for it, with its wait on its backbone's job; submit nothing and write
    nothing under the sweep folder or the backbones' (submitit's files go to a temporary folder)."""
    made = made or {}
    if args.executor != "slurm":
        for backbone in made.values():
            print(f"# ---- pretraining {backbone.name} for {backbone.label}: {backbones.describe(backbone)}\n"
                  + ("(pretrained earlier: reused)\n" if backbone.finished() else
                     "(local executor: runs first, its arms once it has finished)\n"))
        for arm, (_, argv_arm, _) in plans.items():
            print(f"# ---- {arm}: dr_resnet.train {shlex.join(argv_arm)}\n(local executor: no sbatch script)\n")
        return
    with tempfile.TemporaryDirectory() as tmp:
        scripts: list[str] = []  # one numbering for the pretraining and fine-tuning jobs
        after = {}
        for backbone in made.values():
            if backbone.finished():
                print(f"# ---- pretraining {backbone.name} for {backbone.label}: {backbone.folder} (pretrained "
                      f"earlier): reused, no job\n")
                continue
            folder = Path(tmp) / "backbones" / backbone.name
            executor = make_executor(args, folder, res, scripts)
            executor.update_parameters(job_name=backbone.name)
            job = executor.submit(backbones.task(backbone, res.threads))
            after.update({run: job.job_id for run in backbone.runs})
            text = scripts[-1].replace(str(folder), str(backbone.folder / "submitit"))
            print(f"# ---- pretraining {backbone.name} for {backbone.label} (job {job.job_id}): "
                  f"{backbones.describe(backbone)}\n{text}\n")
        executor = make_executor(args, Path(tmp), res, scripts)
        tasks = {arm: TrainTask(argv_arm, threads=res.threads) for arm, (_, argv_arm, _) in plans.items()}
        if args.array:  # the one script an array submission writes: submitit's batch() sets map_count so
            executor.update_parameters(job_name=out.name, additional_parameters=backbones.dependency(
                executor.parameters.get("additional_parameters") or {}, list(after.values())))
            executor.parameters["map_count"] = len(tasks)  # (its --array=0-N%P line and %A_%a log names)
            for index, (arm, (_, argv_arm, _)) in enumerate(plans.items()):
                print(f"# ---- array task {index}: {arm}: dr_resnet.train {shlex.join(argv_arm)}")
            first = next(iter(tasks))
            executor.submit(tasks[first])
            print(executor.scripts[-1].replace(tmp, str(out / "submitit")).replace("%j", "%A_%a"))
            return
        for arm, _, _ in submit_each(executor, tasks, after=after):
            text = executor.scripts[-1].replace(tmp, str(out / "submitit"))  # where a real submission keeps its logs
            print(f"# ---- {arm}: dr_resnet.train {shlex.join(plans[arm][1])}\n{text}\n")


def gpu_slots(visible: list[int], per_arm: int) -> list[list[int]]:
    """Disjoint groups of `per_arm` GPUs from `visible`: one arm runs on each group at a time."""
    if per_arm > len(visible):
        raise ConfigError(f"--gpus-per-node {per_arm}: only {len(visible)} GPU(s) visible here ({visible}); "
                          f"pass --visible-gpus or ask for fewer")
    return [visible[i * per_arm:(i + 1) * per_arm] for i in range(len(visible) // per_arm)]


def visible_gpus(spec: str | None) -> list[int]:
    """--visible-gpus, else CUDA_VISIBLE_DEVICES (integer ids), else every GPU torch sees."""
    text = spec if spec is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if text is not None:
        try:
            return [int(g) for g in text.split(",") if g.strip()]
        except ValueError:
            raise ConfigError(f"GPU ids must be integers, got {text!r} (--visible-gpus 0,1,...)") from None
    import torch

    return list(range(torch.cuda.device_count()))


def set_status(run_dir: Path, cfg: config.Config, status: str = "", reason: str = "") -> None:
    """Save the arm's resolved config (so the report lists it whatever happens) and the launcher's
    status for it ('not run', 'failed': its own error, or 'lost': its job ended from outside; with the
    reason), or clear that status."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(cfg, run_dir / CONFIG_FILE)
    path = run_dir / STATUS_FILE
    if status:
        write_text(path, json.dumps({"status": status, "reason": reason.splitlines()[0], "detail": reason}, indent=2) + "\n")
    else:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.executor == "local":  # its jobs are this process's children: a stop signal stops them too
        return interrupt.stoppable(lambda jobs: run_command(lambda: launch(args, argv, jobs.start)))
    return run_command(lambda: launch(args, argv))


def launch(args: argparse.Namespace, argv: list[str] | None, start: Callable = start_now) -> int:
    """Resolve (and so validate) every run's config before anything is submitted, then print, submit or run
    the jobs; with --wait (always for local jobs) the live view and the report. --tune: the two phases.
    `start` makes each submission (submit_each)."""
    sweep = Sweep.load(args.config)
    arms = args.runs.split(",") if args.runs else list(sweep.arms)
    unknown = [a for a in arms if a not in sweep.arms]
    if unknown:
        raise ConfigError(f"--runs: unknown arm(s) {unknown} (in {args.config}: {', '.join(sweep.arms)})")
    out = Path(args.out or sweep.out or f"runs/{sweep.name}").resolve()
    grid = {**sweep.grid, **trials.parse_grid(args.grid)}
    gridded = set(grid).union(*sweep.grid_per_arm.values())
    varied = gridded.union(sweep.search.keys if sweep.search else ())
    clash = sorted({o.split("=", 1)[0] for o in args.overrides} & varied)
    if clash:
        raise ConfigError(f"{', '.join(clash)}: set by an override and searched by the grid or search; give it in one place")
    searched, factors = trials.roles(gridded, sweep.search.keys if sweep.search else [],
                                     {f"{args.config}: searched": sweep.searched, "--searched": args.searched})
    if args.tune and not args.seeds:
        raise ConfigError(f"--tune {args.tune} needs --seeds (e.g. --seeds 1,2,3): phase 2 runs each winner on fresh "
                          f"seeds, never only on the seed that chose it (--tune-seed {args.tune_seed})")
    if args.tune and factors:
        # phase 1 picks one trial an arm: over a factor's values, that would choose what the experiment reports
        raise ConfigError(f"--tune with the grid factor(s) {', '.join(factors)}: phase 1 would choose among a factor's "
                          f"values; name each in searched: (or --searched KEY) to tune it, or run one sweep per value")
    if args.tune and not sweep.search and not searched:
        raise ConfigError(f"--tune {args.tune} tunes the sweep file's search: block or the grid keys named searched "
                          f"(searched: in the sweep file, or --searched KEY), and {args.config} has neither (see "
                          f"configs/demo_tune.yaml)")
    count = (args.tune or sweep.search.trials) if sweep.search else 0
    if sweep.search and not count:
        raise ConfigError(f"{args.config}: search: give trials: N (trials an arm), or --tune N")
    roles = {"searched": searched, "factors": factors}
    by_arm = trials.arm_trials(arms, grid, sweep.grid_per_arm, sweep.search, count)
    points = len(next(iter(by_arm.values())))
    if args.tune and not sweep.search and args.tune != points:  # the searched grid's points are the trials
        raise ConfigError(f"--tune {args.tune}: the grid over the searched key(s) {', '.join(searched)} gives {points} "
                          f"trials an arm: give --tune {points}")
    record = drawn_record(sweep.search, arms, count, out / tuning.TUNE_DIR if args.tune else out)
    if args.tune:
        return tune(args, argv, sweep, out, by_arm, record, gridded, roles, start)
    if trials.untuned_warning(searched):
        print(trials.untuned_warning(searched), file=sys.stderr)
    names = run_names(by_arm, args.seeds)
    plans = plan(sweep, args, out, names, gridded)
    made = pretrainings(sweep, args, out, names, plans)
    shown = show(args, sweep, arms, out, plans, made)
    if shown is not None:
        return shown
    jobs = submit(args, argv, plans, out, extra={**roles, **({"search": record} if record else {})}, start=start,
                  made=made)
    if not (args.wait or args.executor == "local"):  # local jobs are this process's children: always wait
        print(f"report when done: python -m dr_resnet.report {out}")
        return 1 if unmade(made) else 0
    code = wait_and_report(jobs, plans, out)
    return 1 if unmade(made) else code


def unmade(made: dict) -> list[str]:
    """The backbones whose pretraining failed (their arms were not run): a sweep with one exits 1, as with a failed
    run. One not run for want of ImageNet's weights is not a failure, as a pretrained arm not run for them is not."""
    return [name for name, b in made.items() if b.status == "failed"]


def drawn_record(search: trials.Search | None, arms: list[str], count: int, folder: Path) -> dict | None:
    """The search's drawn values as the manifest in `folder` will record them, checked against those an earlier
    launch recorded there (a changed seed or key would give its trials other values); repeats are warned of."""
    if not search or not count:
        return None
    record = trials.search_record(search, arms, count)
    manifest = folder / "sweep.json"
    recorded = json.loads(manifest.read_text()).get("search") if manifest.is_file() else None
    if recorded:
        trials.check_recorded(recorded, record, str(manifest))
    for line in trials.repeat_warnings(record):
        print(line, file=sys.stderr)
    return trials.merged_record(recorded, record)


def plan(sweep: Sweep, args: argparse.Namespace, out: Path, names: dict, gridded: set[str] = frozenset(),
         tag: str = "") -> dict:
    """name -> (run folder, training arguments, resolved config): every config resolved (and so validated)
    before anything is submitted; `gridded`: the keys a grid varies (train.length's values are checked);
    `tag`: a W&B tag every run gets besides those its recipe and overrides give (wandb.tags)."""
    plans = {}
    for name, (arm, folder, seed, trial, values) in names.items():
        run_dir = out / folder
        argv_arm = arm_argv(sweep, arm, run_dir, args.overrides, seed, group=out.name, trial=values, trial_name=trial)
        cfg = config.load(argv_arm[1], argv_arm[2:])
        if tag:  # extends the tags of every layer (recipe file, arm, sweep, command line): replaces none of them
            argv_arm.append(f"wandb.tags={with_tag(cfg.wandb.tags, tag)}")
            cfg = config.load(argv_arm[1], argv_arm[2:])
        plans[name] = (run_dir, argv_arm, cfg)
    if "train.length" in gridded:
        same_schedules(names, plans)
    return plans


def pretrainings(sweep: Sweep, args: argparse.Namespace, out: Path, names: dict, plans: dict
                 ) -> dict[str, backbones.Backbone]:
    """The backbones the runs of `plans` with model.weights=ssl or imagenet+ssl fine-tune from (backbones.plan:
    their arguments and configs rewritten in `plans` to load them), each pretrained from the run's recipe (its
    train.seed the recipe's, not a --seeds value); in --backbones (default: beside the sweep folder). A dry run
    or --print-config writes nothing."""
    # the recipe, the arm, the overrides and the trial's values that decide a backbone (a pretrain.* key, say; not
    # data.train_fraction or train.lr, which every trial's backbone shares): no --seeds value, folder or W&B name
    recipes = {name: ["--config", str(sweep.base_config), *sweep.arms[arm], *sweep.overrides, *args.overrides,
                      *trials.overrides_of({k: v for k, v in values.items() if config.listed(k, config.PRETRAINING_KEYS)}),
                      f"wandb.group={out.name}"]
               for name, (arm, _, _, _, values) in names.items() if backbones.is_keyword(plans[name][2].model.weights)}
    if not recipes:
        return {}
    cache = Path(args.backbones).resolve() if args.backbones else backbones.default_cache(out)
    write = not (args.dry_run or args.print_config or args.print_arms)
    return backbones.plan(plans, recipes, {name: names[name][0] for name in recipes}, cache, write)


def with_tag(tags: str, tag: str) -> str:
    """wandb.tags (comma-separated) with `tag` added once."""
    return ",".join(dict.fromkeys([*(t.strip() for t in tags.split(",") if t.strip()), tag]))


def same_schedules(names: dict, plans: dict) -> None:
    """Refuse a grid over train.length whose values give one schedule (the same epochs once rounded)."""
    seen: dict[tuple, tuple[str, int]] = {}
    for name, (arm, _, seed, _, values) in names.items():
        length, epochs = values.get("train.length"), plans[name][2].train.epochs
        others = tuple(sorted((k, v) for k, v in values.items() if k != "train.length"))
        earlier = seen.setdefault((arm, seed, others, epochs), (length, epochs))
        if earlier[0] != length:
            raise ConfigError(f"grid train.length: {earlier[0]} and {length} both give {epochs} epochs (train.epochs x "
                              f"length, rounded): one schedule twice; give lengths that differ by at least an epoch")


def show(args: argparse.Namespace, sweep: Sweep, arms: list[str], out: Path, plans: dict, made: dict | None = None
         ) -> int | None:
    """--print-config, --print-arms and --dry-run (0: shown, nothing submitted); else the resources line
    (SLURM) and None. `made`: the backbones the runs fine-tune from (their pretraining configs and jobs shown first)."""
    made = made or {}
    if args.print_config:
        print("\n".join([*(f"--- # pretraining {name} for {b.label}\n" + config.to_yaml(b.cfg).rstrip()
                            for name, b in made.items()),
                          *(f"--- # {name}\n" + config.to_yaml(cfg).rstrip() for name, (_, _, cfg) in plans.items())]))
        return 0
    if args.print_arms:
        if sweep.grid or any(sweep.grid_per_arm.values()) or sweep.search or args.grid or args.tune:
            # one line an arm cannot carry a trial's settings: slurm/sweep.sh, which reads these lines, would
            # submit each arm once at its recipe's values and silently drop the grid or search
            raise ConfigError(f"--print-arms lists one line an arm, and {args.config} has a grid or search (or --grid, "
                              f"--tune was given): run it with python -m launch.sweep --executor slurm, which submits "
                              f"its trials (slurm/sweep.sh runs plain arms only)")
        for arm in arms:
            print("\t".join([arm, str(sweep.base_config), *sweep.arms[arm], *sweep.overrides]))
        return 0
    res = resources(args, [cfg for _, _, cfg in plans.values()])
    if args.executor == "slurm":
        print(f"each job: {args.nodes} node(s) x {args.tasks_per_node} task(s), {res.cpus_per_task} CPU(s) a task, "
              f"{res.mem} a node" + (f", {args.gpus_per_node} GPU(s) a node" if args.gpus_per_node else "")
              + (f", --gres {args.gres}" if args.gres else "")
              + (f"; one job array of {len(plans)} runs" if args.array else ""))
    if args.dry_run:
        dry_run(args, res, plans, out, made)
        return 0
    return None


def submit(args: argparse.Namespace, argv: list[str] | None, plans: dict, out: Path, manifest_file: str = "sweep.json",
           extra: dict | None = None, start: Callable = start_now, made: dict | None = None) -> dict:
    """Submit (or, locally, start) every run of `plans` not finished earlier; the manifest (runs, job ids,
    arguments, and `extra`: a search's drawn values) in out/manifest_file; `start` makes each submission
    (submit_each). `made`: the backbones the runs fine-tune from (pretrainings), made available first for the
    runs still to run (backbones.prepare): reused, pretrained here, or a SLURM job their jobs wait for; a run
    whose backbone cannot be made is not run. Returns name -> job."""
    res = resources(args, [cfg for _, _, cfg in plans.values()])
    slots = gpu_slots(visible_gpus(args.visible_gpus), args.gpus_per_node) \
        if args.executor == "local" and args.gpus_per_node else [None] * args.parallel if args.parallel else []
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"name": out.name, "sweep_file": str(Path(args.config).resolve()), "executor": args.executor,
                "command": [sys.executable, "-m", "launch.sweep", *(argv if argv is not None else sys.argv[1:])],
                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "resources": res.__dict__, **(extra or {}), "runs": {}}

    def write_manifest() -> None:
        write_text(out / manifest_file, json.dumps(manifest, indent=2) + "\n")  # whole, even if stopped mid-way

    tasks, reasons, jobs = {}, {}, {}
    alive = jobs_still_queued(out / manifest_file, out / "submitit") if args.executor == "slurm" else {}
    made = made or {}
    to_run = {arm for arm, (run_dir, _, cfg) in plans.items() if not is_finished(run_dir, cfg.train.epochs)
              and arm not in alive}
    needed = {name: b for name, b in made.items() if to_run & set(b.runs)}
    for name, backbone in made.items():
        if name not in needed:
            backbone.status = "not needed"  # its runs finished earlier or are still queued
    backbones.prepare(needed, backbones.submitter(functools.partial(backbone_executor, args, res, slots), res.threads,
                                                  start), args.executor == "slurm", queued_job_ids, missing_weights)
    manifest["backbones"] = {name: b.manifest_entry() for name, b in made.items()}
    write_manifest()
    backbone_of, after = backbones.by_run(made), backbones.waits_on(made)
    for arm, (run_dir, argv_arm, cfg) in plans.items():
        if is_finished(run_dir, cfg.train.epochs):
            # Run again after an interruption, the sweep goes on where it stopped: a finished run is kept.
            print(f"{arm}: finished earlier ({run_dir}): not run again")
            manifest["runs"][arm] = {"status": "finished", "run_dir": str(run_dir)}
            continue
        if arm in alive:  # submitted by an earlier launch and still queued or running: never twice in one folder
            jobs[arm], manifest["runs"][arm] = alive[arm]
            print(f"{arm}: job {jobs[arm].job_id} of an earlier launch is still in SLURM: followed, not submitted again")
            continue
        weights = (cfg.model.weights, cfg.model.depth)  # the seeds of an arm share it: looked up once
        if arm in backbone_of:  # a backbone being made is not missing; one that cannot be made is
            backbone = backbone_of[arm]
            reasons[weights] = "" if backbone.status in (*backbones.MADE, *backbones.PENDING) else backbone.not_made()
        elif weights not in reasons:
            reasons[weights] = missing_weights(cfg)
        reason = reasons[weights]
        if reason:
            set_status(run_dir, cfg, "not run", reason)
            print(f"{arm}: NOT RUN, never trained from scratch instead:\n  {reason}", file=sys.stderr)
            manifest["runs"][arm] = {"status": "not run", "reason": reason, "run_dir": str(run_dir)}
        else:
            set_status(run_dir, cfg)
            tasks[arm] = TrainTask(argv_arm, threads=res.threads)
    array_name = out.name if args.array else ""
    for arm, job, gpus in submit_each(make_executor(args, out / "submitit", res), tasks, slots, array_name, start,
                                      after):
        jobs[arm] = job
        entry = {"gpus": gpus} if gpus is not None else {}
        if arm in backbone_of:
            entry["backbone"] = backbone_of[arm].name
        manifest["runs"][arm] = {"status": "submitted", "job_id": job.job_id, "run_dir": str(plans[arm][0]),
                                 "log": str(job.paths.stdout).replace("%t", "0"), "argv": plans[arm][1],
                                 "submitted_at": time.time(), **entry}
        write_manifest()
        shown = f"  GPU(s) {','.join(map(str, gpus))}" if gpus is not None else ""
        print(f"{arm}: job {job.job_id}{shown}  log {manifest['runs'][arm]['log']}", flush=True)
    write_manifest()
    print(f"sweep folder {out} (manifest {manifest_file})")
    if args.executor == "slurm" and jobs:
        print(f"follow: squeue -j {','.join(j.job_id for j in jobs.values())}   tail -f {out}/submitit/*_0_log.out")
    return jobs


def jobs_still_queued(manifest: Path, folder: Path) -> dict:
    """name -> (job, its manifest entry) for the runs an earlier launch's manifest lists as submitted whose
    SLURM job is still in the queue (pending, running, requeued: listed by squeue, which asks the controller
    itself; accounting, what submitit's job.state reads, may not know a job submitted a moment ago)."""
    if not manifest.is_file():
        return {}
    submitted = {name: entry for name, entry in json.loads(manifest.read_text()).get("runs", {}).items()
                 if entry.get("status") == "submitted"}
    if not submitted:
        return {}
    queued = queued_job_ids(f"the jobs of the earlier launch ({manifest})")
    return {name: (submitit.SlurmJob(folder, entry["job_id"]), entry) for name, entry in submitted.items()
            if entry["job_id"] in queued}


def queued_job_ids(what: str = "an earlier launch's pretraining job") -> set[str]:
    """The ids of every job in the SLURM queue (squeue: pending, running, requeued; array tasks one by one)."""
    listed = subprocess.run(["squeue", "--noheader", "--array", "--format=%i"], capture_output=True, text=True)
    if listed.returncode != 0:
        raise ConfigError(f"squeue failed ({listed.stderr.strip()}): cannot tell whether {what} is still queued; run "
                          f"again once squeue answers")
    return set(listed.stdout.split())


def backbone_executor(args: argparse.Namespace, res: Resources, slots: list, backbone: backbones.Backbone):
    """The executor of a backbone's pretraining job: the arms' (same resources), its logs in the backbone's
    folder (submitit/), named after it on SLURM; locally, the first GPU group (the arms wait for it anyway)."""
    executor = make_executor(args, backbone.folder / "submitit", res)
    if args.executor == "slurm":
        executor.update_parameters(job_name=backbone.name)
    elif slots and slots[0] is not None:
        executor.update_parameters(visible_gpus=slots[0])
    return executor


def tune(args: argparse.Namespace, argv: list[str] | None, sweep: Sweep, out: Path,
         by_arm: dict[str, dict[str, dict[str, str]]], record: dict | None = None, gridded: set[str] = frozenset(),
         roles: dict[str, list[str]] | None = None, start: Callable = start_now) -> int:
    """--tune N: phase 1 runs each arm's N trials on --tune-seed (SWEEP_DIR/tune/<arm>/<trial>/) and waits for
    them; each arm's winner is the trial with the best held-out figure (results.tuning.choose: no test figure
    is read); tuning.json records them; phase 2 runs each winner's exact settings on every seed
    (SWEEP_DIR/<arm>/<trial>/seed<k>/), then the report. Finished runs of either phase are never run again."""
    names1 = run_names(by_arm, [args.tune_seed], under=tuning.TUNE_DIR, seed_folders=False)
    phase1 = plan(sweep, args, out, names1, gridded, tag=TUNE_TAG)
    made1 = pretrainings(sweep, args, out, names1, phase1)  # phase 2's runs find the same backbones (same hash)
    if args.tune_seed in args.seeds:
        print(f"warning: --seeds {','.join(map(str, args.seeds))} holds --tune-seed {args.tune_seed}: each winner's run on "
              f"that seed repeats the run it won with, lucky draw included", file=sys.stderr)
    if args.print_config or args.dry_run or args.print_arms:
        print(f"# phase 1 of --tune: {len(phase1)} runs ({args.tune} trials an arm, seed {args.tune_seed}); phase 2 "
              f"(each arm's winner on seeds {','.join(map(str, args.seeds))}) is planned once phase 1 "
              f"has finished")
        return show(args, sweep, list(by_arm), out, phase1, made1) or 0
    roles = roles or {}
    jobs = submit(args, argv, phase1, out / tuning.TUNE_DIR, "sweep.json",
                  extra={**roles, **({"search": record} if record else {})}, start=start, made=made1)
    failed = wait_for_all(jobs, phase1, trials_of={name: (arm, trial) for name, (arm, _, _, trial, _) in names1.items()})
    choice = tuning.choose(out / tuning.TUNE_DIR, by_arm)
    if record:  # the best-of-k curve counts each repeat of a configuration as a trial of its own
        choice.update(repeats=record["repeats"], distinct_configurations=record["distinct_configurations"])
    write_text(out / tuning.TUNING_FILE, json.dumps(choice, indent=2) + "\n")
    say_winners(choice)
    # Phase 2 runs the trial's own text (tuning.json holds typed values): the folder name and the config keep
    # the exact drawn value.
    winners = {arm: {entry["winner"]["trial"]: by_arm[arm][entry["winner"]["trial"]]}
               for arm, entry in choice["arms"].items() if "winner" in entry}
    if not winners:
        print(f"no arm has a winner: phase 2 not run (tuning.json: {out / tuning.TUNING_FILE})", file=sys.stderr)
        return 1
    names2 = run_names(winners, args.seeds)
    phase2 = plan(sweep, args, out, names2, tag=FINAL_TAG)
    made2 = pretrainings(sweep, args, out, names2, phase2)
    recipe = next(iter(phase2.values()))[2]
    for arm, named in winners.items():
        set_aside_earlier_winners(out / arm, next(iter(named)), recipe.wandb)
    if args.keep_checkpoints == "winners":  # after the set-aside, which reads the W&B ids in their checkpoints
        print(pruning.prune_losers(out, choice))
    log_winners(choice, out, recipe)
    jobs = submit(args, argv, phase2, out, extra=roles, start=start, made=made2)  # SWEEP_DIR/sweep.json: the report's
    code = wait_and_report(jobs, phase2, out)
    return 1 if failed or len(winners) < len(by_arm) or unmade(made1) or unmade(made2) else code


def say_winners(choice: dict) -> None:
    """Each arm's winner (or why none) with its trials' counts, the tie it was picked from, the trials to
    rerun and a collapsed winner (tuning.choose's record)."""
    for arm, entry in choice["arms"].items():
        counts = (f"{entry['finished']} of {entry['planned']} trials finished, {entry['failed']} failed, "
                  f"{entry['diverged']} diverged")
        if entry["to_rerun"]:
            counts += (f", {len(entry['to_rerun'])} to rerun ({', '.join(entry['to_rerun'])}: N is incomplete; "
                       f"run the sweep again)")
        if "winner" in entry:
            w = entry["winner"]
            tie = f", tie among {len(w['tied'])} trials: the first is run" if w["tie"] else ""
            print(f"{arm}: winner {w['trial']} ({entry['metric']} {w['held_out']:.4f} at epoch {w['epoch']}{tie}; "
                  f"{counts})")
            if w.get("collapsed"):
                print(f"{arm}: warning: the winner's selected epoch looks collapsed ({w['collapsed']}; "
                      f"{w['collapsed_on']} confusion matrix)", file=sys.stderr)
        else:
            print(f"{arm}: no winner: {entry['reason']}; {counts}", file=sys.stderr)


def log_winners(choice: dict, out: Path, cfg: config.Config) -> None:
    """The winners in W&B (the recipe's wandb settings, in the sweep's group): the sweep's one run of job type
    `tune` (resumed by every launch: tuning_run_id) holding an artifact tuning-<arm> per arm, aliased `winner`
    and with the trial's name."""
    from dr_resnet.training.tracking import Tracker, TrackingSettings

    w = cfg.wandb
    tracker = Tracker(TrackingSettings(w.mode, w.project, w.entity, out.name, f"{out.name}-tuning", job_type="tune",
                                       init_timeout=w.init_timeout), out, tuning_run_id(out),
                      {"arms": {arm: entry.get("winner", {}).get("values") for arm, entry in choice["arms"].items()}})
    for arm, entry in choice["arms"].items():
        if "winner" in entry:
            tracker.log_tuning(out / tuning.TUNING_FILE, arm, entry["winner"])
    tracker.finish()


def tuning_run_id(out: Path) -> str:
    """The W&B id of the sweep's tuning run: made on first use and kept in SWEEP_DIR/.wandb_tuning_id, so
    that every launch of the sweep logs to one run, not one per launch."""
    from dr_resnet.training.tracking import new_run_id

    path = out / TUNING_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = new_run_id()
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def set_aside_earlier_winners(arm_dir: Path, winner: str, wandb: config.WandbConfig | None = None) -> None:
    """Phase 2's folders of an arm's earlier winner (a rerun with more trials chose another) move to
    SWEEP_DIR/superseded/, so that the report compares the current winners only; with `wandb` (the recipe's
    settings), their W&B runs are tagged superseded."""
    if not arm_dir.is_dir():
        return
    for folder in sorted(p for p in arm_dir.iterdir() if p.is_dir() and p.name != winner):
        target = arm_dir.parent / "superseded" / arm_dir.name / folder.name
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"{arm_dir.name}: the earlier winner's runs {folder} moved to {target}")
        folder.rename(target)
        if wandb is not None:
            tag_superseded(target, wandb)


def tag_superseded(folder: Path, wandb: config.WandbConfig) -> None:
    """Tag `superseded` the W&B run of every run under `folder` (resumed by the id its checkpoint keeps, in
    the recipe's mode), so that W&B tells them from the current winners' runs. Nothing with W&B disabled,
    for a run without an id, or one trained with W&B off (its id names no W&B run)."""
    from dr_resnet.training import checkpoint
    from dr_resnet.training.tracking import Tracker, TrackingSettings, identity, requested_mode, training_tags

    if requested_mode(wandb.mode) == "disabled":
        return
    for path in sorted(folder.rglob(LAST_CHECKPOINT)):
        try:
            state = checkpoint.load(path)
            run_cfg = config.from_dict(state["config"])
        except Exception as exc:  # a damaged checkpoint must not stop the sweep: the run stays set aside, untagged
            print(f"warning: {path}: cannot be read ({type(exc).__name__}): its W&B run is not tagged "
                  f"{SUPERSEDED_TAG}", file=sys.stderr)
            continue
        w = run_cfg.wandb
        if not state.get("wandb_id") or requested_mode(w.mode) == "disabled":
            continue
        # the run's own project, group, name and tags: resuming with others would rename or move it
        settings = TrackingSettings(wandb.mode, w.project, w.entity, w.group, w.name, job_type="train",
                                    tags=training_tags(identity(run_cfg.model, run_cfg.train.seed), w.tags),
                                    init_timeout=wandb.init_timeout)
        tracker = Tracker(settings, path.parent, state["wandb_id"], {})
        tracker.add_tags(SUPERSEDED_TAG)
        tracker.finish()


class GpuSlots:
    """The local executor's GPU groups (or, with --parallel, plain CPU slots: None): an arm gets a free
    group, or waits until a running arm's job ends (submitit's local executor would otherwise give every
    job the same GPUs, and start every job at once)."""

    def __init__(self, slots: list[list[int]], poll_s: float = 2.0) -> None:
        self.free, self.busy, self.poll_s = list(slots), [], poll_s

    def acquire(self) -> list[int]:
        while not self.free:
            for job, slot in list(self.busy):
                if job.done():
                    self.busy.remove((job, slot))
                    self.free.append(slot)
            if not self.free:
                time.sleep(self.poll_s)  # local jobs are child processes with no completion callback
        return self.free.pop(0)

    def hold(self, job, slot: list[int]) -> None:
        self.busy.append((job, slot))


def wait_for(job, poll_s: float = 5.0) -> list:
    """Every task's result once the job has really ended (see requeue.ALIVE); raises the final failure."""
    while True:
        try:
            return job.results()
        except Exception:
            if job.state.split()[0] not in requeue.ALIVE:
                raise
            time.sleep(poll_s)  # polling SLURM: there is nothing else to wait on


def wait_and_report(jobs: dict, plans: dict, out: Path, poll_s: float = 5.0) -> int:
    """wait_for_all, then write and print the report; 1 if any run failed."""
    from dr_resnet.results.report import report

    failed = wait_for_all(jobs, plans, poll_s)
    written = report(out)  # a damaged run file: one line naming it (main's frame), exit 2: the runs are done
    print("report: " + ", ".join(str(p) for p in written))
    print(answer_of((out / "results.md").read_text()) + f"\n(every run's row, the comparisons and the figures: {out})")
    return 1 if failed else 0


ANSWER_SECTIONS = ("# Answer", "## The question", "## What the answer rests on", "## What these seeds can detect")


def answer_of(results: str) -> str:
    """results.md's opening sections, the answer (what a sweep prints when it ends; the rest stays in the file)."""
    sections = results.split("\n#")
    kept = [sections[0]] + ["#" + s for s in sections[1:] if ("#" + s).startswith(ANSWER_SECTIONS)]
    return "\n".join(kept).rstrip()


def wait_for_all(jobs: dict, plans: dict, poll_s: float = 5.0, trials_of: dict[str, tuple[str, str]] | None = None
                 ) -> list[str]:
    """Show the live view (on a terminal; trials_of: run name -> (arm, trial) in --tune's phase 1) until every
    job has ended, then collect each job's result and mark failed runs; returns their names."""
    runs = {name: (run_dir, cfg.train.epochs) for name, (run_dir, _, cfg) in plans.items()}
    watch(runs, lambda name: jobs[name].state if name in jobs else ("FINISHED" if is_finished(runs[name][0]) else "not run"),
          lambda: all(job.done() for job in jobs.values()), LiveView(), poll_s, trials_of)
    failed = []
    for arm, job in jobs.items():
        try:
            wait_for(job)
            print(f"{arm}: done (job {job.job_id})")
        except Exception as exc:
            failed.append(arm)
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            errors = [line for line in lines if "Error:" in line]  # the task's own exception, not the log path
            reason = (errors or lines or [type(exc).__name__])[-1]
            run_dir, _, cfg = plans[arm]
            # The run's own error (its train.log says why) is a failure of what it trains; a job ended from
            # outside (a lost node, a time-out, a cancel, a kill) lost the run, and running the sweep again
            # reruns it: a tuning trial lost so is never counted as failed.
            own = last_launch_error(run_dir)
            status = "failed" if own else "lost"
            set_status(run_dir, cfg, status, f"job {job.job_id}: {own or reason}")
            print(f"{arm}: {status.upper()} (job {job.job_id}): {own or reason}"
                  + ("" if own else " (not the run's own error: running the sweep again reruns it)"), file=sys.stderr)
    return failed


if __name__ == "__main__":
    sys.exit(main())
