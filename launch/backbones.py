"""The sweep's pretraining step: the backbones its `ssl` and `imagenet+ssl` arms fine-tune from, made once
and shared.

An arm whose model.weights is one of launch.sweep's keywords (config.SWEEP_BACKBONES: `ssl`, `imagenet+ssl`)
fine-tunes from a backbone that `python -m dr_resnet.pretrain` learns on the arm's photos first. Its pretraining
config is the arm's resolved config with model.weights=none (ssl) or imagenet (imagenet+ssl), output.dir the
backbone's folder, wandb.name the backbone's name and train.seed the recipe's: NOT a --seeds value, since the
seeds vary the fine-tuning, and every seed, trial and data.train_fraction of the arm fine-tunes from the one
backbone (--tune's two phases too). A backbone is named by the settings that decide it (config.PRETRAINING_KEYS,
hashed by config.pretraining_hash): <cache>/resnet{depth}_{initialisation}-{hash}/, the cache being launch.sweep's
--backbones (default: the sweep folder's parent's backbones/, so that runs/demo and runs/demo2 share
runs/backbones/), where a second sweep, or a concurrent one, finds it.

Before any job, the folder gets a planned record, backbone.json {"initialisation", "finished": false,
"config_hash"} (the pretraining command writes the full record over it when it finishes), so that
config.recorded_initialisation names the fine-tuning runs' arm right at plan time; their arguments get
model.weights=<folder>/backbone.pt. Then, under an exclusive lock on <cache>/.<name>.lock (fcntl.flock, as
data staging locks its copies: the cache must be on a file system with working flock, which NFS without
lockd and some FUSE mounts lack, or concurrent sweeps may both pretrain it):

- a finished backbone with the same hash is reused;
- on SLURM, a pretraining job recorded in <folder>/job.json and still in the queue is followed, else one is
  submitted (and recorded there); the fine-tuning jobs wait for it (sbatch --dependency=afterok:<id>);
- with the local executor the pretraining job runs first and the launcher waits for it, lock held (a concurrent
  local sweep waits, then reuses it). One that fails leaves its arms not run, with the reason: never fine-tuned
  from scratch instead. So does an imagenet+ssl backbone whose ImageNet weights cannot be had.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dr_resnet import config
from dr_resnet.files import try_lock, write_text
from dr_resnet.results.rundir import BACKBONE_FILE, BACKBONE_RECORD, PRETRAINING_JOB_FILE, last_launch_error

from .task import PretrainTask

JOB_FILE = PRETRAINING_JOB_FILE  # <folder>/job.json: the job that pretrains it (job_id, log, submitted_at)
CACHE_DIR = "backbones"  # the default cache: the sweep folder's parent / CACHE_DIR
MADE = ("reused", "pretrained")  # statuses whose backbone.pt exists: its runs start at once
PENDING = ("submitted", "following")  # statuses whose SLURM job makes it: its runs wait for the job
LOCK_SAID_S = 10.0  # how long a wait for another sweep's lock goes before it is said


@dataclass
class Backbone:
    """One backbone the sweep's runs fine-tune from, and what became of it."""

    name: str  # resnet{depth}_{initialisation}-{hash}
    folder: Path
    initialisation: str  # ssl | imagenet+ssl
    config_hash: str
    argv: list[str]  # dr_resnet.pretrain's arguments
    cfg: config.Config  # its resolved pretraining config
    arms: list[str] = field(default_factory=list)  # the sweep's arms that fine-tune from it
    runs: list[str] = field(default_factory=list)  # the runs (arm x trial x seed) that do
    status: str = "planned"  # planned | reused | pretrained | submitted | following | failed | not run | not needed
    job_id: str = ""
    reason: str = ""  # failed or not run: why

    @property
    def weights(self) -> Path:
        return self.folder / BACKBONE_FILE

    @property
    def label(self) -> str:
        return ",".join(self.arms)

    def manifest_entry(self) -> dict:
        """sweep.json's "backbones" entry."""
        entry = {"folder": str(self.folder), "status": self.status, "config_hash": self.config_hash,
                 "initialisation": self.initialisation, "runs": self.runs}
        if self.job_id:
            entry["job_id"] = self.job_id
        if self.reason:
            entry["reason"] = self.reason
        return entry

    def finished(self) -> bool:
        """Whether a finished backbone with this config's hash is in its folder (pretrained earlier)."""
        record = read_json(self.folder / BACKBONE_RECORD)
        return bool(record.get("finished")) and record.get("config_hash") == self.config_hash and self.weights.is_file()

    def recorded_job(self) -> str:
        """The SLURM job an earlier launch submitted to pretrain it ('' when none is recorded)."""
        return str(read_json(self.folder / JOB_FILE).get("job_id") or "")

    def not_made(self) -> str:
        """Why the runs that fine-tune from it are not run (failed or not run)."""
        return f"backbone {self.folder} not made ({self.status}): {self.reason}"


def read_json(path: Path) -> dict:
    """A JSON file's object; {} when it is missing or not an object (a record half written by a killed process
    reads as none: the backbone is made again)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def default_cache(out: Path) -> Path:
    """Where the backbones are cached unless --backbones says: beside the sweep folder (runs/demo ->
    runs/backbones), so that another sweep under the same parent finds them."""
    return out.parent / CACHE_DIR


def is_keyword(weights: str) -> bool:
    """Whether a run's model.weights asks for a backbone the sweep pretrains."""
    return weights in config.SWEEP_BACKBONES


def pretraining_argv(recipe_argv: list[str], initialisation: str, folder: Path, name: str, root: str) -> list[str]:
    """dr_resnet.pretrain's arguments from an arm's recipe arguments (without a --seeds value, a run folder or a
    trial's values that do not decide the backbone): where it starts, its folder, its W&B name and data.root
    resolved (the hash's own reading of it, whatever the job's working folder); later entries win."""
    return [*recipe_argv, f"model.weights={config.SWEEP_BACKBONES[initialisation]}", f"output.dir={folder}",
            f"wandb.name={name}", f"data.root={Path(root).expanduser().resolve()}"]


def plan(plans: dict, recipes: dict[str, list[str]], arms: dict[str, str], cache: Path, write: bool) -> dict[str, Backbone]:
    """The backbones the runs of `recipes` (run name -> its recipe arguments: --config FILE and the overrides that
    decide its backbone) fine-tune from, by name; each such run's arguments in `plans` get
    model.weights=<folder>/backbone.pt and its config is read again. With `write` (not a dry run), each folder
    gets its planned record when it has none. `arms`: run name -> its arm."""
    made: dict[str, Backbone] = {}
    for run, recipe in recipes.items():
        run_dir, argv, cfg = plans[run]
        initialisation = cfg.model.weights
        # the hash leaves output.dir and wandb.name out: a placeholder folder gives it
        unnamed = pretraining_argv(recipe, initialisation, cache, "", cfg.data.root)
        digest = config.pretraining_hash(config.load(unnamed[1], unnamed[2:]))
        name = f"resnet{cfg.model.depth}_{initialisation}-{digest}"
        if name not in made:
            folder = cache.resolve() / name
            pre_argv = pretraining_argv(recipe, initialisation, folder, name, cfg.data.root)
            made[name] = Backbone(name, folder, initialisation, digest, pre_argv, config.load(pre_argv[1], pre_argv[2:]))
        backbone = made[name]
        backbone.runs.append(run)
        if arms[run] not in backbone.arms:
            backbone.arms.append(arms[run])
        if write:
            write_planned(backbone)
        argv = [*argv, f"model.weights={backbone.weights}"]
        plans[run] = (run_dir, argv, config.load(argv[1], argv[2:]))
    return made


def write_planned(backbone: Backbone) -> None:
    """The planned record (initialisation, finished false, the hash) when the folder has no record yet."""
    record = backbone.folder / BACKBONE_RECORD
    if record.is_file():
        return
    backbone.folder.mkdir(parents=True, exist_ok=True)
    write_text(record, json.dumps({"initialisation": backbone.initialisation, "finished": False,
                                   "config_hash": backbone.config_hash}, indent=2) + "\n")


@contextlib.contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold `lock` (a file, made if missing) exclusively (fcntl.flock: a file system with working flock) for
    the block; a wait on another process is said once it has lasted LOCK_SAID_S."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started, said = time.monotonic(), False
        while not try_lock(fd, fcntl.LOCK_EX):
            if not said and time.monotonic() - started >= LOCK_SAID_S:
                print(f"waiting for another sweep's {what} (it holds {lock})", flush=True)
                said = True
            time.sleep(0.5)  # another process's lock: flock has no wait with a timeout
        yield
    finally:
        os.close(fd)  # closing releases the lock


def lock_file(backbone: Backbone) -> Path:
    return backbone.folder.parent / f".{backbone.name}.lock"


def prepare(made: dict[str, Backbone], submit: Callable[[Backbone], object], slurm: bool,
            queued: Callable[[], set[str]], missing: Callable[[config.Config], str]) -> None:
    """Make every backbone of `made` available to its runs, each under its lock: reused when finished; on SLURM a
    recorded job still queued (`queued`: the job ids squeue lists) followed, else a job submitted (`submit`:
    backbone -> submitit job) and recorded in job.json; locally, a job run to its end. `missing`: why the
    pretraining's start (model.weights imagenet) cannot be had ('' when it can). Sets each one's status."""
    for backbone in made.values():
        with exclusive(lock_file(backbone), f"pretraining of {backbone.name}"):
            if backbone.finished():
                backbone.status = "reused"
                print(f"{backbone.label}: backbone {backbone.folder} (pretrained earlier): reused", flush=True)
                continue
            if slurm:
                recorded = backbone.recorded_job()
                if recorded and recorded in queued():
                    backbone.status, backbone.job_id = "following", recorded
                    print(f"{backbone.label}: backbone {backbone.folder}: pretraining job {recorded} of an earlier "
                          f"launch is still in SLURM: the fine-tuning waits for it", flush=True)
                    continue
            reason = missing(backbone.cfg)
            if reason:
                backbone.status, backbone.reason = "not run", f"its pretraining cannot start: {reason}"
                print(f"{backbone.label}: backbone {backbone.folder} NOT MADE, no run fine-tunes from scratch "
                      f"instead:\n  {reason}", file=sys.stderr, flush=True)
                continue
            write_planned(backbone)  # moved or deleted since the plan: the runs' arm is read from it
            job = submit(backbone)
            backbone.job_id = str(job.job_id)
            log = str(job.paths.stdout).replace("%t", "0")
            write_text(backbone.folder / JOB_FILE, json.dumps({"job_id": backbone.job_id, "log": log,
                                                               "submitted_at": time.time()}, indent=2) + "\n")
            print(f"{backbone.label}: backbone {backbone.folder}: pretraining job {backbone.job_id}  log {log}",
                  flush=True)
            if slurm:
                backbone.status = "submitted"
                continue
            pretrain_locally(backbone, job)


def pretrain_locally(backbone: Backbone, job) -> None:
    """Wait for a local pretraining job (the lock held, so a concurrent sweep waits for it too) and say how it
    ended: pretrained, or failed with its own error (train.log) or the job's."""
    try:
        job.results()
    except Exception as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        errors = [line for line in lines if "Error:" in line]
        backbone.status = "failed"
        backbone.reason = (f"pretraining job {backbone.job_id}: "
                           f"{last_launch_error(backbone.folder) or (errors or lines or [type(exc).__name__])[-1]}")
        print(f"{backbone.label}: backbone {backbone.folder} FAILED, no run fine-tunes from scratch instead: "
              f"{backbone.reason}", file=sys.stderr, flush=True)
        return
    if backbone.finished():
        backbone.status = "pretrained"
        print(f"{backbone.label}: backbone {backbone.folder}: pretrained (job {backbone.job_id})", flush=True)
    else:
        backbone.status = "failed"
        backbone.reason = f"pretraining job {backbone.job_id} ended without a finished {BACKBONE_RECORD}"
        print(f"{backbone.label}: backbone {backbone.folder} FAILED: {backbone.reason}", file=sys.stderr, flush=True)


def dependency(base: dict, job_ids: list[str]) -> dict:
    """sbatch's additional parameters `base` (requeue.REQUEUE, --slurm's) with the fine-tuning's wait on the
    pretraining jobs: --dependency=afterok:<id>[:<id>] (after a --slurm dependency of the user's: both must
    hold) and --kill-on-invalid-dep=yes (a failed pretraining cancels its runs, which would otherwise wait
    forever)."""
    if not job_ids:
        return dict(base)
    after = "afterok:" + ":".join(dict.fromkeys(job_ids))
    given = base.get("dependency")
    return {**base, "dependency": f"{given},{after}" if isinstance(given, str) and given else after,
            "kill-on-invalid-dep": base.get("kill-on-invalid-dep", "yes")}


def waits_on(made: dict[str, Backbone]) -> dict[str, str]:
    """Run name -> the SLURM job id it waits for (its backbone's, submitted or followed)."""
    return {run: b.job_id for b in made.values() if b.status in PENDING for run in b.runs}


def by_run(made: dict[str, Backbone]) -> dict[str, Backbone]:
    """Run name -> its backbone."""
    return {run: b for b in made.values() for run in b.runs}


def describe(backbone: Backbone) -> str:
    """The pretraining job's command line, as a dry run prints it."""
    return f"dr_resnet.pretrain {shlex.join(backbone.argv)}"


def task(backbone: Backbone, threads: int) -> PretrainTask:
    return PretrainTask(backbone.argv, threads=threads)


def submitter(executor_for: Callable[[Backbone], object], threads: int, start: Callable) -> Callable[[Backbone], object]:
    """backbone -> its pretraining job on the executor executor_for gives it, submitted through `start` (a local
    launcher's LocalJobs.start: a stop signal stops it too)."""
    def submit(backbone: Backbone):
        executor = executor_for(backbone)
        return start(functools.partial(executor.submit, task(backbone, threads)))
    return submit
