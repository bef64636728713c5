"""Typed run configuration: the dataclasses hold every default; YAML files override them; command-line
``section.key=value`` overrides come last. Unknown keys and bad values are errors naming the key.

    --config configs/resnet50_pretrained.yaml train.epochs=40 data.root=/data/eyepacs_512

A YAML file may start from another with ``inherit: base.yaml`` (a path relative to the file).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import textwrap
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dr_resnet.errors import UserError
from dr_resnet.registry import DEPTHS, FORMAT_CHOICES, HEAD_SPECS, HEADS, NONFINITE

log = logging.getLogger(__name__)
SAVED = "saved config"  # the origin of a config read back from a run (no warnings for its old key names)
COMMAND_LINE = "command line"  # the origin of section.key=value overrides


# The allowed values of every key that has a fixed set: the field's type says them, and validation, the
# CLIs' choices (runtime.DEVICES, PRECISIONS, rundir.SELECT_BY, tracking.MODES) and CHOICES read them here.
Depth = Literal[DEPTHS]  # registry.ARCHITECTURES
HeadKind = Literal[HEADS]  # heads.HEAD_TYPES
DataFormat = Literal[FORMAT_CHOICES]  # formats.SplitLayout
NonFinite = Literal[NONFINITE]  # loop.Trainer
RegressionLoss = Literal["mse", "smooth_l1"]
StepsAtFraction = Literal["fewer", "same"]
FitThresholds = Literal["train", "val", "batches", "none"]
Scheduler = Literal["none", "cosine", "onecycle"]
Amp = Literal["auto", "off", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
ClassWeights = Literal["none", "balanced"]
SelectBy = Literal["qwk", "accuracy", "loss"]
Sampler = Literal["progressive", "random", "balanced"]
Calibration = Literal["none", "temperature"]
BadImages = Literal["stop", "skip"]  # data/check.py
Resume = Literal["auto", "never", "must"]
WandbMode = Literal["online", "offline", "disabled"]
PretrainMethod = Literal["byol"]  # pretraining/byol.py


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key (and file)."""


HELP = "help"  # the metadata entry of a config key's help text


def setting(default: Any, text: str) -> Any:
    """A config key's field: its default and its help, kept in the declaration's metadata, where `train
    --help`, `launch.sweep --help` and docs/reference/config.md read it (key_help): no source parsing, so the
    help is there wherever the code runs."""
    return field(default=default, metadata={HELP: text})


@dataclass
class ModelConfig:
    depth: Depth = setting(18, "18, 34 (BasicBlock), 50, 101, 152 (Bottleneck): registry.ARCHITECTURES")
    weights: str = setting("none", "none (or scratch) | imagenet | path to a state dict, checkpoint or backbone.pt "
                                   "(python -m dr_resnet.pretrain's) | ssl, imagenet+ssl (launch.sweep's arms: it "
                                   "pretrains the backbone). Pretraining itself starts from none or imagenet only")
    zero_init_residual: bool = setting(True, "each residual block's last BatchNorm weight starts at 0, so every block starts as "
                                             "the identity (Goyal et al. 2017; torchvision's reference recipes): gradients 22x "
                                             "smaller at the start for ResNet50 from scratch. Loaded weights (model.weights) "
                                             "replace it: no effect on pretrained arms")
    head: HeadKind = setting("classification", 'classification (5 grades, cross-entropy) | regression (1 output, thresholds; '
                                               'its settings: the regression section) | ordinal (4 "grade > k" outputs, binary '
                                               'cross-entropies, consistent decoding)')
    freeze_backbone: bool = setting(False, "the linear probe, the standard check of what a backbone learned: only the output "
                                           "layer (fc.*) trains, the backbone's weights and BatchNorm statistics stay as "
                                           "loaded (its BatchNorm in eval mode), at train.lr_base_probe's rate without "
                                           "weight decay. A random backbone (model.weights=none) first re-estimates its "
                                           "BatchNorm statistics on the training images, once at the run's start")

    @property
    def pretrained(self) -> bool:
        """Whether it loads weights (any initialisation but scratch): is_pretrained."""
        return is_pretrained(self.weights)

    @property
    def initialisation(self) -> str:
        """How it starts (INITIALISATIONS), by recorded_initialisation."""
        return recorded_initialisation(self.weights)

    @property
    def arm(self) -> str:
        """The arm of the core experiment this model is: resnet18_scratch, resnet50_pretrained, resnet18_ssl, ..."""
        return f"resnet{self.depth}_{self.initialisation}"


SCRATCH_WEIGHTS = ("", "none", "scratch")  # model.weights that mean "from scratch" (validation writes them "none")
# How an arm starts, as arm names, tags and tables say it, in the order the report lists them: random weights;
# ImageNet's (its old name, so that old runs read as before); a backbone pretrained self-supervised on fundus
# photos from random weights; the same started from ImageNet's (as RETFound was).
INITIALISATIONS = ("scratch", "pretrained", "ssl", "imagenet+ssl")
BACKBONE_SIDECAR = ".json"  # a backbone file's record beside it: backbone.pt -> backbone.json


def is_pretrained(weights: str) -> bool:
    """Whether model.weights loads weights (imagenet, or a file) rather than training from scratch. Which
    initialisation the loaded weights are (the arm's name, its learning rate) is recorded_initialisation's."""
    return str(weights).strip().lower() not in SCRATCH_WEIGHTS


def backbone_record(weights: str) -> dict | None:
    """The record beside a weights file (its sidecar, the file's name with BACKBONE_SIDECAR's suffix, which
    `python -m dr_resnet.pretrain` writes: "initialisation" and "pretraining"), None where there is none
    (scratch, imagenet, a file without one). Torch-free, so that config, results and launch read it alike."""
    text = str(weights).strip()
    if not is_pretrained(text) or text.lower() == "imagenet":
        return None
    sidecar = Path(text).with_suffix(BACKBONE_SIDECAR)
    if not sidecar.is_file():
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{sidecar}: the record beside model.weights={text} is not readable JSON ({exc}): "
                          f"write it again or move it aside") from None
    if not isinstance(record, dict):
        return None
    found = record.get("initialisation")
    if found is not None and found not in INITIALISATIONS:
        raise ConfigError(f"{sidecar}: initialisation {found!r} is not one of {', '.join(INITIALISATIONS)}")
    return record


def recorded_initialisation(weights: str) -> str:
    """THE rule for how an arm starts (INITIALISATIONS): none -> scratch; imagenet -> pretrained; a file whose
    sidecar (backbone_record) names its initialisation -> that one (ssl, imagenet+ssl); any other file ->
    pretrained (a file of unknown origin reads as ImageNet-like weights, as before there were others)."""
    if not is_pretrained(weights):
        return "scratch"
    record = backbone_record(weights) or {}
    return record.get("initialisation") or "pretrained"


def initialisation_record(weights: str) -> dict[str, Any]:
    """What a run records of how it started (summary.json and config.yaml's `effective`): its initialisation
    and, for a backbone file with a sidecar, the sidecar's "pretraining" record (method, pool, compute, ...)."""
    record = backbone_record(weights) or {}
    found = {"initialisation": recorded_initialisation(weights)}
    if record:  # backbone.json is the pretraining's record itself (pretraining/run.py's record)
        found["pretraining"] = record
    return found


def normalised_weights(weights: str) -> str:
    """model.weights as every reader sees it: "none" for any spelling of scratch, "imagenet" and launch.sweep's
    keywords (SWEEP_BACKBONES) in any case, else the path as given."""
    text = str(weights).strip()
    if not is_pretrained(text):
        return "none"
    if text.lower() in SWEEP_BACKBONES:
        return text.lower()
    return "imagenet" if text.lower() == "imagenet" else text


@dataclass
class RegressionConfig:
    """The regression head's settings (model.head=regression); the other heads have none."""

    loss: RegressionLoss = setting("mse", "mse | smooth_l1 (mse by principle: QWK charges an error by its squared grade "
                                          "distance, and squared error is the loss whose minimiser, the conditional mean grade, "
                                          "that charge rewards)")
    fit_thresholds: FitThresholds = setting("train", "after each epoch re-fit the grade thresholds for QWK on train (an "
                                                     "eval-mode pass over the training images) | val (the held-out part, "
                                                     "data.val_fraction) | batches (the epoch's augmented training outputs: no "
                                                     "extra pass) | none (keep 0.5, 1.5, 2.5, 3.5)")


@dataclass
class DataConfig:
    root: str = setting("data/synthetic_128", "the dataset folder (a format below; python -m dr_resnet.preprocess writes one)")
    format: DataFormat = setting("auto", "auto (lab, kaggle, aptos or folders, detected) | lab | kaggle | aptos | folders "
                                         "({split}/{grade}/ image folders) | csv (any table: the keys below) | eyepacs | idrid "
                                         "| messidor2 | ddr (those datasets as shipped); docs/reference/files.md says each "
                                         "layout")
    train_split: str = setting("train", "the split trained on (and its held-out part)")
    test_split: str = setting("test", "the split every epoch is tested on (never chosen on)")
    train_csv: str = setting("", "csv format: the training split's table (relative to data.root)")
    test_csv: str = setting("", "csv format: the test split's table (relative to data.root)")
    train_images: str = setting("", "csv format: the training split's image folder (relative to data.root; '' : the root)")
    test_images: str = setting("", "csv format: the test split's image folder (relative to data.root; '' : the root)")
    image_column: str = setting("image", "csv format: the column of image names (with or without extension)")
    label_column: str = setting("level", "csv format: the column of grades (0..4, or labels data.label_map maps)")
    image_suffix: str = setting("", "csv format: the extension of names given without one, e.g. .jpg (others are tried too)")
    patient_column: str = setting("", "any table format: the column naming each image's patient ('' : from the name, "
                                      "<patient>_left|right, else each image its own patient); the split, held-out part and "
                                      "bootstrap keep patients whole")
    filter: str = setting("", "any table format: only rows with column=value (several: comma-separated, all must hold), e.g. "
                              "adjudicated_gradable=1; the count left out is logged")
    label_map: str = setting("", "any table format: the dataset's labels as grades, label=grade pairs (comma-separated); a "
                                 "label mapped to drop leaves its rows out (counted in the log), e.g. 5=drop")
    image_size: int = setting(512, "pixels a side the network sees (photos are resized to it)")
    bad_images: BadImages = setting("stop", "photos that cannot be decoded to their last byte, or are blank, found at start "
                                            "(checked once, cached per file): stop (an error naming every one) | skip (train "
                                            "and test without them, named in the log, summary.json and the report)")
    stage_to: str = setting("", "copy the prepared dataset once per node to this node-local folder at job start and read it "
                                "there (an absolute path, e.g. /dev/shm or '$TMPDIR': variables expanded on the node); a later "
                                "job finds an unchanged copy and starts at once; `python -m dr_resnet.stage --clean DIR "
                                "--older-than DAYS` removes old copies")
    stage_timeout_minutes: float = setting(120.0, "how long a process waits for its node's copy (data.stage_to) before it "
                                                  "stops: long enough for EyePACS' 88k photos from a busy shared file system; "
                                                  "the wait is on the process group's store, not in a collective, so the "
                                                  "process group's timeout does not apply to it")
    workers: int = setting(4, "data-loading processes per training process")
    max_rotation: float = setting(180.0, "degrees, random rotation within +-max_rotation (on the device); 180: any angle, since "
                                         "a fundus photo's orientation carries no grade")
    flips: bool = setting(True, "random horizontal and vertical flips (on the device)")
    val_fraction: float = setting(0.1, "hold out this share of the training split (whole patients, stratified by grade): the "
                                       "epoch is chosen on it (train.select_by), the temperature (and "
                                       "regression.fit_thresholds=val) fitted on it. 0, or a held-out part under "
                                       "min_val_images: nothing is chosen, the final epoch is the result")
    val_split: str = setting("", "an official validation split as the held-out part (DDR's valid), instead of data.val_fraction "
                                 "of the training split ('' : the fraction)")
    min_val_images: int = setting(50, "a held-out part smaller than this would choose epochs by noise: nothing is held out then "
                                      "(a warning names the sizes), unless something must be fitted there (an error then)")
    split_seed: int = setting(0, "which patients are held out: its own seed, so train.seed varies the training, not the data")
    train_fraction: float = setting(1.0, "train on this share of the training patients (after the held-out part is drawn), "
                                         "drawn by data.split_seed, stratified by each patient's worse grade and nested: a "
                                         "smaller share's patients are all in every larger share's, and the held-out part is "
                                         "the same at every share (learning curves over data)")


@dataclass
class TrainConfig:
    epochs: int = setting(30, "a larger value in a resumed run extends it")
    length: float = setting(1.0, "a multiple of the schedule: train.epochs (rounded) and train.warmup_epochs are multiplied by "
                                 "it when the config is read, so warm-up and decay stretch with the run (learning curves over "
                                 "training length); config.yaml keeps the epochs as given and the multiple (the report groups "
                                 "runs by it), `effective` the result")
    steps_at_fraction: StepsAtFraction = setting("fewer", "with data.train_fraction < 1: fewer (the epochs as set: a tenth of "
                                                          "the data is a tenth of the optimizer steps) | same (epochs and "
                                                          "warm-up multiplied by 1 / data.train_fraction: the same steps at "
                                                          "every fraction, a constant-step learning curve)")
    batch_size: int = setting(32, "per process: the global batch is batch_size x processes")
    eval_batch_size: int = setting(0, "per process; 0 means 2 x batch_size")
    lr: float | None = setting(None, "auto (None): the linear-scaling rule, lr_base_* x global batch / lr_base_batch, with the "
                                     "rate of the run's initialisation; a number: that learning rate, whatever the batch")
    lr_base_scratch: float = setting(0.1, "per lr_base_batch images of global batch, for a network trained from scratch")
    lr_base_pretrained: float = setting(0.01, "the same for a network started from ImageNet's weights (the pretrained "
                                              "initialisation; fine-tuning: a tenth)")
    lr_base_ssl: float = setting(0.01, "the same for a network started from an in-domain self-supervised backbone (the ssl "
                                       "and imagenet+ssl initialisations): ImageNet fine-tuning's rate, a starting point for "
                                       "--tune, not measured here")
    lr_base_probe: float = setting(0.1, "the same for a linear probe (model.freeze_backbone): its own rate, a starting point "
                                        "for --tune, not measured here")
    lr_base_batch: int = setting(256, "the linear-scaling rule's reference batch (Goyal et al. 2017)")
    momentum: float = setting(0.9, "SGD's")
    weight_decay: float = setting(5e-4, "SGD's L2 penalty")
    scheduler: Scheduler = setting("cosine", "none | cosine (linear warm-up, cosine to 0) | onecycle (lr/25 up to lr, down to "
                                             "lr/25e4)")
    warmup_epochs: float = setting(5.0, "cosine: linear warm-up; onecycle: the rising part (0: 30% of the run)")
    device: Device = setting("auto", "auto (one GPU per process if CUDA is there, else CPU) | cpu (gloo, even on a GPU box) | "
                                     "cuda")
    amp: Amp = setting("auto", "auto (bf16 on GPUs with native bf16, fp16 + GradScaler on older ones, fp32 on CPU) | off | bf16 "
                               "| fp16")
    sync_bn: bool | None = setting(None, "SyncBatchNorm across GPU processes (CUDA only). auto (None): on 2+ GPUs when each "
                                         "GPU's batch is below 16 images, where per-GPU statistics get noisy; true | false "
                                         "force it")
    channels_last: bool = setting(True, "CUDA only")
    cudnn_benchmark: bool = setting(True, "cuDNN picks the fastest kernels for the fixed input size (CUDA only)")
    deterministic: bool = setting(False, "deterministic CUDA kernels where PyTorch has them (slower; cudnn_benchmark off)")
    compile: bool = setting(False, "torch.compile the model for training and evaluation")
    seed: int = setting(0, "the training's randomness (initial weights, order, augmentation); not the held-out split's")
    class_weights: ClassWeights = setting("none", "none | balanced (inverse class frequency in the loss)")
    clip_grad_norm: float = setting(5.0, "clip the gradients' global norm to this (0: off): a guard against spikes, above the "
                                         "usual norm (at 1.0 it clipped every demo step, which slowed ResNet50 most); the norm "
                                         "before clipping is logged per epoch (grad_norm_mean, grad_norm_max, clipped_share)")
    sampler: Sampler = setting("progressive", "progressive (grades near-uniform at first, the natural distribution from "
                                              "natural_from of the run on) | random (DistributedSampler's order) | balanced "
                                              "(every grade equally likely)")
    natural_from: float = setting(0.6, "progressive: the share of the run by which sampling reaches the natural distribution")
    select_by: SelectBy = setting("qwk", 'the selected epoch (checkpoint_best.pt, summary "selected"), on the held-out part: '
                                         'qwk | accuracy | loss. Without a held-out part the final epoch is the result')
    log_every: int = setting(20, "batches between progress-bar updates of loss/accuracy")
    checkpoint_every_minutes: float = setting(20.0, "a resumable checkpoint inside an epoch after this long (0: at epoch ends "
                                                    "only)")
    resume: Resume = setting("auto", "a checkpoint in output.dir: auto (resume it if the config agrees: see ON_RESUME) | never "
                                     "(move the folder's files aside into replaced-<time>/ and start over) | must (an error "
                                     "without one)")
    nonfinite: NonFinite = setting("stop", "a non-finite loss or gradient: stop (an error naming the step) | skip (leave the "
                                           "step out)")
    nonfinite_skip_limit: float = setting(0.01, "with skip: stop when more than this share of an epoch's steps were left out")
    ema: float = setting(0.0, "an exponential moving average of the weights with this decay per step (e.g. 0.999; 0: off), "
                              "evaluated, selected and saved in place of the raw weights (the checkpoint keeps both, for "
                              "resume). Off: a default changes only on a held-out difference the seed-level test detects, and "
                              "0.9's was not (docs/recipe.md)")
    calibration: Calibration = setting("none", "none | temperature (fit a temperature on the held-out split after each epoch, "
                                               "for calibrated probabilities: classification and ordinal heads, needs "
                                               "data.val_fraction)")


@dataclass
class OutputConfig:
    dir: str = setting("", "the run directory: config, metrics, checkpoints, figures. '' : a new one per run, runs/<config "
                           "file's name>-<launch id> (torchrun's run id, SLURM's job, else the start time), so a rerun starts "
                           "its own run; launchers and the configs/ files name theirs, so that a requeued job resumes")


@dataclass
class WandbConfig:
    mode: WandbMode = setting("disabled", "online | offline | disabled (WANDB_MODE wins)")
    project: str = setting("", "the W&B project ('' : WANDB_PROJECT if set, else dr-resnet)")
    entity: str = setting("", "the W&B team or user ('' : the logged-in default)")
    group: str = setting("", "the sweep folder's name (both launchers set it): the UI groups the arms by it ('' : "
                             "WANDB_RUN_GROUP)")
    name: str = setting("", "'' : WANDB_NAME if set, else the run directory's name")
    init_timeout: float = setting(20.0, "seconds an online start may take before falling back to offline")
    log_checkpoint: bool = setting(False, "upload the best checkpoint as an artifact at the end")
    log_predictions: bool = setting(False, "log the selected epoch's per-image test predictions as a W&B Table at the end")
    trial: str = setting("", "launch.sweep sets it: the keys its grid or search varies (comma-separated), logged as flat config "
                             "keys trial/<section.key> with the run's values, for W&B's parallel coordinates and run comparison")
    tags: str = setting("", "more tags for the run (comma-separated; WANDB_TAGS adds more): launch.sweep --tune sets tune on "
                            "phase 1's trials and final on phase 2's runs, so that W&B tells them apart")


@dataclass
class PretrainConfig:
    """Self-supervised pretraining on fundus photos (python -m dr_resnet.pretrain); training ignores it. The
    pretraining run also reads data.*, model.depth, model.weights (none or imagenet: where it starts), train.device,
    amp, channels_last, sync_bn, seed, resume, checkpoint_every_minutes, output.dir and wandb.*."""

    method: PretrainMethod = setting("byol", "byol (Grill et al. 2020: no negatives, so it holds up at a global batch of "
                                             "about 256 and on a pool of a few thousand photos; docs/pretraining.md says why "
                                             "not SimCLR, MoCo or DINO)")
    epochs: int = setting(100, "passes over the pool")
    batch_size: int = setting(64, "photos per process (each gives two views): the global batch is batch_size x processes")
    lr_base: float = setting(0.05, "SGD's rate per 256 photos of global batch (SimSiam's recipe, linear scaling), with "
                                   "linear warm-up and cosine decay; from the literature, not tuned here")
    weight_decay: float = setting(1e-4, "SGD's L2 penalty (SimSiam's)")
    momentum: float = setting(0.9, "SGD's")
    warmup_epochs: float = setting(2.0, "linear warm-up of the learning rate")
    target_decay: float = setting(0.99, "the target network's weight-average decay at the start, raised to 1 along a cosine "
                                        "(BYOL's tau; 0.99 rather than its 0.996 for batches of hundreds, not thousands)")
    hidden_dim: int = setting(4096, "the projector's and predictor's hidden width (BYOL's MLP)")
    projection_dim: int = setting(256, "the projection's size d: a healthy run's spread is about 1/sqrt(d)")
    crop_scale: float = setting(0.35, "the smallest share of the retina's area a random crop keeps")
    colour: float = setting(0.2, "brightness and contrast change by up to this share (saturation by half of it); the "
                                 "black surround stays black")
    pools: str = setting("", "unlabelled photos beside data.root's training split: comma-separated ROOT[:SPLIT[:FORMAT]] "
                             "(another dataset's folder, APTOS's test split); refused when it shares an image or a patient "
                             "with data.test_split")
    collapse_below: float = setting(0.1, "stop (one line) when an epoch's spread x sqrt(projection_dim) falls below this: a "
                                         "collapsed network gives every photo the same output, and its loss still falls")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # (epochs, warm-up) as given and as stretched by train.length, once load() has applied it: the fields hold
    # what trains, the saved config what was given (see to_dict)
    stretched = None  # unannotated: not a dataclass field (nor compared, nor saved)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The settings as given: with train.length, the epochs and warm-up before it (reading them again
        stretches them again); where they were changed after load, the schedule as it now is, length 1."""
        content = dataclasses.asdict(self)
        train = content["train"]
        if self.stretched is not None:
            given, result = self.stretched
            if (train["epochs"], train["warmup_epochs"]) == result:
                train["epochs"], train["warmup_epochs"] = given
            else:
                train["length"], train["steps_at_fraction"] = 1.0, "fewer"
        return content


def _choices() -> dict[str, tuple]:
    """{"section.key": allowed values} for every key whose type is a Literal."""
    found = {}
    for section, kind in typing.get_type_hints(Config).items():
        for key, hint in typing.get_type_hints(kind).items():
            if typing.get_origin(hint) is Literal:
                found[f"{section}.{key}"] = typing.get_args(hint)
    return found


CHOICES = _choices()
POSITIVE = ("data.image_size", "train.epochs", "train.batch_size", "train.lr", "train.lr_base_scratch",
            "train.lr_base_pretrained", "train.lr_base_ssl", "train.lr_base_probe", "train.lr_base_batch",
            "train.log_every", "wandb.init_timeout", "pretrain.epochs", "pretrain.batch_size", "pretrain.lr_base",
            "pretrain.hidden_dim", "pretrain.projection_dim")
# Keys that moved (old name -> new name): files, overrides and checkpoints that use the old name still load.
RENAMED = {"train.regression_loss": "regression.loss", "train.fit_thresholds": "regression.fit_thresholds"}
# Sections a run's config.yaml also holds that are records, not settings: training writes them (the
# recipe: what photos went through, see recipe.py) and loading that file as a config skips them.
RECORDED = ("recipe", "effective")  # effective: the values the run derived (learning rate, global batch, ...)
NON_NEGATIVE = ("data.workers", "data.min_val_images", "data.max_rotation", "train.natural_from", "train.eval_batch_size",
                "train.momentum", "train.clip_grad_norm", "train.weight_decay", "train.warmup_epochs",
                "train.checkpoint_every_minutes", "train.nonfinite_skip_limit",
                "pretrain.weight_decay", "pretrain.warmup_epochs", "pretrain.collapse_below")


@dataclass(frozen=True)
class LearningRate:
    """The learning rate a run trains with, and how it came about (logged at start, kept in config.yaml)."""

    lr: float
    global_batch: int
    rule: str  # e.g. "0.1 x 32 / 256 (scratch, linear scaling)" or "train.lr (fixed)"


PROBE_RULE = "linear probe: fc.* only, weight decay 0"  # what a probe's rule adds (model.freeze_backbone)


def learning_rate(train: TrainConfig, initialisation: str, processes: int, probe: bool = False) -> LearningRate:
    """THE learning-rate rule: train.lr when it is set, else the initialisation's base rate (base_rate) scaled
    linearly with the global batch (batch_size x processes). The same recipe on 1, 2 or 8 processes gives the
    same learning rate per image: changing the number of processes changes the global batch, and the rate with it.
    A linear probe (`probe`: model.freeze_backbone) has its own base rate, train.lr_base_probe, whatever the
    initialisation: one linear layer on fixed features is another problem than fine-tuning a network; its
    rule says it trains without weight decay (components.optimisation)."""
    global_batch = train.batch_size * processes
    if train.lr is not None:
        return LearningRate(train.lr, global_batch,
                            "train.lr (fixed, whatever the batch)" + (f"; {PROBE_RULE}" if probe else ""))
    base, why = (train.lr_base_probe, PROBE_RULE) if probe else (base_rate(train, initialisation), initialisation)
    return LearningRate(base * global_batch / train.lr_base_batch, global_batch,
                        f"{base:g} x {global_batch} / {train.lr_base_batch} ({why}, linear scaling)")


def base_rate(train: TrainConfig, initialisation: str) -> float:
    """The base learning rate (per lr_base_batch images) of an initialisation: lr_base_scratch from random
    weights, lr_base_pretrained from ImageNet's, lr_base_ssl from an in-domain self-supervised backbone."""
    rates = {"scratch": train.lr_base_scratch, "pretrained": train.lr_base_pretrained, "ssl": train.lr_base_ssl,
             "imagenet+ssl": train.lr_base_ssl}
    if initialisation not in rates:
        raise ValueError(f"initialisation must be one of {', '.join(INITIALISATIONS)}, got {initialisation!r}")
    return rates[initialisation]


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


AUTO = ("auto", "none", "null")  # what an optional field (`float | None`) reads as None: derived by the run


def _coerce(key: str, value: Any, kind: Any, origin: str) -> Any:
    """value as the field's type; strings from the command line are parsed as YAML scalars first. An
    optional field (`float | None`) also takes auto (None)."""
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        chosen = _coerce(key, value, type(allowed[0]), origin)
        if chosen not in allowed:
            raise ConfigError(f"{origin}: {key}={chosen!r} is not one of {', '.join(map(str, allowed))}")
        return chosen
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        if value is None or (isinstance(value, str) and value.strip().lower() in AUTO):
            return None
        inner = [k for k in typing.get_args(kind) if k is not type(None)][0]
        try:
            return _coerce(key, value, inner, origin)
        except ConfigError:
            raise ConfigError(f"{origin}: {key} must be {inner.__name__} or auto, got {value!r}") from None
    if isinstance(value, str) and kind is not str:
        try:
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: {key}={value!r} is not a valid value ({exc})") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 and 3e-2 (no dot) as strings
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if value is None:
            return "none"
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{origin}: {key} must be {kind.__name__}, got {value!r}")


def _renamed(updates: dict[str, Any], origin: str) -> dict[str, Any]:
    """updates with keys of RENAMED under their new names (a warning for each, except in saved configs)."""
    moved = [(section, key) for section, values in updates.items() if isinstance(values, dict)
             for key in values if f"{section}.{key}" in RENAMED]
    if not moved:
        return updates
    result = {section: dict(values) if isinstance(values, dict) else values for section, values in updates.items()}
    for section, key in moved:
        new_section, new_key = RENAMED[f"{section}.{key}"].split(".")
        result.setdefault(new_section, {})[new_key] = result[section].pop(key)
        if origin != SAVED:
            log.warning("%s: %s.%s is now %s.%s (the old name still works)", origin, section, key, new_section, new_key)
    return result


def _apply(cfg: Config, updates: dict[str, Any], origin: str) -> None:
    sections = _sections(cfg)
    for section, values in _renamed(updates, origin).items():
        if section in RECORDED and origin != COMMAND_LINE:
            continue
        if section not in sections:
            raise ConfigError(f"{origin}: unknown section '{section}' (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: '{section}' must be a mapping of keys to values")
        target = sections[section]
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                known = ", ".join(f.name for f in dataclasses.fields(target))
                raise ConfigError(f"{origin}: unknown key '{section}.{key}' (known in {section}: {known})")
            setattr(target, key, _coerce(f"{section}.{key}", value, hints[key], origin))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The file's updates, preceded by those of the files it inherits from."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: inherits from itself through {' -> '.join(str(p) for p in seen)}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            content = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    parent = content.pop("inherit", None)
    chain = _read_yaml(path.parent / parent, seen + (path,)) if parent else []
    return chain + [(content, str(path))]


@dataclass(frozen=True)
class KeyHelp:
    key: str  # section.key
    kind: str  # its type: int, float, str, bool, "auto or float" for an optional one (None: auto); a Literal's
    # values' type (their list: choices)
    default: Any
    choices: tuple  # the allowed values of a Literal field; () otherwise
    text: str  # the help in the field's declaration (setting)


def type_name(hint: Any) -> str:
    """A config key's type as help and the reference say it (see KeyHelp.kind)."""
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0]).__name__
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        inner = [k for k in typing.get_args(hint) if k is not type(None)]
        return "auto or " + " or ".join(type_name(k) for k in inner)
    return hint.__name__


@functools.cache
def key_help() -> tuple[KeyHelp, ...]:
    """Every config key with its type, default, allowed values and help, from the dataclasses' fields and
    their metadata (setting): the one source of `train --help` and docs/reference/config.md, so neither can
    drift from the declarations."""
    found = []
    for section, kind in typing.get_type_hints(Config).items():
        defaults, hints = kind(), typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            hint = hints[f.name]
            choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
            found.append(KeyHelp(f"{section}.{f.name}", type_name(hint), getattr(defaults, f.name), choices,
                                 f.metadata.get(HELP, "")))
    return tuple(found)


def help_text() -> str:
    """The key table `train --help` prints."""
    lines = ["config keys (set as section.key=value, after --config; --print-config shows the result):"]
    for k in key_help():
        default = "auto" if k.default is None else k.default
        kind = f"one of {', '.join(map(str, k.choices))}" if k.choices else k.kind
        lines.append(f"  {k.key} = {default}  ({kind})")
        lines += textwrap.wrap(k.text, width=110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, str, str]:
    """'section.key=value' -> (section, key, value)."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.epochs=5)")
    return section, key, value


def data_settings(overrides: typing.Sequence[str] = (), **values: Any) -> DataConfig:
    """The data section from `values` and data.key=value overrides, checked as train checks them: the
    settings of the commands that read a dataset without training (describe, preprocess, evaluate)."""
    cfg = Config()
    _apply(cfg, {"data": values}, COMMAND_LINE)
    for text in overrides:
        section, key, value = parse_override(text)
        if section != "data":
            raise ConfigError(f"override {text!r}: only data.* keys say how to read a dataset here")
        _apply(cfg, {section: {key: value}}, COMMAND_LINE)
    return cfg.data


def needs_held_out(cfg: Config) -> str:
    """What in cfg fits on the held-out part ('' when nothing does): a run that has none fails then."""
    if HEAD_SPECS[cfg.model.head].has_thresholds and cfg.regression.fit_thresholds == "val":
        return "regression.fit_thresholds=val"
    if cfg.train.calibration == "temperature":
        return "train.calibration=temperature"
    return ""


def validate(cfg: Config) -> None:
    cfg.model.weights = normalised_weights(cfg.model.weights)
    flat = {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r} is not one of {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        if flat[key] is not None and not flat[key] > 0:
            raise ConfigError(f"{key} must be > 0, got {flat[key]}")
    for key in NON_NEGATIVE:
        if not flat[key] >= 0:
            raise ConfigError(f"{key} must be >= 0, got {flat[key]}")
    if not 0 <= cfg.train.momentum < 1:
        raise ConfigError(f"train.momentum must be in [0, 1), got {cfg.train.momentum}")
    if not 0 < cfg.data.train_fraction <= 1:
        raise ConfigError(f"data.train_fraction must be in (0, 1] (a share of the training patients), got "
                          f"{cfg.data.train_fraction}")
    if not cfg.train.length > 0:
        raise ConfigError(f"train.length must be > 0 (a multiple of the schedule), got {cfg.train.length}")
    if not 0 <= cfg.train.ema < 1:
        raise ConfigError(f"train.ema must be in [0, 1) (the average's decay per step; 0: off), got {cfg.train.ema}")
    pre = cfg.pretrain
    if not 0 <= pre.target_decay <= 1 or not 0 <= pre.momentum < 1:
        raise ConfigError(f"pretrain.target_decay must be in [0, 1] and pretrain.momentum in [0, 1), got "
                          f"{pre.target_decay} and {pre.momentum}")
    if not 0 < pre.crop_scale <= 1 or not 0 <= pre.colour < 1:
        raise ConfigError(f"pretrain.crop_scale must be in (0, 1] (a share of the retina's area) and pretrain.colour in "
                          f"[0, 1), got {pre.crop_scale} and {pre.colour}")
    if not cfg.data.stage_timeout_minutes > 0:
        raise ConfigError(f"data.stage_timeout_minutes must be positive (minutes a process waits for its node's copy), "
                          f"got {cfg.data.stage_timeout_minutes}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    held_out = cfg.data.val_fraction > 0 or bool(cfg.data.val_split)
    if HEAD_SPECS[cfg.model.head].has_thresholds and cfg.regression.fit_thresholds == "val" and not held_out:
        raise ConfigError("regression.fit_thresholds=val needs a held-out set: set data.val_fraction (e.g. 0.1)")
    if cfg.data.val_split and cfg.data.val_split in (cfg.data.train_split, cfg.data.test_split):
        raise ConfigError(f"data.val_split={cfg.data.val_split} is also the training or test split: name another split")
    if cfg.train.calibration == "temperature" and (not held_out
                                                   or not HEAD_SPECS[cfg.model.head].has_probabilities):
        raise ConfigError("train.calibration=temperature fits the probabilities on a held-out set: set data.val_fraction "
                          "(e.g. 0.1), with the classification or ordinal head (a regression head has no probabilities)")
    if cfg.data.format == "csv" and not (cfg.data.train_csv and cfg.data.test_csv):
        raise ConfigError("data.format=csv reads the tables data.train_csv and data.test_csv (relative to data.root): "
                          "set both (and data.image_column, data.label_column where they are not image, level)")
    if not 0 <= cfg.train.natural_from <= 1:
        raise ConfigError(f"train.natural_from must be in [0, 1] (a share of the run), got {cfg.train.natural_from}")
    if cfg.train.warmup_epochs > cfg.train.epochs:
        raise ConfigError(f"train.warmup_epochs ({cfg.train.warmup_epochs}) must not exceed train.epochs ({cfg.train.epochs})")


def load(config_file: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (and what it inherits) <- overrides, validated."""
    cfg = Config()
    if config_file:
        for updates, origin in _read_yaml(Path(config_file)):
            _apply(cfg, updates, origin)
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, {section: {key: value}}, COMMAND_LINE)
    if not cfg.output.dir.strip():
        cfg.output.dir = new_run_dir(config_file)
    validate(cfg)
    stretch_schedule(cfg)
    return cfg


def stretch_schedule(cfg: Config) -> None:
    """Apply train.length (and train.steps_at_fraction=same) to the epochs and warm-up (the cosine decay follows
    the epochs); train.length keeps the multiple and the saved config the given epochs, so a saved config read
    again trains the same."""
    given = (cfg.train.epochs, cfg.train.warmup_epochs)
    multiple = schedule_multiple(cfg.train.length, cfg.data.train_fraction, cfg.train.steps_at_fraction)
    cfg.train.epochs, cfg.train.warmup_epochs = schedule_of(*given, multiple)
    cfg.stretched = (given, (cfg.train.epochs, cfg.train.warmup_epochs)) if multiple != 1.0 else None


def schedule_multiple(length: float, train_fraction: float, steps_at_fraction: str) -> float:
    """What the schedule is multiplied by: train.length, and 1 / data.train_fraction for the same steps at
    every fraction (train.steps_at_fraction=same)."""
    return length / train_fraction if steps_at_fraction == "same" else length


def schedule_of(epochs: int, warmup_epochs: float, length: float) -> tuple[int, float]:
    """THE schedule rule: (epochs, warm-up epochs) a run trains whose schedule is multiplied by `length`
    (schedule_multiple)."""
    if length == 1.0:
        return epochs, warmup_epochs
    stretched = max(1, round(epochs * length))
    return stretched, min(warmup_epochs * length, stretched)


def new_run_dir(config_file: str | os.PathLike | None) -> str:
    """runs/<config name>-<launch id>: the same folder for every process of one launch (torchrun's run id,
    SLURM's job and step; a single process: its start time to the second), a new one for the next launch."""
    env = os.environ
    launch = env.get("TORCHELASTIC_RUN_ID", "none")
    if launch == "none":  # torchrun without --rdzv-id (or no torchrun): what every process shares
        launch = (f"job{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', 0)}" if env.get("SLURM_PROCID")
                  else f"port{env['MASTER_PORT']}" if env.get("MASTER_PORT")
                  else time.strftime("%Y%m%d-%H%M%S"))
    return str(Path("runs") / f"{Path(config_file).stem if config_file else 'default'}-{launch[:24]}")


def save(cfg: Config, path: str | os.PathLike, recorded: dict[str, Any] | None = None) -> None:
    """The config as YAML, followed by what training recorded about the run (RECORDED sections)."""
    extra = {k: v for k, v in (recorded or {}).items() if k in RECORDED}
    Path(path).write_text(to_yaml(cfg, extra))


def to_yaml(cfg: Config, extra: dict[str, Any] | None = None) -> str:
    """The config as config.yaml and --print-config write it (sections in the dataclasses' order)."""
    return yaml.safe_dump({**cfg.to_dict(), **(extra or {})}, sort_keys=False)


# Keys that say where and how a run ran, not what was trained: runs that differ only in these are seeds (or
# reruns) of one arm. The report groups runs by every other key (results/arms.py).
NOT_THE_ARM = ("train.seed", "train.device", "train.compile", "train.cudnn_benchmark", "train.deterministic",
               "train.channels_last", "train.log_every", "train.checkpoint_every_minutes", "train.eval_batch_size",
               "data.workers", "data.stage_to", "data.stage_timeout_minutes", "output.", "wandb.",
               "pretrain.")  # read by the pretraining command only: a backbone file records its own


# Keys no grid or search may vary, and why: they decide the held-out score the trials are chosen on, or
# which arm a run is (a `--grid model.depth=18,50` would run a "resnet18" arm at depth 50, and the report
# would merge it into resnet50's). Temperature calibration leaves QWK and accuracy alone but is fitted on
# the held-out part, so a held-out loss (select_by=loss) would score it on its own fit: refused outright.
ARM_FIX = "give each value an arm of its own in the sweep file's arms:"
NOT_SEARCHED = {
    "model.depth": f"decides the arm (resnet<depth>_<initialisation>): {ARM_FIX}",
    "model.weights": f"decides the arm (its initialisation: config.INITIALISATIONS, and from what): {ARM_FIX}",
    "train.select_by": "decides the held-out figure every trial is scored and chosen on: set it once (overrides:)",
    "data.val_fraction": "decides the held-out part the trials are scored on: set it once (overrides:)",
    "data.val_split": "decides the held-out part the trials are scored on: set it once (overrides:)",
    "data.split_seed": "decides which patients are held out to score the trials: set it once (overrides:)",
    "data.train_split": "decides the split the held-out part is drawn from: set it once (overrides:)",
    "data.min_val_images": "decides whether anything is held out to score the trials: set it once (overrides:)",
    "regression.fit_thresholds": "can fit the grade thresholds on the held-out part the trials are scored on (val): "
                                 "set it once (overrides:)",
    "train.calibration": "fits a temperature on the held-out part the trials are scored on (its loss with it): "
                         "set it once (overrides:)",
}


# Keys a resumed run may change: how long it goes on (train.epochs extends it), where and how it runs, what
# it logs, and what a bad step does. Any other difference from the checkpoint's config stops the resume
# (train.resume, the `resume` function in training/train.py).
ON_RESUME = ("train.epochs", "train.resume", "train.device", "train.amp", "train.compile", "train.cudnn_benchmark",
             "train.deterministic", "train.channels_last", "train.sync_bn", "train.log_every",
             "train.checkpoint_every_minutes", "train.eval_batch_size", "train.nonfinite", "train.nonfinite_skip_limit",
             "data.workers", "data.stage_to", "data.stage_timeout_minutes", "output.", "wandb.")


def changed_on_resume(saved: dict[str, Any], requested: Config) -> list[str]:
    """The keys (beyond ON_RESUME) whose requested value differs from the checkpoint's config, as
    "key: old -> new"."""
    before, after = settings_of(saved), settings_of(requested.to_dict())
    return [f"{key}: {before.get(key)} -> {after[key]}" for key in after
            if str(before.get(key)) != str(after[key])
            and not listed(key, ON_RESUME)]


def settings_of(content: dict[str, Any]) -> dict[str, Any]:
    """A saved config (config.yaml's dict) as flat section.key -> value, with the defaults of keys it
    lacks (older runs) and old key names under their new ones; records (RECORDED) skipped, nothing validated."""
    flat = {f"{section}.{key}": value for section, values in Config().to_dict().items() for key, value in values.items()}
    for section, values in _renamed(content, SAVED).items():
        if section not in RECORDED and isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
    if "model.weights" in flat:
        flat["model.weights"] = normalised_weights(flat["model.weights"])
    return flat


def defines_the_arm(key: str) -> bool:
    """Whether a flat config key is part of what an arm is (see NOT_THE_ARM)."""
    return not listed(key, NOT_THE_ARM)


def listed(key: str, keys: tuple[str, ...]) -> bool:
    """Whether a flat section.key is in `keys`, where "section." stands for every key of the section."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def from_dict(content: dict[str, Any]) -> Config:
    """A Config from a saved dict (a checkpoint's or config.yaml's), validated. Checkpoints of version
    0.1 stored train.fit_thresholds as a bool (true meant fitting on the epoch's training outputs); older
    ones keep the regression settings in train (see RENAMED)."""
    legacy = content.get("train", {}).get("fit_thresholds")
    if isinstance(legacy, bool):
        content = {**content, "train": {**content["train"], "fit_thresholds": "batches" if legacy else "none"}}
    cfg = Config()
    _apply(cfg, content, SAVED)
    validate(cfg)
    stretch_schedule(cfg)
    return cfg


# launch.sweep's keywords for model.weights: fine-tune from an in-domain self-supervised backbone that the sweep
# pretrains first (launch/backbones.py), keyword -> where that pretraining starts (model.weights of the pretraining
# run: the inverse of dr_resnet.pretraining.run.STARTED_FROM). Only the sweep gives them a file; a training run
# alone is told so (refuse_sweep_keyword).
SWEEP_BACKBONES = {"ssl": "none", "imagenet+ssl": "imagenet"}


def refuse_sweep_keyword(cfg: Config) -> None:
    """One line for model.weights=ssl (or imagenet+ssl) outside a sweep: no backbone file is named."""
    if cfg.model.weights in SWEEP_BACKBONES:
        raise ConfigError(f"model.weights={cfg.model.weights} is launch.sweep's keyword (the sweep pretrains the backbone, "
                          f"then fine-tunes from it); alone, give the backbone file: model.weights=RUN/backbone.pt "
                          f"(python -m dr_resnet.pretrain writes it)")


# The settings that decide a pretrained backbone: the pretraining recipe, the network and where it starts, the
# photos (the dataset, its splits and tables: the pool is the training split and the test split is refused in it)
# and how they are read and viewed, the seed. Not data.train_fraction (the pool is the whole training split: the
# fraction decides only how many labels fine-tuning sees), not the fine-tuning's train.* (lr, epochs, ...), nor
# where or how it runs (output.*, wandb.*, data.workers, train.device).
PRETRAINING_KEYS = ("pretrain.", "model.depth", "model.weights", "model.zero_init_residual", "data.root", "data.format",
                    "data.train_split", "data.test_split", "data.train_csv", "data.test_csv", "data.train_images",
                    "data.test_images", "data.image_column", "data.label_column", "data.image_suffix",
                    "data.patient_column", "data.filter", "data.label_map", "data.image_size", "data.bad_images",
                    "data.max_rotation", "data.flips", "train.seed")


def resolved_pools(pools: str) -> str:
    """pretrain.pools with each entry's ROOT resolved (its :SPLIT[:FORMAT] as given): the same folders named
    from another working folder, or by a relative path, are the same pool."""
    entries = [entry.strip() for entry in pools.split(",") if entry.strip()]
    return ",".join(str(Path(root).expanduser().resolve()) + (f":{rest}" if rest else "")
                    for root, _, rest in (entry.partition(":") for entry in entries))


def pretraining_hash(cfg: Config) -> str:
    """A short hash (16 hex digits) of a pretraining config's PRETRAINING_KEYS (data.root resolved): the backbone's
    identity. Torch-free: the pretraining command records it in backbone.json, and launch.sweep names its cached
    backbones by it and reuses one whose record has the same hash."""
    import hashlib
    import json

    flat = settings_of(cfg.to_dict())
    flat["data.root"] = str(Path(flat["data.root"]).expanduser().resolve())
    flat["pretrain.pools"] = resolved_pools(flat["pretrain.pools"])
    chosen = {key: value for key, value in sorted(flat.items()) if listed(key, PRETRAINING_KEYS)}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:16]
