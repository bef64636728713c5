"""Checkpoints: one dict with every piece of training state, written atomically, read with weights_only.

Keys: model (plain state dict, torchvision names, no DDP prefix), optimizer, scheduler, scaler, epoch
(epochs completed), best (the selection metric's best value and epoch), rng (torch CPU/CUDA states),
config (the resolved config as a dict), wandb_id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"


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
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
