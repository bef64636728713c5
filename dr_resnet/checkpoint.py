"""Checkpoints: the training state, typed (TrainingState), written atomically, read with weights_only.

The file holds one dict with exactly TrainingState's fields:
  model      plain state dict: torchvision key names, no DDP or torch.compile prefix
  optimizer  optimizer.state_dict()
  scheduler  the learning-rate scheduler's state_dict()
  scaler     the GradScaler's state_dict() ({} unless fp16)
  precision  fp32, bf16 or fp16 (absent before 0.2: None)
  epoch      epochs completed
  best       the selection rule's choice so far: metric, split ("on"), value, epoch
  rng        torch's CPU random state ({"torch": ...}; earlier versions also held CUDA states, ignored)
  config     the resolved config as a dict (config.from_dict reads it, old keys included)
  wandb_id   the W&B run id, so a resumed run continues the same W&B run
  head       the head's state (a regression head's thresholds; absent before 0.1.1: {})
File names: rundir.LAST_CHECKPOINT, rundir.BEST_CHECKPOINT.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A file that is not a dr_resnet training checkpoint; the message names it and what is missing."""


@dataclass
class TrainingState:
    """Everything a resume, an evaluation or a weights file needs from a run, in one typed record."""

    model: dict[str, Any]
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

    def save(self, path: str | os.PathLike) -> None:
        save({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainingState":
        """Read a checkpoint written by any version; a file that is no training state names what is missing."""
        raw = load(path)
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - set(raw) if isinstance(raw, dict) else required
        if missing:
            raise CheckpointError(f"{path}: not a dr_resnet training checkpoint (missing {', '.join(sorted(missing))}); "
                                  f"a plain state dict can start a run as model.weights=PATH")
        return cls(**{k: v for k, v in raw.items() if k in fields})


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """The random state a resume needs: torch's CPU generator only. Nothing draws from the CUDA
    generators (augmentation uses its own per-(seed, epoch, rank) generator, on the device), so their
    states are not saved: they would tie a checkpoint to the number of GPUs that wrote it."""
    return {"torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    """Restore rng_state's CPU state. CUDA states that earlier versions saved (one per GPU rank 0 could
    see) are ignored, so a 4-GPU run resumes on 1 or 2 GPUs, or under per-task GPU binding."""
    torch.set_rng_state(state["torch"])
