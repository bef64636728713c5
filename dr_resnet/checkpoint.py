"""Checkpoints: one dict with every piece of training state, written atomically, read with weights_only.

Keys: model (plain state dict, torchvision names, no DDP or torch.compile prefix), optimizer, scheduler,
scaler, precision (fp32, bf16 or fp16), epoch (epochs completed), best (the selection metric's best value
and epoch), rng (torch's CPU state), config (the resolved config as a dict), wandb_id, head (the head's
state: a regression head's thresholds). File names: rundir.LAST_CHECKPOINT, rundir.BEST_CHECKPOINT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


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
