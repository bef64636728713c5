"""Checkpoints: the training state, typed (TrainingState), written atomically, read with weights_only.

The file holds one dict with exactly TrainingState's fields:
  model      plain state dict: torchvision key names, no DDP or torch.compile prefix
  optimizer  optimizer.state_dict()
  scheduler  the learning-rate scheduler's state_dict()
  scaler     the GradScaler's state_dict() ({} unless fp16)
  precision  fp32, bf16 or fp16 (absent before 0.2: None)
  epoch      epochs completed
  position   {} at an epoch's end; in the middle of one (a timed or signalled checkpoint): where to go on,
             see EpochPosition (the epoch, the images the processes have used, their count, the
             epoch's learning rate and seconds so far, and per rank its augmentation stream and running
             totals)
  best       the selection rule's choice so far: metric, split ("on"), value, epoch
  rng        torch's CPU random state ({"torch": ...}; earlier versions also held CUDA states, ignored)
  config     the resolved config as a dict (config.from_dict reads it, old keys included)
  wandb_id   the W&B run id, so a resumed run continues the same W&B run
  head       the head's state (a regression head's thresholds; absent before 0.1.1: {})
  recipe     what photos go through before the network (recipe.Recipe.to_dict; absent before 0.2: {})
  provenance where the model comes from: dr_resnet and torch versions, the data root, its splits' sizes
             and class counts (absent before 0.2: {})
  metrics    the metrics.jsonl row of the epoch this state completes ({} in the middle of an epoch, and
             before 0.2)
  ema        train.ema's weight average (training.average: module.* weights and statistics, n_averaged): the
             weights the run evaluated and selected, which every reader loads (TrainingState.weights); {}
             without
File names: rundir.LAST_CHECKPOINT, rundir.PREV_CHECKPOINT (the one before, kept until the next is
complete; dropped when the run finishes), rundir.BEST_CHECKPOINT.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from dr_resnet.errors import UserError
from dr_resnet.files import atomic_path, sync_folder, temporary_name
from dr_resnet.results.rundir import missing_checkpoint

log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A file that is not a usable dr_resnet training checkpoint; the message names it and why."""


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint could not be written (disk full, permissions...); the message names the file."""


@dataclass(frozen=True)
class EpochPosition:
    """Where a checkpoint inside an epoch stopped, and what going on from there needs (TrainingState.position
    holds it as a plain dict: a checkpoint holds no classes)."""

    epoch: int  # 0-based
    step: int  # steps done in the epoch
    steps: int  # the epoch's steps
    began_with: int  # processes that began the epoch (the sampler's share-out)
    world_size: int  # processes that wrote this position
    images: int  # images the processes have used in the epoch so far
    lr: float | None  # the learning rate the epoch started with (its metrics row's; None: not recorded)
    seconds: float  # training seconds in the epoch so far
    ranks: list  # per rank: {"augment": its augmentation stream's state, "totals": EpochTotals.state()}
    device: str = ""  # the writers' device type (cuda, cpu): their streams' states fit only that kind of generator

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, saved: dict[str, Any]) -> "EpochPosition | None":
        """A checkpoint's position, or None at an epoch's end ({}); what older versions did not record
        takes what they assumed (the writers' count of processes, no seconds)."""
        if not saved:
            return None
        ranks = saved["ranks"]
        return cls(saved["epoch"], saved["step"], saved.get("steps", saved["step"]), saved.get("began_with", len(ranks)),
                   saved.get("world_size", len(ranks)), saved.get("images", 0), saved.get("lr"), saved.get("seconds", 0.0),
                   ranks, saved.get("device", ""))


@dataclass
class TrainingState:
    """Everything a resume, an evaluation or a weights file needs from a run, in one typed record."""

    model: dict[str, Any]  # the trained weights (what a resume trains on)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    epoch: int
    best: dict[str, Any]
    config: dict[str, Any]
    precision: str | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    wandb_id: str | None = None
    head: dict[str, Any] = field(default_factory=dict)
    position: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Any] = field(default_factory=dict)  # train.ema: ExponentialAverage's state ({} without)

    def weights(self) -> dict[str, Any]:
        """The weights the run evaluated and selected: the average's with train.ema, else the model's."""
        from dr_resnet.model.resnet import evaluated_weights

        return dict(evaluated_weights(self.model, self.ema))

    def save(self, path: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> None:
        save({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, path, keep_previous)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainingState":
        """Read a checkpoint written by any version; a file that is no training state names what is missing,
        a damaged one (truncated, not a torch file) says so."""
        try:
            raw = load(path)
        except FileNotFoundError:
            raise
        except Exception as exc:  # a damaged file fails in many ways (zip, pickle, EOF)
            raise CheckpointError(f"{path}: cannot be read as a checkpoint ({_reason(exc)})") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - set(raw) if isinstance(raw, dict) else required
        if missing:
            raise CheckpointError(f"{path}: not a dr_resnet training checkpoint (missing {', '.join(sorted(missing))}); "
                                  f"a plain state dict can start a run as model.weights=PATH")
        return cls(**{k: v for k, v in raw.items() if k in fields})


def save(state: dict[str, Any], path: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename: a reader (or a run
    killed at any moment, even by a power cut) finds the old file or the new one, never half of one.
    With keep_previous, the file `path` held until now is kept under that name. A write that fails
    raises CheckpointWriteError, removes its temporary file, and leaves `path` as it was."""
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = None
        try:
            with open(tmp, "wb") as f:
                writer = _Writer(f)
                torch.save(state, writer)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as RuntimeError
            kept = f"{path} is unchanged" if path.exists() else f"{path} was not written before"
            cause = writer.error if writer is not None and writer.error is not None else exc
            raise CheckpointWriteError(f"cannot write the checkpoint {path}: {_reason(cause)}; {kept}. Free disk "
                                       f"space or fix the folder's permissions, then start the run again to resume") from exc
        if keep_previous is not None and path.exists():
            previous = Path(keep_previous)
            link = temporary_name(previous)
            link.unlink(missing_ok=True)
            os.link(path, link)  # the current file under a second name, then renamed: no moment without either
            os.replace(link, previous)
    sync_folder(path.parent)  # POSIX: a rename is on disk once its folder is synced


def remove_unfinished(folder: Path) -> None:
    """Delete the temporary files of checkpoint writes that a killed process left half done."""
    for tmp in Path(folder).glob(".checkpoint_*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
        log.info("removed %s, a checkpoint write that did not finish", tmp)


class _Writer:
    """A file for torch.save that remembers the operating system's error: torch's zip writer replaces it
    with its own ("unexpected pos ...")."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _reason(exc: BaseException) -> str:
    """One line for a failure: the OS's words for an OSError, else the first line of the message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return (text[0][:300] if text else type(exc).__name__)


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing_checkpoint(path))  # pruned by launch.sweep: says so
    return torch.load(path, map_location="cpu", weights_only=True)


def load_resumable(candidates: Sequence[Path]) -> tuple[TrainingState, Path] | None:
    """The first of `candidates` (newest first) that is a readable training checkpoint, and its path;
    None when none exists. A file that exists but is damaged (truncated, not a checkpoint) is reported
    by name with a warning and the next one is tried; CheckpointError says what to do when none is usable."""
    problems = []
    for path in candidates:
        if not Path(path).is_file():
            continue
        try:
            state = TrainingState.load(path)
        except Exception as exc:  # a damaged file can fail in many ways (zip, pickle, EOF, missing fields)
            problems.append(f"{path} ({_reason(exc)})")
            log.warning("cannot resume from %s: %s", path, _reason(exc))
            continue
        if problems:
            log.warning("resuming from the previous checkpoint %s instead", path)
        return state, Path(path)
    if problems:
        raise CheckpointError(f"no usable checkpoint to resume from: {'; '.join(problems)}. Delete these files to start "
                              f"the run again from scratch, or set output.dir to a new directory")
    return None


def rng_state() -> dict[str, Any]:
    """The random state a resume needs: torch's CPU generator only. Nothing draws from the CUDA
    generators (augmentation uses its own per-(seed, epoch, rank) generator, on the device), so their
    states are not saved: they would tie a checkpoint to the number of GPUs that wrote it."""
    return {"torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    """Restore rng_state's CPU state. CUDA states that earlier versions saved (one per GPU rank 0 could
    see) are ignored, so a 4-GPU run resumes on 1 or 2 GPUs, or under per-task GPU binding."""
    torch.set_rng_state(state["torch"])
