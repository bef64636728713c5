"""Pretrain a ResNet backbone on fundus photos without their grades (BYOL), on the same path as training:
1 process, torchrun (DDP), srun in an sbatch script, or a submitit task.

    python -m dr_resnet.pretrain --config configs/pretrain_demo.yaml [section.key=value ...]
    torchrun --nproc_per_node 4 -m dr_resnet.pretrain data.root=/data/eyepacs_512 pretrain.pools=/data/aptos:test

The run folder (output.dir) ends with backbone.pt, which `model.weights=PATH` loads into a ResNet of the same
depth (the classifier fresh), and backbone.json, the record of what it learned from. A folder that holds a
checkpoint is resumed, after any kill, where the checkpoint left it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dr_resnet import __version__, config, processes
from dr_resnet.config import Config, ConfigError
from dr_resnet.data.augment import epoch_generator
from dr_resnet.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from dr_resnet.data.samplers import ShuffledSampler
from dr_resnet.files import write_text
from dr_resnet.model.resnet import build_resnet
from dr_resnet.pretraining.byol import (
    CollapseError,
    OnlineNetwork,
    Projection,
    drop_classifier,
    output_spread,
    raise_if_collapsed,
    symmetric_loss,
    target_decay,
    target_network,
)
from dr_resnet.pretraining.pool import PhotoPool, PoolDataset, photo_pool
from dr_resnet.pretraining.views import FundusViews
from dr_resnet.results.rundir import (
    BACKBONE_FILE,
    BACKBONE_RECORD,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    PRETRAINING_PNG,
    PREV_CHECKPOINT,
    SUMMARY_FILE,
    append_metrics,
    rewrite_metrics,
)
from dr_resnet.seeds import derive_seed
from dr_resnet.training import checkpoint, components, distributed
from dr_resnet.training.average import ExponentialAverage
from dr_resnet.training.checkpoint import EpochPosition
from dr_resnet.training.distributed import DistInfo
from dr_resnet.training.loop import Execution, NonFiniteError
from dr_resnet.training.preemption import RunStopped, StepBoundary, StopSignals
from dr_resnet.training.runtime import Stopwatch, configure_backends
from dr_resnet.training.tracking import Tracker, TrackingSettings, new_run_id
from dr_resnet.training.train import announce_launch, drop_previous_checkpoint, set_aside

log = logging.getLogger("dr_resnet.pretrain")

# model.weights -> the backbone's initialisation ({"none": "ssl", "imagenet": "imagenet+ssl"}): launch.sweep's keywords
# (config.SWEEP_BACKBONES) read the other way
STARTED_FROM = {start: initialisation for initialisation, start in config.SWEEP_BACKBONES.items()}


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (docs/reference/commands.md is rendered from it)."""
    prog = "dr-pretrain" if Path(sys.argv[0]).name == "dr-pretrain" else "python -m dr_resnet.pretrain"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog=config.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (see configs/pretrain_demo.yaml); its pretrain section is read")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. pretrain.epochs=50 output.dir=runs/ssl18")
    return p


def initialisation_of(weights: str) -> str:
    """The backbone's initialisation for where pretraining starts (model.weights): ssl from random weights,
    imagenet+ssl from ImageNet's (RETFound's order). Any other start is refused: a backbone must say what it is."""
    if weights not in STARTED_FROM:
        raise ConfigError(f"model.weights={weights}: pretraining starts from none (random weights: an ssl backbone) or "
                          f"imagenet (an imagenet+ssl backbone), not from a file")
    return STARTED_FROM[weights]


@dataclass
class Pretraining:
    """Everything built for one pretraining run."""

    cfg: Config
    info: DistInfo
    run_dir: Path
    pool: PhotoPool
    loader: DataLoader
    sampler: ShuffledSampler
    online: OnlineNetwork  # the bare online network (backbone, projector, predictor)
    trained: nn.Module  # what the step calls: the online network, DDP-wrapped with 2+ processes
    target: ExponentialAverage  # the weight average of the online backbone and projector (BYOL's target)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    execution: Execution  # device and precision
    views: FundusViews
    lr: float
    lr_rule: str
    sync_bn: str  # how the projector and predictor normalise across processes, as logged
    steps_per_epoch: int  # an epoch's steps for each process (fixed: the loader is shorter in a resumed epoch)
    rows: list[dict] = field(default_factory=list)
    wandb_id: str | None = None

    @property
    def initialisation(self) -> str:
        """What the backbone will be: ssl from random weights, imagenet+ssl from ImageNet's."""
        return STARTED_FROM[self.cfg.model.weights]

    @property
    def total_steps(self) -> int:
        return self.cfg.pretrain.epochs * self.steps_per_epoch


def build(cfg: Config, info: DistInfo) -> Pretraining:
    """The photos, the networks and the optimisation on this process's device."""
    pre, t, d = cfg.pretrain, cfg.train, cfg.data
    if d.workers > 0:
        processes.start_fork_server()
    configure_backends(info.device, t.cudnn_benchmark, t.deterministic)
    started_from = initialisation_of(cfg.model.weights)
    if d.stage_to:
        d = dataclasses.replace(d, root=str(components.staged_root(d, info.local_rank)))
    pool, _ = photo_pool(d, pre.pools, ranks=components.check_ranks())  # refuses a pool that shares the test split's photos
    if len(pool.paths) < pre.batch_size * info.world_size:
        raise ConfigError(f"pretrain.batch_size={pre.batch_size} x {info.world_size} process(es) is more than the "
                          f"{len(pool.paths)} photos of the pool: lower pretrain.batch_size")
    sampler = ShuffledSampler(np.zeros(len(pool.paths), dtype=np.int64), info.world_size, info.rank, seed=t.seed)
    loader = DataLoader(PoolDataset(pool, d.image_size), pre.batch_size, sampler=sampler, drop_last=True,
                        num_workers=d.workers, pin_memory=info.device.type == "cuda", persistent_workers=d.workers > 0,
                        generator=torch.Generator(), **components.worker_start(d.workers))
    execution = components.agreed(components.execution(t.amp, info.device, None, t.channels_last), info.is_main)
    cuda = info.device.type == "cuda"
    views = FundusViews(d.image_size, pre.crop_scale, d.max_rotation, d.flips, pre.colour, IMAGENET_MEAN, IMAGENET_STD,
                        channels_last=execution.channels_last)
    torch.manual_seed(derive_seed(t.seed, "init"))
    backbone = build_resnet(cfg.model.depth, weights=None if started_from == "ssl" else "imagenet",
                            zero_init_residual=cfg.model.zero_init_residual and started_from == "ssl")
    features = backbone.fc.in_features
    drop_classifier(backbone)  # its output: the pooled features the classifier would read
    online = OnlineNetwork(backbone, Projection(features, pre.hidden_dim, pre.projection_dim),
                           Projection(pre.projection_dim, pre.hidden_dim, pre.projection_dim)).to(info.device)
    if execution.channels_last:
        online = online.to(memory_format=torch.channels_last)
    if info.distributed and cuda:
        # BYOL's loss is per photo: processes meet only through the BatchNorm statistics, so the projector's and
        # predictor's (and the backbone's) are shared across them always, whatever the batch a GPU.
        online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        sync_bn = "SyncBatchNorm across the processes (the whole online network, and its target)"
    elif info.distributed:
        sync_bn = ("torch has no SyncBatchNorm on CPU: each process's BatchNorm (the projector's and predictor's too) "
                   "normalises over its own batch")
    else:
        sync_bn = "one process: BatchNorm sees the whole batch"
    target = target_network(online, pre.target_decay)
    trained = online
    if info.distributed:
        trained = DistributedDataParallel(online, device_ids=[info.device.index] if cuda else None,
                                          **(components.no_buffer_broadcast() if cuda else {}))
    global_batch = pre.batch_size * info.world_size
    lr = pre.lr_base * global_batch / 256
    optimizer = components.sgd(online.parameters(), lr, pre.momentum, pre.weight_decay, fused=cuda)
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, components.lr_lambda("cosine", round(pre.warmup_epochs * steps), pre.epochs * steps))
    scaler = torch.amp.GradScaler(info.device.type, enabled=execution.precision.needs_scaler)
    return Pretraining(cfg, info, Path(cfg.output.dir), pool, loader, sampler, online, trained, target, optimizer,
                       scheduler, scaler, execution, views, lr,
                       f"{pre.lr_base:g} x {global_batch} / 256 (pretrain.lr_base, linear scaling)", sync_bn, steps)


# -- one step, one epoch -------------------------------------------------------------------------------------

def step(run: Pretraining, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One BYOL step on a uint8 batch on the device: two views, the online predictions of each against the
    target's projections of the other, SGD, then the target moves towards the online network by the decay of
    this step. Returns the loss and the online projections' spread (device tensors: nothing waits for them)."""
    first, second = run.views.pair(images, generator)
    with run.execution.precision.autocast(run.execution.device):
        online = run.trained(first, second)
        with torch.no_grad():
            targets = (run.target.module(first), run.target.module(second))
    loss = symmetric_loss(online.predictions, targets)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    # the run's step in its own steps (the scheduler's count: moved with the schedule on a resume by other processes)
    run.target.decay = target_decay(min(run.scheduler.last_epoch, run.total_steps), run.total_steps,
                                    run.cfg.pretrain.target_decay)
    run.target.update(run.online.encoder)
    return loss.detach(), output_spread(online.projections[0])


def restore_position(position: EpochPosition, generator: torch.Generator, sums: Tensor, info: DistInfo) -> None:
    """Each rank's view stream and running sums from a mid-epoch checkpoint. Resumed by another number of
    processes (or on another kind of device), the epoch's remaining photos are shared out anew with fresh view
    streams, rank 0 carrying the sums so far: close to, not bit for bit, an uninterrupted run."""
    ranks = position.ranks
    if len(ranks) == info.world_size and position.device in ("", generator.device.type):
        generator.set_state(ranks[info.rank]["views"])
        sums += torch.tensor(ranks[info.rank]["sums"], dtype=torch.float64, device=sums.device)
        return
    if info.is_main:
        sums += torch.tensor([r["sums"] for r in ranks], dtype=torch.float64, device=sums.device).sum(0)
        log.warning("the checkpoint was written by %d process(es) on %s inside pretraining epoch %d; %d process(es) on "
                    "%s go on with its remaining photos and fresh view streams: close to, not bit for bit, an "
                    "uninterrupted run", len(ranks), position.device or "?", position.epoch + 1, info.world_size,
                    generator.device.type)


def train_epoch(run: Pretraining, epoch: int, position: EpochPosition | None, boundary: StepBoundary) -> dict:
    """The steps of one epoch (from `position` when resuming inside it), with the collective decision at each
    step boundary (a checkpoint on the clock or a signal; a stop). Returns the epoch's row."""
    from tqdm import tqdm

    info, pre = run.info, run.cfg.pretrain
    first, began_with = (position.step, position.began_with) if position else (0, info.world_size)
    images_before, seconds_before = (position.images, position.seconds) if position else (0, 0.0)
    run.sampler.set_epoch(epoch, images_before, began_with)
    generator = epoch_generator(run.cfg.train.seed, epoch, info.rank, info.device)
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss, spread, steps
    if position:
        restore_position(position, generator, sums, info)
    steps = first + len(run.loader)
    per_step = pre.batch_size * info.world_size
    watch = Stopwatch(info.device)
    bar = tqdm(total=steps * pre.batch_size, initial=first * pre.batch_size, desc=f"pretrain {epoch + 1}/{pre.epochs}",
               unit="photo", disable=not info.is_main, mininterval=1 if sys.stderr.isatty() else 30, leave=False)
    run.trained.train()
    run.target.module.train()  # BYOL's target normalises with its batch's statistics, as the online network does
    try:
        for done, (images, _) in enumerate(run.loader, start=first + 1):
            images = images.to(info.device, non_blocking=True)
            loss, spread = step(run, images, generator)
            sums += torch.stack([loss.double(), spread.double(), torch.ones((), dtype=torch.float64, device=info.device)])
            bar.update(images.shape[0])
            decision = boundary.decide()
            if decision.checkpoint:
                here = EpochPosition(epoch, done, steps, began_with, info.world_size,
                                     images_before + (done - first) * per_step, None, seconds_before + watch.seconds(),
                                     distributed.all_gather_objects({"views": generator.get_state(),
                                                                     "sums": sums.tolist()}),
                                     generator.device.type)
                save_checkpoint(run, state(run, epoch, here))
                boundary.checkpointed()
                log.info("checkpoint in pretraining epoch %d after step %d of %d", epoch + 1, done, steps)
                if decision.stop_signal:
                    raise RunStopped(decision.stop_signal, f"in pretraining epoch {epoch + 1} after step {done}")
            boundary.send()
    finally:
        bar.close()
    session = watch.seconds()
    total = distributed.all_reduce_sum(sums.clone())
    loss, spread, count = (float(v) for v in total.cpu())
    photos_now = (steps - first) * per_step  # this launch's: the speed is theirs over its own time
    return {"epoch": epoch + 1, "loss": loss / max(count, 1), "spread": spread / max(count, 1),
            "spread_x_sqrt_d": spread / max(count, 1) * math.sqrt(pre.projection_dim),
            "lr": run.optimizer.param_groups[0]["lr"], "target_decay": run.target.decay,
            "photos": images_before + photos_now, "photos_per_s": photos_now / max(session, 1e-9),
            "epoch_seconds": seconds_before + session}


# -- checkpoints and resume ------------------------------------------------------------------------------------

def state(run: Pretraining, epochs_done: int, position: EpochPosition | None = None) -> dict:
    """What a resume needs (rank 0 saves it): after `epochs_done` epochs, or inside the next one (`position`)."""
    return {"online": run.online.state_dict(), "target": run.target.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "epoch": epochs_done, "position": position.to_dict() if position else {},
            "rng": checkpoint.rng_state(), "config": run.cfg.to_dict(), "wandb_id": run.wandb_id,
            "pool": run.pool.record(), "rows": run.rows, "kind": "pretraining"}


def save_checkpoint(run: Pretraining, saved: dict) -> None:
    """Rank 0 writes the resume point atomically (the one before kept as checkpoint_prev.pt); every rank learns
    whether that worked."""
    distributed.rank0_writes("the pretraining checkpoint", lambda: checkpoint.save(
        saved, run.run_dir / LAST_CHECKPOINT, keep_previous=run.run_dir / PREV_CHECKPOINT), run.info.is_main)


def resume(run: Pretraining) -> tuple[int, EpochPosition | None]:
    """The run folder's resume point (checkpoint_last.pt, else checkpoint_prev.pt): epochs done and the position
    inside the next one. Nothing there: a fresh start; another config: one line saying what differs."""
    policy = run.cfg.train.resume
    if policy == "never":
        if run.info.is_main:
            set_aside(run.run_dir)
        distributed.barrier()
        return 0, None
    found = None
    for path in (run.run_dir / LAST_CHECKPOINT, run.run_dir / PREV_CHECKPOINT):
        if path.is_file():
            try:
                found = (checkpoint.load(path), path)
                break
            except Exception as exc:  # a damaged file: the previous one may do
                log.warning("cannot resume from %s: %s", path, exc)
    if found is None:
        if policy == "must":
            raise ConfigError(f"train.resume=must: no checkpoint to resume in {run.run_dir}")
        return 0, None
    saved, path = found
    if saved.get("kind") != "pretraining":
        raise ConfigError(f"{path} is not a pretraining checkpoint: set output.dir to a folder of its own")
    changed = config.changed_on_resume(saved["config"], run.cfg)
    if changed:
        raise ConfigError(f"{path} was pretrained with another config: {'; '.join(changed)}; set output.dir to a new "
                          f"folder, or train.resume=never to start over there")
    if saved["pool"] != run.pool.record():
        raise ConfigError(f"{path} was pretrained on another pool of photos ({saved['pool']}); set output.dir to a new "
                          f"folder, or train.resume=never to start over there")
    run.online.load_state_dict(saved["online"])
    run.target.load_state_dict(saved["target"])
    components.load_optimizer_state(run.optimizer, saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.scaler.is_enabled() and saved["scaler"]:
        run.scaler.load_state_dict(saved["scaler"])
    checkpoint.restore_rng(saved["rng"])
    run.rows = list(saved["rows"])
    run.wandb_id = saved.get("wandb_id")
    position = EpochPosition.of(saved["position"])
    epochs = int(saved["epoch"])
    if position:
        components.move_schedule(run.scheduler, position.epoch + position.step / position.steps, run.steps_per_epoch)
        log.info("resumed %s in pretraining epoch %d after step %d", path, position.epoch + 1, position.step)
    else:
        log.info("resumed %s after pretraining epoch %d", path, epochs)
    return epochs, position


# -- the run folder ----------------------------------------------------------------------------------------------

def record(run: Pretraining, finished: bool) -> dict:
    """backbone.json's record: what the backbone is and what it learned from (torch-free readers: config,
    the report, launch.sweep's cache)."""
    cfg, pre = run.cfg, run.cfg.pretrain
    seconds = sum(r["epoch_seconds"] for r in run.rows)
    hours = seconds * run.info.world_size / 3600
    cuda = run.info.device.type == "cuda"
    return {"initialisation": run.initialisation, "method": pre.method, "depth": cfg.model.depth,
            "started_from": cfg.model.weights, "pool": run.pool.record(), "images": len(run.pool.paths),
            "epochs": len(run.rows), "epochs_planned": pre.epochs, "image_size": cfg.data.image_size,
            "config_hash": config.pretraining_hash(cfg), "processes": run.info.world_size,
            "device": str(run.info.device.type), "gpu_hours": hours if cuda else 0.0,
            "cpu_hours": 0.0 if cuda else hours, "final_loss": run.rows[-1]["loss"] if run.rows else None,
            "final_spread_x_sqrt_d": run.rows[-1]["spread_x_sqrt_d"] if run.rows else None,
            "finished": finished, "dr_resnet": __version__}


def write_backbone(run: Pretraining) -> dict:
    """backbone.pt (the online backbone's weights without a classifier, its initialisation and record) and
    backbone.json (the record alone)."""
    saved = record(run, finished=True)
    weights = {k: v.detach().cpu().clone() for k, v in run.online.backbone.state_dict().items()}
    checkpoint.save({"model": weights, "initialisation": saved["initialisation"], "pretraining": saved},
                    run.run_dir / BACKBONE_FILE)
    write_text(run.run_dir / BACKBONE_RECORD, json.dumps(saved, indent=2) + "\n")
    return saved


def write_health(run: Pretraining, rows: list[dict]) -> None:
    """pretraining.png: the loss and the spread x sqrt(d) per epoch of `rows`, the collapse line drawn (rank 0)."""
    from dr_resnet.results.plots import save_pretraining_health

    run.run_dir.mkdir(parents=True, exist_ok=True)
    save_pretraining_health(rows, run.cfg.pretrain.collapse_below, run.run_dir / PRETRAINING_PNG,
                            f"resnet{run.cfg.model.depth} BYOL on {len(run.pool.paths)} photos ({run.run_dir.name})")


def record_epoch(run: Pretraining, row: dict, tracker: Tracker | None) -> None:
    """Rank 0 appends the row to metrics.jsonl, every rank takes part in the checkpoint, rank 0 logs."""
    run.rows.append(row)
    distributed.rank0_writes(f"pretraining epoch {row['epoch']}'s metrics", lambda: append_metrics(run.run_dir, row),
                             run.info.is_main)
    save_checkpoint(run, state(run, row["epoch"]))
    if run.info.is_main:
        tracker.log_epoch(row)
        log.info("pretraining epoch %d/%d  loss %.4f  spread x sqrt(d) %.3f  lr %.4g  target decay %.5f  %.0f photos/s  "
                 "%.0fs", row["epoch"], run.cfg.pretrain.epochs, row["loss"], row["spread_x_sqrt_d"], row["lr"],
                 row["target_decay"], row["photos_per_s"], row["epoch_seconds"])


def start_run_folder(run: Pretraining, epochs_done: int) -> None:
    """Rank 0: the folder, config.yaml with what the run derived, metrics.jsonl trimmed to the resume point."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_unfinished(run.run_dir)
    effective = {"lr": run.lr, "lr_rule": run.lr_rule, "global_batch": run.cfg.pretrain.batch_size * run.info.world_size,
                 "steps_per_epoch": run.steps_per_epoch, "precision": run.execution.precision.name,
                 "sync_bn": run.sync_bn, "initialisation": run.initialisation,
                 "config_hash": config.pretraining_hash(run.cfg), "pool": run.pool.record()}
    config.save(run.cfg, run.run_dir / CONFIG_FILE, recorded={"effective": effective})
    run.rows = run.rows[:epochs_done]
    rewrite_metrics(run.run_dir, run.rows)
    log.info("%s: BYOL pretraining of a resnet%d (%s) on %d photos (%s), %d process(es) on %s, precision %s",
             run.run_dir, run.cfg.model.depth, run.initialisation, len(run.pool.paths),
             "; ".join(f"{s['root']}:{s['split']} {s['images']}" for s in run.pool.record()), run.info.world_size,
             run.info.device, run.execution.precision.name)
    log.info("learning rate %.4g (%s), %d steps an epoch, target decay %g -> 1; %s", run.lr, run.lr_rule,
             run.steps_per_epoch, run.cfg.pretrain.target_decay, run.sync_bn)


def start_tracking(run: Pretraining) -> Tracker:
    w = run.cfg.wandb
    settings = TrackingSettings(w.mode, w.project, w.entity, w.group, w.name, job_type="pretrain",
                                tags=("pretrain", f"resnet{run.cfg.model.depth}", run.initialisation,
                                      *filter(None, w.tags.split(","))), init_timeout=w.init_timeout)
    return Tracker(settings, run.run_dir, run.wandb_id or new_run_id(),
                   {**run.cfg.to_dict(), "pool": run.pool.record()}, run.info.is_main)


def fit(run: Pretraining) -> dict | None:
    """The epoch loop; rank 0 returns the backbone's record. A signal stops it after a checkpoint (RunStopped);
    a collapse stops it with one line (CollapseError), the last healthy checkpoint kept."""
    info, pre = run.info, run.cfg.pretrain
    epochs_done, position = resume(run)
    distributed.rank0_writes("the pretraining folder", lambda: start_run_folder(run, epochs_done), info.is_main)
    tracker = start_tracking(run) if info.is_main else None
    run.wandb_id = tracker.run_id if tracker is not None else None
    try:
        with StopSignals() as signals:
            boundary = StepBoundary(run.cfg.train.checkpoint_every_minutes, signals, info.is_main)
            for epoch in range(epochs_done, pre.epochs):
                row = train_epoch(run, epoch, position if position and position.epoch == epoch else None, boundary)
                if not (math.isfinite(row["loss"]) and math.isfinite(row["spread"])):
                    raise NonFiniteError(f"pretraining epoch {epoch + 1}: a non-finite loss or output ({row['loss']:.4g}); "
                                         f"the last checkpoint is kept. Try a lower pretrain.lr_base (now "
                                         f"{pre.lr_base:g}) or train.amp=off")
                try:
                    raise_if_collapsed(row["spread"], pre.projection_dim, pre.collapse_below,
                                       (epoch + 1) * run.steps_per_epoch)
                except CollapseError as exc:
                    if info.is_main:  # the figure with the collapsed epoch (no checkpoint holds it)
                        write_health(run, [*run.rows, row])
                    raise CollapseError(f"{exc} (epoch {epoch + 1}; the last healthy checkpoint is kept)") from None
                record_epoch(run, row, tracker)
                boundary.checkpointed()
                decision = boundary.settle()
                if decision.stop_signal:
                    raise RunStopped(decision.stop_signal, f"after pretraining epoch {epoch + 1}")
            return distributed.rank0_writes("the backbone", lambda: finish(run, tracker), info.is_main)
    finally:
        if tracker is not None:
            tracker.finish()


def finish(run: Pretraining, tracker: Tracker) -> dict:
    """Rank 0 after the last epoch: backbone.pt, backbone.json, summary.json, the health figure, W&B's summary."""
    saved = write_backbone(run)
    write_health(run, run.rows)
    summary = {"run": run.run_dir.name, "kind": "pretraining", **saved, "rows": len(run.rows),
               "pretraining_seconds": sum(r["epoch_seconds"] for r in run.rows)}
    write_text(run.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    drop_previous_checkpoint(run.run_dir)
    if tracker.active:
        tracker.update_summary({"final_loss": saved["final_loss"], "final_spread_x_sqrt_d": saved["final_spread_x_sqrt_d"],
                                "cpu_hours": saved["cpu_hours"], "gpu_hours": saved["gpu_hours"]})
    return saved


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
        initialisation_of(cfg.model.weights)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        return 0

    def work(info: DistInfo) -> int:
        announce_launch(log, Path(cfg.output.dir), args.config, args.overrides, info)
        started = time.perf_counter()
        try:
            saved = fit(build(cfg, info))
        except RunStopped as stop:
            log.warning("%s", stop)
            return stop.exit_code
        if saved:
            print(f"{Path(cfg.output.dir) / BACKBONE_FILE}: resnet{saved['depth']} {saved['initialisation']} backbone, "
                  f"{saved['epochs']} epochs on {saved['images']} photos, final loss {saved['final_loss']:.4f}, spread x "
                  f"sqrt(d) {saved['final_spread_x_sqrt_d']:.3f}, {time.perf_counter() - started:.0f} s; fine-tune it "
                  f"with model.weights={Path(cfg.output.dir) / BACKBONE_FILE}", flush=True)
        return 0
    return distributed.run_entry(work, device=cfg.train.device)
