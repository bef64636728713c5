"""Train one run end to end. The same code path as 1 process, under torchrun (one node or several),
under srun in an sbatch script, or from a submitit task.

    python -m dr_resnet.train --config configs/demo.yaml [section.key=value ...]
    torchrun --nproc_per_node 4 -m dr_resnet.train --config configs/resnet50_pretrained.yaml

A run directory (output.dir) that holds a checkpoint is resumed: a larger train.epochs extends it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dr_resnet import __version__, config, processes
from dr_resnet.config import Config, ConfigError, TrainConfig
from dr_resnet.data.augment import epoch_generator
from dr_resnet.data.dataset import RetinopathyDataset
from dr_resnet.data.recipe import Recipe
from dr_resnet.data.samplers import EpochSampler
from dr_resnet.files import write_text
from dr_resnet.model.heads import Head
from dr_resnet.patients import overlap_warnings
from dr_resnet.results.metrics import METRICS, collapse, epoch_entries, expected_calibration_error
from dr_resnet.results.predictions import read_predictions, write_predictions
from dr_resnet.results.rundir import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    CONFUSION_PNG,
    DAMAGED_CHECKPOINT,
    FINAL,
    FINAL_PREDICTIONS_FILE,
    LAST_CHECKPOINT,
    PREDICTIONS_FILE,
    PREV_CHECKPOINT,
    REPLACED_PREFIX,
    SUMMARY_FILE,
    TRAIN_LOG,
    VAL_PREDICTIONS_FILE,
    append_metrics,
    commit_pending,
    pending_path,
    pruned_note,
    read_metrics,
    rewrite_metrics,
    selected_on,
    selected_row,
    selection_value,
    settle_pending,
)
from dr_resnet.results.stats import bootstrap_intervals, operating_points
from dr_resnet.training import checkpoint, components, distributed, probe
from dr_resnet.training.checkpoint import EpochPosition
from dr_resnet.training.distributed import DistInfo, launch_env
from dr_resnet.training.loop import EpochTotals, EvalResult, NonFiniteError, Trainer, evaluate
from dr_resnet.training.preemption import Decision, RunStopped, StepBoundary, StopSignals
from dr_resnet.training.runtime import compile_model, configure_backends, cpu_shortfall, environment, usable_cpus
from dr_resnet.training.tracking import Tracker, TrackingSettings, identity, new_run_id, training_tags

log = logging.getLogger("dr_resnet.train")


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    prog = "dr-train" if Path(sys.argv[0]).name == "dr-train" else "python -m dr_resnet.train"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=config.help_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5 output.dir=runs/x")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_intermixed_args(argv)


@dataclass
class Run:
    """Everything built for one run, ready for the loop."""

    cfg: Config
    info: DistInfo
    run_dir: Path
    train_loader: DataLoader
    test_loader: DataLoader
    val_loader: DataLoader | None  # the held-out part of the training split (data.val_fraction)
    fit_loader: DataLoader | None  # the training images in eval mode, for a head whose fit_on is "train"
    train_sampler: EpochSampler
    model: nn.Module  # bare module (for checkpoints)
    eval_model: nn.Module  # what is evaluated and selected: the bare module (its weight average with train.ema),
    # compiled with train.compile
    trainer: Trainer  # the training step: DDP (and compiled) model, optimizer, scheduler, scaler, head, augmentation
    train_baseline: float
    test_baseline: float
    recipe: Recipe  # what photos go through before the network: saved with every checkpoint
    provenance: dict  # versions and the data's splits and class counts: saved with every checkpoint
    learning_rate: config.LearningRate  # the rate config.learning_rate's rule gives this run, and how
    patients: dict  # patients.overlap: how patients were identified, and any shared between the splits
    skipped_images: list[dict] = field(default_factory=list)  # photos data.bad_images=skip left out
    origin: dict = field(default_factory=dict)  # config.initialisation_record: its initialisation (and pretraining)
    rows: list[dict] = field(default_factory=list)  # the epochs logged so far (rank 0's: the summary and selection)
    wandb_id: str | None = None  # the W&B run this run logs to (rank 0), saved in every checkpoint

    @property
    def head(self) -> Head:
        return self.trainer.head

    def evaluate(self, loader: DataLoader) -> EvalResult:
        compiled = self.cfg.train.compile  # one graph for the ragged last batch too
        return evaluate(self.eval_model, loader, self.head, self.trainer.execution, fixed_batch=compiled)


def build(cfg: Config, info: DistInfo) -> Run:
    """The run's parts (components) assembled for training on this process's device."""
    t = cfg.train
    if cfg.data.workers > 0:  # its imports overlap with reading the data (dr_resnet.processes)
        processes.start_fork_server()
    configure_backends(info.device, t.cudnn_benchmark, t.deterministic)
    shortfall = cpu_shortfall(cfg.data.workers, launch_env().local_world_size or 1, usable_cpus())
    if shortfall and info.local_rank == 0:  # once a node
        log.warning(shortfall)
    execution = components.agreed(components.execution(t.amp, info.device, cfg.data, t.channels_last), info.is_main)
    root = None
    if cfg.data.stage_to:  # one process a node copies; every process learns whether every node's copy worked
        root = components.staged_root(cfg.data, info.local_rank)
    data = components.datasets(cfg, root)
    train_loader, train_sampler = components.training_loader(data.train, cfg, info)

    def eval_loader(dataset: RetinopathyDataset) -> DataLoader:
        return components.evaluation_loader(dataset, t.eval_batch_size or 2 * t.batch_size, cfg.data.workers, info)
    head = components.head(cfg, data.train, info.device)
    test_loader = eval_loader(data.test)
    val_loader = eval_loader(data.val) if data.val is not None else None
    fit_loader = eval_loader(data.train) if head.fit_on == "train" else None
    model = components.model(cfg, head, execution, train_sampler.grade_shares(0))
    probing = cfg.model.freeze_backbone
    if probing:  # before DDP, which hooks only the parameters that train
        probe.freeze_backbone(model)
    ddp_model = components.distributed_model(model, cfg, info)
    model = getattr(ddp_model, "module", ddp_model)  # SyncBatchNorm's conversion makes a new module
    origin = config.initialisation_record(cfg.model.weights)  # read once: the sidecar as the weights were loaded
    lr = config.learning_rate(t, origin["initialisation"], info.world_size, probe=probing)
    o = components.optimisation(t, lr.lr, model, len(train_loader), execution, probe=probing)
    trainer = Trainer(compile_model(ddp_model, t.compile), o.optimizer, o.scheduler, o.scaler, head, execution,
                      t.clip_grad_norm, t.nonfinite, components.weight_average(model, t.ema))
    evaluated = trainer.ema.module if trainer.ema is not None else model  # train.ema: the average is the result
    return Run(cfg=cfg, info=info, run_dir=Path(cfg.output.dir), train_loader=train_loader, test_loader=test_loader,
               val_loader=val_loader, fit_loader=fit_loader, train_sampler=train_sampler, model=model,
               eval_model=compile_model(evaluated, t.compile), trainer=trainer, train_baseline=data.train.majority_baseline,
               test_baseline=data.test.majority_baseline, recipe=Recipe.of_data(cfg.data.root, cfg.data.image_size),
               provenance=provenance(cfg, data), learning_rate=lr, patients=data.patient_overlap(),
               skipped_images=data.skipped, origin=origin)


def provenance(cfg: Config, data: components.Datasets) -> dict:
    """What a model card says about where a model comes from: versions, and each split's size and grades."""
    import torchvision

    splits = {d.split: {"images": len(d), "class_counts": d.class_counts.tolist()}
              for d in (data.train, data.val, data.test) if d is not None}
    return {"dr_resnet": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "data": {"root": str(Path(cfg.data.root).resolve()), "format": data.train.format, "splits": splits}}


def training_state(run: Run, epoch: int, position: EpochPosition | None = None,
                   metrics: dict | None = None) -> checkpoint.TrainingState:
    """The state to save: after `epoch` epochs (with that epoch's metrics row), or inside the next one
    (at `position`); the selection so far from the run's rows."""
    trainer = run.trainer
    return checkpoint.TrainingState(
        model=run.model.state_dict(), ema=trainer.ema.state_dict() if trainer.ema is not None else {},
        optimizer=trainer.optimizer.state_dict(), scheduler=trainer.scheduler.state_dict(),
        scaler=trainer.scaler.state_dict(), precision=trainer.execution.precision.name, epoch=epoch,
        best=selection(run.rows, run.cfg.train.select_by), rng=checkpoint.rng_state(), config=run.cfg.to_dict(),
        wandb_id=run.wandb_id, head=run.head.state(),
        position=position.to_dict() if position else {}, recipe=run.recipe.to_dict(), provenance=run.provenance,
        metrics=metrics or {})


def save_checkpoint(run: Run, state: checkpoint.TrainingState | None, best: bool = False) -> None:
    """Rank 0 writes `state` (None on the other ranks) as the resume point, keeping the one before as
    checkpoint_prev.pt, and (first) as checkpoint_best.pt too when `best`. Every rank learns whether that
    worked, so that a failed write stops them all with the same error instead of leaving them waiting."""
    def write() -> None:
        # The best first: a resume point that selects an epoch always finds that epoch's checkpoint_best.pt.
        if best:
            state.save(run.run_dir / BEST_CHECKPOINT)
        state.save(run.run_dir / LAST_CHECKPOINT, keep_previous=run.run_dir / PREV_CHECKPOINT)
    distributed.rank0_writes("the checkpoint", write, run.info.is_main)


@dataclass(frozen=True)
class Resumed:
    """Where a run goes on: epochs completed, its W&B run id, and inside the next epoch (a mid-epoch
    checkpoint's position; None at an epoch's end)."""

    epoch: int = 0
    wandb_id: str | None = None
    position: EpochPosition | None = None


def resume(run: Run) -> Resumed:
    """The run directory's resume point: checkpoint_last.pt, or checkpoint_prev.pt when the last one is
    damaged (rank 0 then moves the damaged file aside, so that the next checkpoint cannot take its place
    as the previous one). Nothing: a fresh start."""
    policy, last = run.cfg.train.resume, run.run_dir / LAST_CHECKPOINT
    if policy == "never":
        if run.info.is_main:
            set_aside(run.run_dir)
        distributed.barrier()
        return Resumed()
    found = checkpoint.load_resumable([last, run.run_dir / PREV_CHECKPOINT])
    if found is None:
        if policy == "must":
            raise ConfigError(f"train.resume=must: no checkpoint to resume in {run.run_dir}")
        return Resumed()
    state, path = found
    changed = config.changed_on_resume(state.config, run.cfg)
    if changed:
        raise ConfigError(f"{path} was trained with another config: {'; '.join(changed)}. Resuming would train on "
                          f"with the checkpoint's settings while config.yaml claimed these; set output.dir to a new "
                          f"folder, or train.resume=never to start over in {run.run_dir} (its files are moved aside "
                          f"into a replaced-<time> folder, nothing is deleted)")
    distributed.barrier()  # every rank has read its checkpoint before rank 0 moves anything
    if path != last and run.info.is_main and last.exists():
        damaged = last.with_name(DAMAGED_CHECKPOINT)
        last.replace(damaged)
        log.warning("moved the unreadable %s to %s", last, damaged)
    trainer = run.trainer
    precision = trainer.execution.precision
    run.model.load_state_dict(state.model)
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state.ema)
    components.load_optimizer_state(trainer.optimizer, state.optimizer)
    trainer.scheduler.load_state_dict(state.scheduler)
    where = EpochPosition.of(state.position)
    written_at = trainer.scheduler.last_epoch
    if components.move_schedule(trainer.scheduler, where.epoch + where.step / where.steps if where else state.epoch,
                                len(run.train_loader)):
        log.warning("%s was written at step %d of its schedule; with %d steps an epoch here the run goes on from "
                    "step %d, the same share of the training", path, written_at, len(run.train_loader),
                    trainer.scheduler.last_epoch)
    saved = state.precision  # None before 0.2
    if saved is not None and saved != precision.name:
        # A requeued job may land on another kind of GPU (or on CPU): carry on in this one's precision.
        log.warning("%s was trained in %s; this process runs in %s (train.amp=%s on %s): continuing in %s%s", path,
                    saved, precision.name, run.cfg.train.amp, run.info.device, precision.name,
                    ", with a fresh fp16 loss scale" if precision.needs_scaler else "")
    if trainer.scaler.is_enabled() and state.scaler:  # an fp16 run's scale; a fresh scaler otherwise
        trainer.scaler.load_state_dict(state.scaler)
    checkpoint.restore_rng(state.rng)
    run.head.load_state(state.head)
    if where:
        log.info("resumed %s in epoch %d after step %d of %d", path, where.epoch + 1, where.step, where.steps)
    else:
        log.info("resumed %s after epoch %d", path, state.epoch)
    return Resumed(int(state.epoch), state.wandb_id, where)


def set_aside(run_dir: Path) -> Path | None:
    """train.resume=never: the run folder's files (its train.log stays: it holds every attempt) moved into
    run_dir/replaced-<time>/; None when there is nothing to move."""
    files = [p for p in run_dir.iterdir() if p.name != TRAIN_LOG and not p.name.startswith(REPLACED_PREFIX)] \
        if run_dir.is_dir() else []
    if not files:
        return None
    aside = run_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in files:
        path.rename(aside / path.name)
    log.warning("train.resume=never: moved %d file(s) of the earlier run to %s; starting over", len(files), aside)
    return aside


def selection(rows: list[dict], select_by: str) -> dict:
    """The selected epoch so far, as checkpoints record it ({} before the first epoch)."""
    if not rows:
        return {}
    chosen = selected_row(rows, select_by)
    on = selected_on(chosen)
    value = selection_value(chosen, select_by) if on != FINAL else None
    return {"metric": select_by, "on": on, "value": value, "epoch": chosen["epoch"]}


def effective_settings(run: Run) -> dict:
    """What the run derived from its config and the processes it runs on: the `effective` section of
    its config.yaml, logged at start. The learning rate is the one the optimizer holds: a run resumed
    by another number of processes keeps the rate it began with (with a warning)."""
    t, lr, steps = run.cfg.train, run.learning_rate, len(run.train_loader)
    trained_with = run.trainer.optimizer.param_groups[0]["initial_lr"]
    if abs(trained_with - lr.lr) > 1e-12 * max(1.0, lr.lr):
        log.warning("this run began with learning rate %.6g; for %d process(es) the rule gives %.6g (%s): it keeps "
                    "%.6g, so that its schedule goes on unchanged", trained_with, run.info.world_size, lr.lr, lr.rule,
                    trained_with)
    sampler = run.train_sampler
    return {"processes": run.info.world_size, "global_batch": lr.global_batch, "lr": trained_with, "lr_rule": lr.rule,
            "precision": run.trainer.execution.precision.name, "sampler": t.sampler,
            "steps_per_epoch": steps, "warmup_steps": round(t.warmup_epochs * steps) if t.scheduler != "none" else 0,
            "total_steps": t.epochs * steps, "first_epoch_grade_shares": [round(float(x), 4) for x in sampler.grade_shares(0)],
            "final_epoch_grade_shares": [round(float(x), 4) for x in sampler.grade_shares(t.epochs - 1)],
            "held_out_images": len(run.val_loader.dataset) if run.val_loader else 0,
            "training_images": len(run.train_loader.dataset), "schedule_length": t.length,
            "epochs": t.epochs, "warmup_epochs": t.warmup_epochs,  # train.length applied (config.schedule_of)
            "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in run.model.modules()),
            **trained_settings(run),
            "selection": f"best held-out {t.select_by}" if run.val_loader else "the final epoch (nothing held out)",
            **run.origin}


def trained_settings(run: Run) -> dict:
    """Whether the run is a linear probe (model.freeze_backbone) and what it trains: the names of the
    parameters that train ("fc.weight, fc.bias" in a probe, else "all") and how many numbers they hold."""
    names = probe.trained_names(run.model)
    everything = len(names) == len(list(run.model.parameters()))
    return {"probe": run.cfg.model.freeze_backbone, "trained_parameters": "all" if everything else ", ".join(names),
            "trained_parameter_count": probe.trained_count(run.model)}


def start_probe(run: Run, resumed: Resumed) -> None:
    """A linear probe's start (model.freeze_backbone). A random backbone (model.weights=none) first
    re-estimates its BatchNorm statistics on the training images (probe.reestimate_batchnorm: one pass
    without augmentation, normalised as evaluation normalises, each rank its share), once: a resumed run
    keeps the checkpoint's. Without it the statistics are the initial 0 and 1, the random features reach the
    probe at whatever scale the weights give them, and the probe measures nothing. A loaded backbone keeps
    its own statistics: they are part of what it learned."""
    if not run.cfg.model.freeze_backbone or resumed.epoch or resumed.position:
        return
    if config.is_pretrained(run.cfg.model.weights):  # loaded weights, of whatever initialisation
        log.info("linear probe: only %s train; the loaded backbone's weights and BatchNorm statistics are kept as "
                 "loaded (its BatchNorm layers in eval mode)", ", ".join(probe.trained_names(run.model)))
        return
    started = time.perf_counter()
    dataset = run.train_loader.dataset
    loader = components.evaluation_loader(dataset, run.cfg.train.eval_batch_size or 2 * run.cfg.train.batch_size,
                                          run.cfg.data.workers, run.info)
    execution = run.trainer.execution
    batches = probe.reestimate_batchnorm(
        run.model, (execution.augment.eval(images.to(run.info.device, non_blocking=True)) for images, _ in loader),
        lambda: execution.precision.autocast(run.info.device))
    log.info("linear probe of a random backbone: its BatchNorm statistics re-estimated on the %d training images "
             "(%d batches over %d process(es), a cumulative average, without augmentation) in %.1f s: left at their "
             "initial 0 and 1, the random features would reach the probe unnormalised and it would measure nothing",
             len(dataset), batches, run.info.world_size, time.perf_counter() - started)


def split_metrics(prefix: str, result: EvalResult) -> dict:
    """One split's row entries from its evaluation, keys prefixed test_ or val_."""
    return epoch_entries(prefix, result.scores(), result.loss)


def calibration_metrics(head: Head, result: EvalResult) -> dict:
    """A probability head's top-label expected calibration error on the test split (test_ece); with a
    fitted temperature also what it was without (test_ece_before)."""
    if not head.spec.has_probabilities:  # regression: a score
        return {}
    probabilities = head.values(torch.from_numpy(result.outputs)).numpy()
    found = {"test_ece": expected_calibration_error(probabilities, result.targets)["ece"]}
    if head.fit_on == "val" and head.spec.has_probabilities:  # a fitted temperature
        raw = head.logits_of(result.outputs.astype(np.float64)) * head.temperature
        found["test_ece_before"] = expected_calibration_error(head.probabilities_at(raw, 1.0), result.targets)["ece"]
    return found


def end_of_epoch(run: Run, stats: dict, val: EvalResult | None) -> dict:
    """The head's end-of-epoch hook, given the outputs it asked for (head.fit_on): the epoch's training
    batches, the held-out set's, or an eval-mode pass over the training images. Every rank passes the
    same gathered outputs, so every rank's head ends the same. Returns what the head logs."""
    source = run.head.fit_on
    if source is None:
        return {}
    if source == "batches":
        values, labels = stats["outputs"], stats["labels"]
    elif source == "val":
        values, labels = val.outputs, val.targets
    else:
        fitted_on = run.evaluate(run.fit_loader)
        values, labels = fitted_on.outputs, fitted_on.targets
    return run.head.end_of_epoch(values, labels)


def write_epoch_predictions(run: Run, epoch: int, test: EvalResult, val: EvalResult | None, final: bool = False) -> None:
    """Epoch `epoch`'s per-image predictions: the selected epoch's predictions.csv (test) and
    predictions_val.csv as pending files (commit_pending puts them in place once checkpoint_best.pt is
    written), or (`final`) the final planned epoch's predictions_final.csv (test)."""
    files = (((test, run.test_loader, run.run_dir / FINAL_PREDICTIONS_FILE),) if final else
             ((test, run.test_loader, pending_path(run.run_dir / PREDICTIONS_FILE)),
              (val, run.val_loader, pending_path(run.run_dir / VAL_PREDICTIONS_FILE))))
    for result, loader, path in files:
        if result is not None:
            grades, values = result.per_image(run.head)
            write_predictions(path, loader.dataset.names, result.targets, grades, values, result.referable_scores,
                              run.cfg.model.head, loader.dataset.patients, epoch)


def uncertainty(run_dir: Path) -> dict:
    """What the summary says of its figures' uncertainty, from the predictions files there are: bootstrap
    95% intervals of the selected epoch's test metrics (intervals) and of the final epoch's
    (final_intervals); and, with a held-out part, referable DR at screening operating points (thresholds
    fitted on the held-out predictions, sensitivity and specificity on test)."""
    found = {}
    if (run_dir / PREDICTIONS_FILE).is_file():
        test = read_predictions(run_dir / PREDICTIONS_FILE)
        found["intervals"] = bootstrap_intervals(test.labels, test.grades, test.referable_scores, test.patients)
        if (run_dir / VAL_PREDICTIONS_FILE).is_file():
            val = read_predictions(run_dir / VAL_PREDICTIONS_FILE)
            found["operating_points"] = operating_points((val.labels, val.referable_scores),
                                                         (test.labels, test.referable_scores), test.patients)
    if (run_dir / FINAL_PREDICTIONS_FILE).is_file():
        final = read_predictions(run_dir / FINAL_PREDICTIONS_FILE)
        found["final_intervals"] = bootstrap_intervals(final.labels, final.grades, final.referable_scores, final.patients)
    return found


def write_summary(run: Run, figure: bool) -> dict:
    """summary.json (after every epoch, so a run in progress has one); at the end (`figure`) also the
    selected epoch's bootstrap intervals and confusion-matrix figure. The epoch is selected by
    train.select_by on the held-out part (ties: the earlier), else it is the final one; `collapsed`
    says why the selected epoch looks collapsed (metrics.collapse; '' when it does not)."""
    select_by, rows = run.cfg.train.select_by, run.rows
    best = selected_row(rows, select_by)
    final = rows[-1]
    keys = ["epoch", *(k for k in final if k.startswith("test_") and not k.startswith("test_ece")), "train_acc", "train_loss"]
    keys += [k for k in (*(m.key("val") for m in METRICS.values()), "val_loss", "thresholds", "temperature", "test_ece",
                         "test_ece_before") if k in final]
    summary = {
        "run": run.run_dir.name,
        "depth": run.cfg.model.depth,
        "weights": run.cfg.model.weights,
        **run.origin,  # initialisation, and a backbone's pretraining record
        "epochs_completed": final["epoch"],
        "epochs_planned": run.cfg.train.epochs,
        "world_size": run.info.world_size,
        "num_test_samples": int(np.sum(final["confusion_matrix"])),
        "selected_by": select_by if selected_on(final) != FINAL else FINAL,
        "selected_on": selected_on(final),
        "majority_baseline": run.test_baseline,
        "train_majority_baseline": run.train_baseline,
        "collapsed": collapse(np.array(best["confusion_matrix"])),
        "selected": {k: best[k] for k in keys},
        "final": {k: final[k] for k in keys},
        "confusion_matrix": best["confusion_matrix"],
        "final_confusion_matrix": final["confusion_matrix"],
        "train_seconds_total": sum(r["epoch_seconds"] for r in rows),
        "checkpoint_best_epoch": best["epoch"],  # the epoch of checkpoint_best.pt and of predictions.csv
        "patients_in_train_and_test": run.patients["patients_in_train_and_test"],
        "patients": run.patients,
        "skipped_images": run.skipped_images,  # data.bad_images=skip: split, row, file and why, each
        **trained_settings(run),  # a linear probe (model.freeze_backbone) or full training, and what trained
    }
    if figure:
        summary.update(uncertainty(run.run_dir))
    write_text(run.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    if figure:
        from dr_resnet.results.plots import save_confusion_matrix

        how = f"best held-out {select_by}" if selected_on(final) != FINAL else "final"
        save_confusion_matrix(np.array(best["confusion_matrix"]), run.run_dir / CONFUSION_PNG,
                              f"resnet{run.cfg.model.depth} {run.run_dir.name}\nepoch {best['epoch']} ({how}), test: "
                              f"accuracy {best['test_acc']:.1%}, QWK {best['test_qwk']:.3f}"
                              + (" - COLLAPSED" if summary["collapsed"] else ""))
    return summary


def start_tracking(run: Run, wandb_id: str | None, effective: dict) -> Tracker:
    """Rank 0's W&B run. Its config is the run's config with what the run derived from it: train.lr as the
    rate it trains with (the rule's when train.lr is auto) and the whole `effective` section (global batch,
    warm-up, precision, the sampler's grade shares), so that runs compare on what they ran."""
    w, who = run.cfg.wandb, identity(run.cfg.model, run.cfg.train.seed)
    logged = run.cfg.to_dict()
    logged["train"] = {**logged["train"], "lr": effective["lr"]}
    flat = config.settings_of(logged)
    logged.update({f"trial/{key}": flat[key] for key in filter(None, w.trial.split(",")) if key in flat})
    settings = TrackingSettings(w.mode, w.project, w.entity, w.group, w.name, job_type="train",
                                tags=training_tags(who, w.tags),
                                init_timeout=w.init_timeout, log_checkpoint=w.log_checkpoint,
                                log_predictions=w.log_predictions)
    tracker = Tracker(settings, run.run_dir, wandb_id or new_run_id(), {**logged, "effective": effective, "run": who},
                      run.info.is_main)
    if tracker.active:
        log.info("W&B: %s run %s (start took %.1f s)", tracker.mode, tracker.run_id, tracker.start_seconds)
    return tracker


def start_run_folder(run: Run, resumed: Resumed) -> dict:
    """Rank 0 at the start of a launch: the run folder, its config.yaml (with the effective settings it
    returns), its metrics log trimmed to the resume point, its pending predictions settled; and the
    start's log lines."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_unfinished(run.run_dir)
    effective = effective_settings(run)
    config.save(run.cfg, run.run_dir / CONFIG_FILE, recorded={"recipe": run.recipe.to_dict(), "effective": effective})
    run.rows = read_metrics(run.run_dir, resumed.epoch)
    rewrite_metrics(run.run_dir, run.rows)
    for done in settle_pending(run.run_dir, selection(run.rows, run.cfg.train.select_by).get("epoch")):
        log.info("%s: %s", run.run_dir, done)
    held_out = f"{len(run.val_loader.dataset)} held-out / " if run.val_loader else ""
    log.info("%s: resnet%d (%s weights), %d train / %s%d test images, %d process(es) on %s, precision %s, "
             "majority baseline %.1f%%", run.run_dir, run.cfg.model.depth, run.cfg.model.weights,
             len(run.train_loader.dataset), held_out, len(run.test_loader.dataset), run.info.world_size, run.info.device,
             run.trainer.execution.precision.name, 100 * run.test_baseline)
    log.info("learning rate %.6g (%s), global batch %d, %d warm-up steps of %d; sampler %s, grade shares %s in "
             "epoch 1, %s in epoch %d; epoch selection: %s", effective["lr"], effective["lr_rule"],
             effective["global_batch"], effective["warmup_steps"], effective["total_steps"], run.cfg.train.sampler,
             effective["first_epoch_grade_shares"], effective["final_epoch_grade_shares"], run.cfg.train.epochs,
             effective["selection"])
    log.info("patients: %s; %d in training, %d in test", run.patients["identity"], run.patients["train_patients"],
             run.patients["test_patients"])
    for line in overlap_warnings(run.patients, run.cfg.data.test_split):
        log.warning(line)
    if run.head.fit_on == "val" and run.head.spec.has_thresholds and run.cfg.train.select_by == "qwk":
        log.warning("regression.fit_thresholds=val fits the thresholds for QWK on the held-out images whose QWK "
                    "then selects the epoch: the held-out QWK is in-sample (optimistic); fit_thresholds=train "
                    "leaves the held-out part out of sample")
    return effective


def fit(run: Run) -> dict | None:
    """The epoch loop; returns the summary on rank 0. SIGTERM, SIGUSR1 and SIGUSR2 stop it at the next
    step boundary after a checkpoint (RunStopped)."""
    info = run.info
    resumed = resume(run)
    start_probe(run, resumed)
    effective = distributed.rank0_writes("the run folder's config.yaml and metrics.jsonl",
                                         lambda: start_run_folder(run, resumed), info.is_main)
    tracker = start_tracking(run, resumed.wandb_id, effective) if info.is_main else None
    run.wandb_id = tracker.run_id if tracker is not None else None
    try:
        with StopSignals() as signals:
            boundary = StepBoundary(run.cfg.train.checkpoint_every_minutes, signals, info.is_main)
            for epoch in range(resumed.epoch, run.cfg.train.epochs):
                position = resumed.position if resumed.position and resumed.position.epoch == epoch else None
                one_epoch(run, epoch, position, tracker, boundary)
            return finish(run, tracker) if info.is_main and run.rows else None
    finally:
        if tracker is not None:
            tracker.finish()


def one_epoch(run: Run, epoch: int, position: EpochPosition | None, tracker: Tracker | None,
              boundary: StepBoundary) -> None:
    """Train an epoch (from `position` when resuming inside it), score it, record it; stop after its
    checkpoint if a signal came during evaluation."""
    started = time.perf_counter()
    stats, lr = train_epoch(run, epoch, position, boundary)
    row, test, val = score_epoch(run, epoch, stats, lr, started)
    record_epoch(run, epoch, row, test, val, tracker)
    boundary.checkpointed()  # record_epoch wrote the end-of-epoch checkpoint
    decision = boundary.settle()  # a signal that came during evaluation: the checkpoint is written
    if decision.stop_signal:
        raise RunStopped(decision.stop_signal, f"after epoch {epoch + 1}")


def score_epoch(run: Run, epoch: int, stats: dict, lr: float, started: float) -> tuple[dict, EvalResult, EvalResult | None]:
    """The epoch's metrics row: training statistics, the head's end-of-epoch fit, the held-out and test
    evaluations (every rank takes part); with the test and held-out results."""
    eval_start = time.perf_counter()
    distributed.broadcast_buffers(run.model)  # evaluate the model the checkpoint saves (rank 0's statistics)
    if run.trainer.ema is not None:  # the average's statistics, too (each rank averaged its own)
        distributed.broadcast_buffers(run.trainer.ema.module)
    val = run.evaluate(run.val_loader) if run.val_loader else None
    fitted = end_of_epoch(run, stats, val)
    result = run.evaluate(run.test_loader)
    row = {"epoch": epoch + 1, **{k: stats[k] for k in ("train_loss", "train_acc")}, **split_metrics("test", result),
           **calibration_metrics(run.head, result)}
    if val is not None:
        val = EvalResult.of(val.outputs, val.targets, run.head)  # scored by the head as its hook left it
        row.update(split_metrics("val", val), val_confusion_matrix=val.confusion_matrix.tolist())
    row.update({k: stats[k] for k in ("grad_norm_mean", "grad_norm_max", "clipped_share", "data_wait_share") if k in stats})
    row.update({"lr": lr, "nonfinite_steps": stats["nonfinite_steps"], "images_per_s": stats["images_per_s"],
                "train_seconds": stats["train_seconds"], "eval_seconds": time.perf_counter() - eval_start,
                "epoch_seconds": time.perf_counter() - started + stats["resumed_seconds"],
                "confusion_matrix": result.confusion_matrix.tolist(), **fitted})
    return row, result, val


def record_epoch(run: Run, epoch: int, row: dict, test: EvalResult, val: EvalResult | None, tracker: Tracker | None) -> None:
    """Rank 0 appends the row to metrics.jsonl; every rank takes part in the checkpoint (and
    checkpoint_best.pt when the selection moved to this epoch); rank 0 then writes the epoch's
    predictions, the summary, W&B and the log line. Every rank learns whether rank 0's writes worked
    (distributed.rank0_writes), so that a full disk stops them all."""
    def before_checkpoint() -> tuple[bool, checkpoint.TrainingState]:
        append_metrics(run.run_dir, row)
        run.rows.append(row)
        improved = selection(run.rows, run.cfg.train.select_by)["epoch"] == epoch + 1
        if improved:  # pending until checkpoint_best.pt is written: a kill leaves the old pair whole
            write_epoch_predictions(run, epoch + 1, test, val)
        return improved, training_state(run, epoch + 1, metrics=row)

    def after_checkpoint() -> None:
        if improved:
            commit_pending(run.run_dir)
        if epoch + 1 == run.cfg.train.epochs:
            write_epoch_predictions(run, epoch + 1, test, None, final=True)
        write_summary(run, figure=False)

    improved, state = distributed.rank0_writes(f"epoch {epoch + 1}'s metrics and predictions", before_checkpoint,
                                               run.info.is_main) or (False, None)
    save_checkpoint(run, state, best=improved)
    distributed.rank0_writes(f"epoch {epoch + 1}'s predictions and summary", after_checkpoint, run.info.is_main)
    if not run.info.is_main:
        return
    if improved:
        tracker.log_checkpoint(run.run_dir / BEST_CHECKPOINT, checkpoint_metadata(run, row))
    tracker.log_epoch(row)
    held_out = f"val QWK {row['val_qwk']:.3f}  " if val is not None else ""
    skipped = f"  {row['nonfinite_steps']} non-finite step(s) left out" if row["nonfinite_steps"] else ""
    log.info("epoch %d/%d  train loss %.4f acc %.1f%%  %stest loss %.4f acc %.1f%% QWK %.3f  %.0f img/s  %.0fs%s",
             epoch + 1, run.cfg.train.epochs, row["train_loss"], 100 * row["train_acc"], held_out, row["test_loss"],
             100 * row["test_acc"], row["test_qwk"], row["images_per_s"], row["epoch_seconds"], skipped)


def checkpoint_metadata(run: Run, row: dict) -> dict:
    """What a model artifact says about its checkpoint: the selected epoch, how it was selected, its
    held-out and test metrics (METRICS), the arm and the recipe."""
    keys = [m.key(split) for split in ("test", "val") for m in METRICS.values()]
    return {"epoch": row["epoch"], "selected_on": selected_on(row), "select_by": run.cfg.train.select_by,
            "arm": run.cfg.model.arm, "head": run.cfg.model.head, "recipe": run.recipe.to_dict(),
            **{k: row[k] for k in keys if k in row}}


def finish(run: Run, tracker: Tracker) -> dict:
    """Rank 0 after the last epoch: the summary with its intervals and figure, and W&B's summary, best
    checkpoint and predictions table; checkpoint_prev.pt is dropped."""
    summary = write_summary(run, figure=True)
    drop_previous_checkpoint(run.run_dir)
    tracker.log_summary(summary, run.run_dir / CONFUSION_PNG)
    tracker.log_checkpoint(run.run_dir / BEST_CHECKPOINT,
                           {**checkpoint_metadata(run, summary["selected"]), "intervals": summary.get("intervals", {})})
    tracker.log_predictions(run.run_dir / PREDICTIONS_FILE)
    return summary


def drop_previous_checkpoint(run_dir: Path) -> None:
    """A finished run's checkpoint_prev.pt goes: it was the fallback while checkpoint_last.pt could be half
    written, and a trial kept three checkpoints (30 small tuning trials took 12 GB). checkpoint_last.pt
    stays: a larger train.epochs extends the run from it, and older report paths name it."""
    (run_dir / PREV_CHECKPOINT).unlink(missing_ok=True)


def refuse_pruned(run_dir: Path, resume_policy: str) -> None:
    """Stop, in one line, in a run folder whose checkpoints were pruned (launch.sweep --keep-checkpoints):
    it cannot resume, and training it from scratch in place would silently replace a finished run's
    results. train.resume=never asks for that start over (its files are moved aside, not deleted)."""
    note = pruned_note(run_dir)
    if note and resume_policy != "never" and not (run_dir / LAST_CHECKPOINT).exists():
        raise checkpoint.CheckpointError(
            f"{run_dir}: {note}, so the run cannot resume, and it is not trained again from scratch in place: "
            f"set output.dir (or launch.sweep's --out) to another folder, or delete {run_dir} to train it there anew")


def combined_totals(ranks: list[dict]) -> dict:
    """Running totals that several ranks wrote, as one rank's (resuming with another number of processes)."""
    outputs = [r["totals"]["outputs"] for r in ranks if r["totals"]["outputs"] is not None]
    labels = [r["totals"]["labels"] for r in ranks if r["totals"]["labels"] is not None]
    return {"images": sum(r["totals"]["images"] for r in ranks),
            "sums": sum(r["totals"]["sums"] for r in ranks),
            "nonfinite": max(r["totals"]["nonfinite"] for r in ranks),
            "outputs": torch.cat(outputs) if outputs else None, "labels": torch.cat(labels) if labels else None}


def restore_ranks(position: EpochPosition, generator: torch.Generator, totals: EpochTotals, info: DistInfo) -> None:
    """Each rank's augmentation stream and running totals from a mid-epoch checkpoint. Resumed by another
    number of processes, the epoch goes on with its remaining images shared out anew: fresh augmentation
    streams, and rank 0 carries the totals so far; on another kind of device (a CPU checkpoint on a GPU),
    fresh streams. Close to, but not bit for bit, an uninterrupted run."""
    ranks = position.ranks
    if len(ranks) == info.world_size:
        totals.restore(ranks[info.rank]["totals"])
        if position.device in ("", generator.device.type):
            try:
                generator.set_state(ranks[info.rank]["augment"])
                return
            except RuntimeError:  # written before 0.4 (no device recorded) on another kind of device
                pass
        if info.is_main:
            log.warning("the checkpoint was written on %s in the middle of epoch %d; this run goes on on %s with fresh "
                        "augmentation streams: close to, but not bit for bit, an uninterrupted run",
                        position.device or "another kind of device", position.epoch + 1, generator.device.type)
        return
    if info.is_main:
        log.warning("the checkpoint was written by %d process(es) in the middle of epoch %d; %d continue it with "
                    "the epoch's remaining images: the result will not be bit for bit that of an uninterrupted run",
                    len(ranks), position.epoch + 1, info.world_size)
        totals.restore(combined_totals(ranks))


def nonfinite_error(totals: EpochTotals, epoch: int, lrs: dict[int, float], train: TrainConfig, lr: float) -> NonFiniteError:
    """Where the first non-finite step was and what to try; `lr` is the run's learning rate (train.lr may be auto)."""
    found = totals.first_nonfinite_step()
    if found is None:
        where = f"epoch {epoch + 1}: another process met a non-finite loss or gradient (its error says where)"
    else:
        step, loss = found
        lr = lrs.get(step)
        where = (f"epoch {epoch + 1}, step {step + 1}: non-finite loss or gradient (loss {loss:.4g}"
                 + (f", learning rate {lr:.4g})" if lr is not None else ")"))
    return NonFiniteError(f"{where}. Nothing was saved after it: the last checkpoint is untouched. Try a lower "
                          f"train.lr (now {'auto: ' if train.lr is None else ''}{lr:g}), train.clip_grad_norm=1.0 (now "
                          f"{train.clip_grad_norm:g}), or "
                          f"train.nonfinite=skip to leave such steps out")


def train_epoch(run: Run, epoch: int, position: EpochPosition | None, boundary: StepBoundary) -> tuple[dict, float]:
    """The training steps of one epoch (from `position`, a mid-epoch checkpoint's, when resuming), with a
    collective decision at every step boundary: write a resumable checkpoint (the clock, a signal), stop
    (a signal: RunStopped), or fail (a non-finite step: NonFiniteError). Returns the epoch's training
    statistics and the learning rate it started with."""
    from tqdm import tqdm

    info, t, trainer = run.info, run.cfg.train, run.trainer
    first_step, began_with = (position.step, position.began_with) if position else (0, info.world_size)
    start_images, seconds_before = (position.images, position.seconds) if position else (0, 0.0)
    run.train_sampler.set_epoch(epoch, start_images, began_with)
    generator = epoch_generator(t.seed, epoch, info.rank, info.device)
    totals = EpochTotals(info.device, keep_outputs=run.head.fit_on == "batches")
    if position:
        restore_ranks(position, generator, totals, info)
    epoch_lr = position.lr if position and position.lr is not None else trainer.optimizer.param_groups[0]["lr"]
    base_lr = trainer.optimizer.param_groups[0]["initial_lr"]  # the run's rate (train.lr may say auto)
    steps = first_step + len(run.train_loader)
    started = time.perf_counter()
    lrs = {first_step: trainer.optimizer.param_groups[0]["lr"]}  # each recent step's learning rate
    watch_nonfinite = t.nonfinite == "stop"

    def at_boundary(done: int) -> None:
        lrs[done] = trainer.optimizer.param_groups[0]["lr"]
        lrs.pop(done - 64, None)
        seen = watch_nonfinite and totals.nonfinite_seen()
        decision = boundary.decide(seen)
        if decision.nonfinite:
            raise nonfinite_error(totals, epoch, lrs, t, base_lr)
        if decision.checkpoint:
            checkpoint_here(done, decision)
        boundary.send(seen)

    def checkpoint_here(done: int, decision: Decision) -> None:
        if watch_nonfinite and distributed.all_reduce_max(torch.tensor([int(totals.nonfinite)])).item():
            raise nonfinite_error(totals, epoch, lrs, t, base_lr)  # never a checkpoint of weights a bad step touched
        here = EpochPosition(epoch, done, steps, began_with, info.world_size,
                             start_images + (done - first_step) * t.batch_size * info.world_size, epoch_lr,
                             seconds_before + time.perf_counter() - started,
                             distributed.all_gather_objects({"augment": generator.get_state(), "totals": totals.state()}),
                             generator.device.type)
        state = training_state(run, epoch, here) if info.is_main else None
        save_checkpoint(run, state)
        boundary.checkpointed()
        log.info("checkpoint in epoch %d after step %d of %d", epoch + 1, done, steps)
        if decision.stop_signal:
            raise RunStopped(decision.stop_signal, f"in epoch {epoch + 1} after step {done} of {steps}")

    bar = tqdm(total=steps * t.batch_size, initial=first_step * t.batch_size, desc=f"epoch {epoch + 1}/{t.epochs}",
               unit="img", disable=not info.is_main, mininterval=1 if sys.stderr.isatty() else 30, leave=False)
    try:
        stats = trainer.epoch(run.train_loader, generator, bar, t.log_every, totals=totals, first_step=first_step,
                              boundary=at_boundary, seconds_before=seconds_before)
    finally:
        bar.close()
    stats["resumed_seconds"] = seconds_before
    if stats["nonfinite_steps"]:
        if t.nonfinite == "stop":
            raise nonfinite_error(totals, epoch, lrs, t, base_lr)
        if stats["nonfinite_steps"] > t.nonfinite_skip_limit * steps:
            raise NonFiniteError(f"epoch {epoch + 1}: {stats['nonfinite_steps']} of {steps} steps had a non-finite loss "
                                 f"or gradient, more than train.nonfinite_skip_limit={t.nonfinite_skip_limit:g} of them: "
                                 f"the run is diverging. Try a lower train.lr or train.clip_grad_norm=1.0")
    return stats, epoch_lr


def describe_summary(summary: dict) -> str:
    """The run's last line: the selected epoch's test figures (and how it was selected), the final epoch's,
    and COLLAPSED with the reason when the selected epoch looks collapsed."""
    b, f = summary["selected"], summary["final"]
    recall = " ".join(f"{r:.2f}" for r in b["test_recall"])
    ci = summary.get("intervals")
    qwk_ci = f" (95% CI {ci['qwk']['low']:.3f}-{ci['qwk']['high']:.3f}, resampling {ci['unit']})" if ci else ""
    how = "final epoch, nothing held out" if summary["selected_on"] == FINAL else f"best held-out {summary['selected_by']}"
    collapsed = f"; COLLAPSED: {summary['collapsed']}" if summary.get("collapsed") else ""
    return (f"{summary['run']}: selected epoch {b['epoch']} ({how}): test accuracy {b['test_acc']:.1%} (majority "
            f"baseline {summary['majority_baseline']:.1%}), QWK {b['test_qwk']:.3f}{qwk_ci}, recall per grade {recall}; "
            f"final epoch {f['epoch']}: accuracy {f['test_acc']:.1%}, QWK {f['test_qwk']:.3f}{collapsed}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config_file, overrides = args.config, args.overrides
    try:
        cfg = config.load(config_file, overrides)
        config.refuse_sweep_keyword(cfg)  # model.weights=ssl names no file outside launch.sweep
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        return 0

    def work(info: DistInfo) -> int:
        announce_launch(log, Path(cfg.output.dir), config_file, overrides, info)
        refuse_pruned(Path(cfg.output.dir), cfg.train.resume)  # before any data is read
        try:
            summary = fit(build(cfg, info))
        except RunStopped as stop:
            log.warning("%s", stop)
            return stop.exit_code
        if summary:
            print(describe_summary(summary), flush=True)
        return 0
    run_dir = Path(cfg.output.dir)
    fresh = not run_dir.exists()
    code = distributed.run_entry(work, device=cfg.train.device)
    if code != 0 and fresh:
        remove_if_never_started(run_dir)
    return code


def announce_launch(logger: logging.Logger, run_dir: Path, config_file: str | None, overrides: list[str],
                    info: DistInfo) -> None:
    """The run folder's train.log joined, and its first lines of a launch: the version, config and overrides
    (results/rundir.py's LAUNCH_LINE finds the last launch by it: a failed run's own error is read after it),
    then the environment. Training and pretraining both start so."""
    distributed.log_to_file(run_dir / TRAIN_LOG, info)
    logger.info("dr_resnet %s: config %s%s", __version__, config_file or "(defaults)",
                f" + {' '.join(overrides)}" if overrides else "")
    logger.info("environment: %s; %d process(es) (%s) on %s", environment(), info.world_size, info.launcher,
                info.device)


def remove_if_never_started(run_dir: Path) -> None:
    """A run folder this launch made, holding nothing but its train.log (the run failed before its first
    checkpoint: bad data, config, devices), is removed: its error was printed, and a stale folder would
    make the next launch look like a resume. Anything more is kept."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {TRAIN_LOG}:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
