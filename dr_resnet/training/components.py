"""The parts a run is made of, each built from the config in one place: the datasets and their loaders,
the head, the model, the execution the loops run on (device, precision, augmentation, memory layout) and
the optimisation (optimizer, learning-rate schedule, loss scaler). ``train.build`` puts them together
for training; ``evaluate`` builds the same head, model and execution around a saved checkpoint.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dr_resnet import config, patients, processes
from dr_resnet.config import Config, ConfigError, DataConfig, TrainConfig
from dr_resnet.data import check, stage
from dr_resnet.data.augment import DeviceAugment
from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.data.formats import DatasetError, TableOptions
from dr_resnet.data.samplers import DistributedBalancedSampler, EpochSampler, ProgressiveSampler, ShuffledSampler
from dr_resnet.data.split import holdout_mask, nested_share
from dr_resnet.errors import USER_ERRORS
from dr_resnet.model.heads import Head, head_for
from dr_resnet.model.resnet import build_resnet
from dr_resnet.seeds import derive_seed
from dr_resnet.training import checkpoint, distributed
from dr_resnet.training.average import ExponentialAverage
from dr_resnet.training.distributed import DistInfo
from dr_resnet.training.loop import Execution, ShardSampler
from dr_resnet.training.runtime import CONSERVATIVE, Precision, resolve_precision

log = logging.getLogger(__name__)


# -- data ----------------------------------------------------------------------------------------------

@dataclass
class Datasets:
    train: RetinopathyDataset
    test: RetinopathyDataset
    val: RetinopathyDataset | None  # the held-out part of the training split (data.val_fraction)
    skipped: list[dict] = field(default_factory=list)  # photos data.bad_images=skip left out (check.screen)

    def patient_overlap(self) -> dict:
        """patients.overlap of these splits: the patients shared between training, held-out part and test."""
        return patients.overlap(self.train.patients, self.test.patients, self.val.patients if self.val else (),
                                self.train.patient_source)


def staged_root(d: DataConfig, local_rank: int) -> Path:
    """data.root's node-local copy (data.stage_to): each node's leader makes or finds it, and every process
    waits for every node's (distributed.once_a_node: its own deadline, data.stage_timeout_minutes, never a
    collective's) and reads the folder its leader names, without listing the source itself."""
    stage.stage_base(d.stage_to)  # a bad folder: the same line from every process at once, none left waiting

    def copy() -> str:
        staged = stage.stage(d.root, d.stage_to)
        log.info("data.stage_to: %s", staged.said)
        return str(staged.path)
    return Path(distributed.once_a_node(f"the copy of {d.root} in data.stage_to={d.stage_to}", copy, local_rank,
                                        d.stage_timeout_minutes, "data.stage_timeout_minutes"))


def datasets(cfg: Config, root: str | os.PathLike | None = None) -> Datasets:
    """The training and test splits, every photo checked (data.bad_images), and the held-out part: the
    dataset's own validation split with data.val_split, else part of training (whole patients,
    stratified by grade, drawn by data.split_seed: the same images whatever train.seed) when
    data.val_fraction > 0 and it would hold at least data.min_val_images; below that, a warning names
    the sizes and nothing is held out (the final epoch is then the run's result). `root`: where to read
    data.root's files from instead (its staged copy, data.stage_to). The processes of a run share the
    photo check out, and every one ends with the same sets or stops with one line (same_everywhere)."""
    d = cfg.data
    options = TableOptions.of(d)
    read = read_everywhere(lambda: {
        name: RetinopathyDataset(root or d.root, split, format=d.format, image_size=d.image_size, options=options)
        for name, split in (("train", d.train_split), ("test", d.test_split), ("val", d.val_split)) if split})
    checked, skipped = check.screen(read, d.bad_images, max(1, d.workers), d.image_size,
                                    "Replace or remove them, or set data.bad_images=skip to train and test without them "
                                    "(they are then named in the log, summary.json and the report)", log,
                                    source=d.root, ranks=check_ranks())
    built = held_out_and_share(cfg, checked, skipped)
    same_everywhere({"training": built.train, "held-out": built.val, "test": built.test})
    return built


def held_out_and_share(cfg: Config, checked: dict[str, RetinopathyDataset], skipped: list[dict]) -> Datasets:
    """The checked splits made into the run's datasets: the held-out part (the dataset's own or drawn from
    training) and data.train_fraction of the rest (see datasets)."""
    d = cfg.data
    train, test = checked["train"], checked["test"]
    if d.val_split:  # the dataset's own validation split (DDR's valid): whole, as its publisher drew it
        log.info("held-out part: the '%s' split (%d images); data.val_fraction is not used", d.val_split,
                 len(checked["val"]))
        return Datasets(share_of(train, d), test, checked["val"], skipped)
    if d.val_fraction <= 0:
        return Datasets(share_of(train, d), test, None, skipped)
    held_out = holdout_mask(train.patients, train.labels, d.val_fraction, d.split_seed)
    if held_out.sum() < d.min_val_images:
        if config.needs_held_out(cfg):
            raise ConfigError(f"{config.needs_held_out(cfg)} fits on the held-out part, but data.val_fraction="
                              f"{d.val_fraction:g} holds out {held_out.sum()} of the {len(train)} training images in "
                              f"{d.root}, fewer than data.min_val_images={d.min_val_images}: raise data.val_fraction")
        log.warning("data.val_fraction=%g would hold out %d of the %d training images in %s, fewer than "
                    "data.min_val_images=%d: nothing is held out, and the final epoch is the result",
                    d.val_fraction, held_out.sum(), len(train), d.root, d.min_val_images)
        return Datasets(train, test, None, skipped)
    if held_out.all():
        raise ConfigError(f"data.val_fraction={d.val_fraction} holds out all {len(train)} training images in {d.root}: "
                          f"choose a fraction that leaves images to train on")
    return Datasets(share_of(train.subset(~held_out, d.train_split), d), test,
                    train.subset(held_out, f"{d.train_split}:held-out"), skipped)


class DatasetsDifferError(DatasetError):
    """The processes of a run hold different datasets, or one could not read its own."""


def check_ranks() -> check.Ranks:
    """The photo check shared out over every process of the run (check.Ranks), or this one alone."""
    rank, size = distributed.rank_and_size()
    return check.Ranks(rank, size, distributed.all_gather_objects) if size > 1 else check.Ranks()


def read_everywhere(read: Callable[[], dict[str, RetinopathyDataset]]) -> dict[str, RetinopathyDataset]:
    """`read()`'s datasets (name -> dataset), read by every process, which stop together (same_everywhere)
    where any could not read them or they differ: before a collective would leave the others waiting."""
    try:
        parts = read()
    except USER_ERRORS as exc:
        same_everywhere({}, exc)
        raise
    same_everywhere(parts)
    return parts


def same_everywhere(parts: dict[str, RetinopathyDataset | None], failure: BaseException | None = None) -> None:
    """Every process holds the same images with the same grades in each part (name -> dataset; None: no
    such part), compared by count and a hash of the images' names and grades (check.fingerprint), or every
    one stops with one line: what nodes that staged different copies, or a rank that left out other photos,
    would otherwise train on (DDP waits forever or averages different samples). A process that could not
    read its datasets (`failure`) stops the others with its line. A no-op in a world of one."""
    if not distributed.is_distributed():
        return
    mine = {name: check.fingerprint(p) for name, p in parts.items() if p is not None}
    every = distributed.all_gather_objects((" ".join(str(failure).split()) if failure else "", mine,
                                            distributed.node_key()))
    if failure is not None:
        return  # the caller raises its own error
    for rank, (line, _, node) in enumerate(every):
        if line:
            raise DatasetsDifferError(f"rank {rank} ({node}) could not read its dataset: {line}")
    _, first, first_node = every[0]
    for rank, (_, theirs, node) in enumerate(every):
        for name in sorted(set(first) | set(theirs), key=list(parts).index):
            if first.get(name) != theirs.get(name):
                (n0, _), (n, _) = first.get(name, (0, "")), theirs.get(name, (0, ""))
                how = f"{n} images on rank {rank} ({node}), {n0} on rank 0 ({first_node})" + \
                    (" but not the same images or grades" if n == n0 else "")
                raise DatasetsDifferError(f"the processes hold different {name} sets: {how}. Every process must read "
                                          f"the same dataset: a node's staged copy (data.stage_to) or the tables it "
                                          f"reads differ from the others'; start again once they agree")


def share_of(train: RetinopathyDataset, d: DataConfig) -> RetinopathyDataset:
    """data.train_fraction of the training patients (split.nested_share: nested across fractions, drawn
    after the held-out part, so that part is the same at every fraction); the whole set at 1."""
    if d.train_fraction >= 1:
        return train
    kept = nested_share(train.patients, train.labels, d.train_fraction, d.split_seed)
    log.info("data.train_fraction=%g: training on %d of %d images (%d of %d patients, nested by data.split_seed=%d)",
             d.train_fraction, kept.sum(), len(train), len({p for p, k in zip(train.patients, kept) if k}),
             len(set(train.patients)), d.split_seed)
    return train.subset(kept, f"{train.split}:{d.train_fraction:g}")


def training_loader(dataset: RetinopathyDataset, cfg: Config, info: DistInfo
                    ) -> tuple[DataLoader, EpochSampler]:
    """The shuffled (or grade-balanced) loader of this rank's share, and its sampler (set_epoch each epoch,
    with a start position when resuming in the middle of one)."""
    d, t = cfg.data, cfg.train
    if len(dataset) < t.batch_size * info.world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} x {info.world_size} process(es) is more than the "
                          f"{len(dataset)} training images in {d.root}: lower train.batch_size")
    # drop_last twice: the sampler trims the epoch to a multiple of the world size, the loader drops
    # a last short batch, so BatchNorm never sees a batch of one.
    if t.sampler == "progressive":
        sampler = ProgressiveSampler(dataset.labels, t.epochs, t.natural_from, info.world_size, info.rank, seed=t.seed)
    elif t.sampler == "balanced":
        sampler = DistributedBalancedSampler(dataset.labels, info.world_size, info.rank, seed=t.seed)
    else:
        sampler = ShuffledSampler(dataset.labels, info.world_size, info.rank, seed=t.seed)
    # Only the training loader keeps its workers between epochs: the evaluation loaders run once an
    # epoch and would otherwise hold data.workers idle processes each, per GPU.
    loader = DataLoader(dataset, t.batch_size, sampler=sampler, drop_last=True, num_workers=d.workers,
                        pin_memory=info.device.type == "cuda", persistent_workers=d.workers > 0,
                        generator=torch.Generator(), **worker_start(d.workers))
    return loader, sampler


def evaluation_loader(dataset: RetinopathyDataset, batch_size: int, workers: int, info: DistInfo) -> DataLoader:
    """Every image once across the ranks, in the split's order (ShardSampler); its workers leave the stop
    signals to the training process too (a signal during evaluation: the epoch's checkpoint still comes)."""
    return DataLoader(dataset, batch_size, num_workers=workers, pin_memory=info.device.type == "cuda",
                      sampler=ShardSampler(len(dataset), info.rank, info.world_size), **worker_start(workers))


def worker_start(workers: int) -> dict:
    """A DataLoader's worker options: started by this process's fork server (dr_resnet.processes: never by
    forking the threaded training process), leaving the stop signals to it."""
    if workers <= 0:
        return {}
    return {"multiprocessing_context": processes.context(),
            "worker_init_fn": functools.partial(processes.leave_stop_signals_to, os.getpid())}


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Inverse frequency, scaled so a balanced set gets 1 per class (scikit-learn's 'balanced');
    a class absent from training gets 0."""
    counts = counts.astype(np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


# -- head, model, execution ------------------------------------------------------------------------------

def head(cfg: Config, train: RetinopathyDataset | None, device: torch.device) -> Head:
    """The head cfg.model.head names, with the loss weights of train.class_weights computed on `train`
    (None, as at evaluation: unweighted)."""
    weight = None
    if train is not None and cfg.train.class_weights == "balanced":
        weight = class_weights(train.class_counts).to(device)
    return head_for(cfg, weight, device)


def execution(amp: str, device: torch.device, data: DataConfig | None = None, channels_last: bool = True,
              key: str = "train.amp") -> Execution:
    """The precision train.amp (or --amp: `key` names it in errors) gives on `device`; channels_last on
    CUDA only; training's rotation and flips from `data` (None: evaluation, normalisation only)."""
    layout = channels_last and device.type == "cuda"
    augment = DeviceAugment(data.max_rotation, data.flips, channels_last=layout) if data else DeviceAugment(channels_last=layout)
    return Execution(device, resolve_precision(amp, device, key=key), augment)


def agreed(execution: Execution, is_main: bool) -> Execution:
    """The execution with one precision on every rank: train.amp=auto chooses per GPU, and DDP must never
    average fp16-scaled gradients with unscaled ones. Where the ranks chose differently, the most
    conservative of their choices (runtime.CONSERVATIVE), logged once by rank 0."""
    chosen = distributed.all_gather_objects(execution.precision.name)
    agreed_name = min(chosen, key=CONSERVATIVE.index)
    if len(set(chosen)) > 1 and is_main:
        log.warning("the processes chose different precisions (%s): every one runs %s",
                    ", ".join(f"rank {r} {name}" for r, name in enumerate(chosen)), agreed_name)
    return replace(execution, precision=Precision.named(agreed_name))


def model(cfg: Config, head: Head, execution: Execution, first_shares: np.ndarray | None = None,
          pretrained: bool = True) -> nn.Module:
    """The ResNet of cfg.model on the execution's device and memory layout, seeded by train.seed (the same
    initial weights on every rank); model.weights when `pretrained` (evaluation loads a checkpoint
    instead); a fresh output layer's bias from the head's prior on `first_shares`, the grade shares
    of the first training epoch (the sampler's grade_shares(0))."""
    torch.manual_seed(derive_seed(cfg.train.seed, "init"))
    weights = cfg.model.weights if pretrained and cfg.model.pretrained else None
    bias = head.start_bias(first_shares) if first_shares is not None else None
    network = build_resnet(cfg.model.depth, head.outputs, weights, cfg.model.zero_init_residual, bias).to(execution.device)
    return network.to(memory_format=torch.channels_last) if execution.channels_last else network


def no_buffer_broadcast() -> dict:
    """DDP's argument that stops it broadcasting buffers before each forward: SyncBatchNorm already keeps
    the statistics equal on every rank. Newer torch renamed it (the old name warns there)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


SYNC_BN_BELOW = 16  # images per GPU: BatchNorm's ImageNet error is flat from 32 down to 16 and rises below 8
# (Wu & He, "Group Normalization", 2018, figure 1); above it SyncBatchNorm only adds its per-layer exchanges


def sync_batchnorm(train: TrainConfig, world_size: int, cuda: bool) -> tuple[bool, str]:
    """Whether this run's BatchNorm layers share their statistics across its GPU processes, and why:
    train.sync_bn=true/false as asked (true also on one GPU, the code path of 64), auto on 2+ GPUs below
    SYNC_BN_BELOW images a GPU. Refuses train.sync_bn=true with compile."""
    gpus = f"{world_size} GPU process(es)"
    if not cuda:
        return False, "it needs CUDA; each process keeps its own BatchNorm statistics"
    if train.sync_bn and train.compile:
        raise ConfigError(f"train.compile=true with train.sync_bn=true on {gpus}: torch.compile breaks its graph at "
                          "every SyncBatchNorm layer (some torch versions crash there), which undoes what compiling is "
                          "for; set train.sync_bn=false or auto (each GPU keeps its own BatchNorm statistics: fine from "
                          f"about {SYNC_BN_BELOW} images a GPU) or train.compile=false")
    if train.sync_bn is not None:
        return train.sync_bn, f"train.sync_bn={str(train.sync_bn).lower()} on {gpus}"
    if world_size < 2:
        return False, "train.sync_bn=auto on one GPU: its BatchNorm sees the whole batch"
    small = train.batch_size < SYNC_BN_BELOW
    if small and train.compile:
        log.warning("train.sync_bn=auto: %d images a GPU is below %d, where SyncBatchNorm would help, but train.compile="
                    "true cannot have it; each GPU keeps its own BatchNorm statistics", train.batch_size, SYNC_BN_BELOW)
        return False, "train.sync_bn=auto with train.compile=true"
    return small, (f"train.sync_bn=auto on {gpus}: {train.batch_size} images a GPU is "
                   f"{'below' if small else 'at least'} {SYNC_BN_BELOW}")


def distributed_model(network: nn.Module, cfg: Config, info: DistInfo) -> nn.Module:
    """DDP over the process group (with SyncBatchNorm where `sync_batchnorm` says); the bare model alone
    in one process. The bare module is the wrapper's .module."""
    if not info.distributed:
        return network
    cuda = info.device.type == "cuda"
    sync_bn, why = sync_batchnorm(cfg.train, info.world_size, cuda)
    if cfg.model.freeze_backbone:  # frozen statistics have nothing to share (and its start's pass is per rank)
        sync_bn, why = False, ("model.freeze_backbone: the backbone's BatchNorm layers normalise with frozen "
                               "statistics in eval mode, with nothing to share")
    if sync_bn:
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        log.info("SyncBatchNorm on: %s; DDP does not broadcast buffers", why)
    else:
        log.info("SyncBatchNorm off: %s", why)
    return DistributedDataParallel(network, device_ids=[info.device.index] if cuda else None,
                                   **(no_buffer_broadcast() if sync_bn else {}))


# -- optimisation --------------------------------------------------------------------------------------

ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_RISE = 25.0, 1e4, 0.3  # torch's OneCycleLR defaults


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int):
    """Per-step learning-rate factor. none: constant; cosine: linear warm-up, then cosine decay to 0;
    onecycle: the one-cycle policy as torch's OneCycleLR (cosine annealing, learning rate only): from
    lr/25 up to lr over warmup_steps (default 30% of the run), then down to lr/25/1e4. A factor of the
    step (not a stateful scheduler), so a run extended with more epochs stretches its schedule."""
    def cosine(start: float, end: float, fraction: float) -> float:
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))

    rise = warmup_steps or round(ONECYCLE_RISE * total_steps)

    def factor(step: int) -> float:
        if scheduler == "none":
            return 1.0
        if scheduler == "onecycle":
            low = 1 / ONECYCLE_DIV
            if step <= rise - 1:
                return cosine(low, 1.0, step / max(1, rise - 1))
            return cosine(1.0, low / ONECYCLE_FINAL_DIV, (step - rise + 1) / max(1, total_steps - rise))
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def move_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, epochs_done: float, steps_per_epoch: int) -> bool:
    """Put a resumed schedule at `epochs_done` (fractional inside an epoch) in this run's steps: another
    number of processes changes the steps an epoch takes, while the scheduler counts the writer's steps
    (4 -> 2 GPUs after epoch 10 of 30: the cosine factor would jump from 0.75 to 0.93 and never reach 0).
    The learning rates follow; False when the count is already right (the same processes: nothing moves)."""
    step = round(epochs_done * steps_per_epoch)
    if step == scheduler.last_epoch:
        return False
    scheduler.last_epoch = step
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports, as a step() would have set it
    return True


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def sgd(parameters, lr: float, momentum: float, weight_decay: float, fused: bool) -> torch.optim.SGD:
    """SGD whose momentum buffers exist, zeroed, before the first step. Fused SGD otherwise allocates them
    uninitialised in its first step and returns early when that step is skipped (fp16's first overflow,
    train.nonfinite=skip): the next step would read that memory into the weights. A zero buffer gives the
    same first update bit for bit (0 x momentum + gradient)."""
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                **({"fused": True} if fused else {}))
    zero_momentum(optimizer)
    return optimizer


def zero_momentum(optimizer: torch.optim.Optimizer) -> None:
    """A zero momentum buffer for every parameter that has none yet (see sgd)."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            for p in group["params"]:
                if optimizer.state[p].get("momentum_buffer") is None:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


PROCESS_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how this process runs the update


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A checkpoint's optimizer state, keeping how this process runs the update: load_state_dict would
    take the writer's flags (a CPU checkpoint resumed on CUDA: fused off while the optimizer still takes
    GradScaler's found_inf, which then fails). Momentum buffers the checkpoint lacks start at zero."""
    flags = [{k: g[k] for k in PROCESS_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
    zero_momentum(optimizer)
    relay_like_parameters(optimizer)


def relay_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Each state tensor shaped like its parameter laid out like it: load_state_dict moves a buffer with
    .to(device) and keeps the writer's layout, so a CPU (NCHW) checkpoint resumed with channels_last, or
    with train.channels_last changed, gives momentum strides unlike the gradient's. Fused SGD then fails
    on CUDA, and on CPU silently mixes elements up (the update is wrong)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def weight_average(network: nn.Module, decay: float) -> ExponentialAverage | None:
    """train.ema: an exponential moving average of the weights and of the BatchNorm statistics, updated
    after every step; None when decay is 0."""
    return ExponentialAverage(network, decay) if decay > 0 else None


def optimisation(t: TrainConfig, lr: float, network: nn.Module, steps_per_epoch: int, execution: Execution,
                 probe: bool = False) -> Optimisation:
    """SGD with learning rate `lr` (config.learning_rate's), train's momentum and weight decay, its
    per-step schedule, and a loss scaler that is on for fp16 only. Fused SGD on CUDA: one kernel for the
    update, and fp16's GradScaler checks for inf/NaN on the GPU instead of reading a flag back to the
    host every step. The optimizer holds the parameters that train (a linear probe's output layer alone:
    probe.freeze_backbone); a probe (`probe`) trains without weight decay, as the common linear-evaluation
    protocols (MoCo's) do, so that its score is the features' and not the penalty's."""
    optimizer = sgd([p for p in network.parameters() if p.requires_grad], lr, t.momentum,
                    0.0 if probe else t.weight_decay, fused=execution.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.scheduler, round(t.warmup_epochs * steps_per_epoch), t.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(execution.device.type, enabled=execution.precision.needs_scaler)
    return Optimisation(optimizer, scheduler, scaler)


@dataclass
class TrainedModel:
    """A training checkpoint made ready to evaluate or serve: its state and config, its head with its
    fitted state (thresholds, temperature), its network in eval mode, the execution evaluation uses."""

    state: checkpoint.TrainingState
    cfg: Config
    head: Head
    network: nn.Module
    execution: Execution


def trained_model(path: str | os.PathLike, device: torch.device, amp: str = "auto", key: str = "--amp") -> TrainedModel:
    """THE way a saved training state becomes a model (evaluate, grading and so predict, export, gallery):
    built as training built it (channels_last and autocast on CUDA), never with pretrained weights."""
    state = checkpoint.TrainingState.load(path)
    cfg = config.from_dict(state.config)
    run = execution(amp, device, key=key)
    trained_head = head(cfg, None, device)
    trained_head.load_state(state.head)
    network = model(cfg, trained_head, run, pretrained=False)
    network.load_state_dict(state.weights())
    return TrainedModel(state, cfg, trained_head, network.eval(), run)
