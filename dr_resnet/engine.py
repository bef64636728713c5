"""The loops: one training epoch, one exact evaluation. Nothing else lives here."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from . import NUM_GRADES
from .augment import DeviceAugment
from .distributed import all_gather_objects, all_reduce_sum
from .metrics import REFERABLE_GRADE


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: full fp32) and whether fp16 loss scaling is on."""

    dtype: torch.dtype | None = None

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rank r of w gets indices r, r+w, r+2w...: every sample exactly once over all ranks, no padding
    (DistributedSampler pads with duplicates, which would be counted twice in evaluation)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _to_device(images: Tensor, labels: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, augment: DeviceAugment,
                    generator: torch.Generator, device: torch.device, precision: Precision,
                    scaler: torch.amp.GradScaler, channels_last: bool = False, progress=None,
                    log_every: int = 20) -> dict[str, float]:
    """One pass over the loader; returns loss, accuracy and images summed over every process.
    `progress` (a tqdm bar) shows the loss every log_every batches (reading it syncs a GPU)."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
    start = time.perf_counter()
    show = progress is not None and not progress.disable
    for step, (images, labels) in enumerate(loader):
        images, labels = _to_device(images, labels, device, channels_last)
        inputs = augment.train(images, generator)
        with precision.autocast(device):
            logits = model(inputs)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = labels.shape[0]
        totals += torch.stack([loss.detach().double() * n, (logits.argmax(1) == labels).sum().double(),
                               torch.tensor(float(n), dtype=torch.float64, device=device)])
        if show:
            progress.update(n)
            if step % log_every == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - start
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    return {"train_loss": loss_sum / count, "train_acc": correct / count, "train_images": int(count),
            "train_seconds": seconds, "images_per_s": count / seconds}


@dataclass(frozen=True)
class EvalResult:
    """A whole split's evaluation, identical on every rank: the confusion matrix (counts), the mean
    cross-entropy, and each image's probability of referable DR (grade >= 2) with its true grade."""

    confusion_matrix: np.ndarray
    loss: float
    referable_scores: np.ndarray
    targets: np.ndarray


TTA_MODES = ("none", "flips")


def _probabilities(model: nn.Module, inputs: Tensor, tta: str) -> Tensor:
    """Softmax over grades; with tta='flips', averaged over the image and its h-, v- and hv-flips."""
    views = [inputs] if tta == "none" else [inputs, inputs.flip(-1), inputs.flip(-2), inputs.flip(-1, -2)]
    return torch.stack([model(v).float().softmax(dim=1) for v in views]).mean(dim=0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, augment: DeviceAugment, device: torch.device,
             precision: Precision, channels_last: bool = False, tta: str = "none") -> EvalResult:
    """Every image of the split exactly once, summed (and gathered) across processes.

    Pass the bare model (not the DDP wrapper): shards may differ in length by one, and DDP's forward
    could wait on a collective that the other ranks never reach.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    model.eval()
    cm = torch.zeros(NUM_GRADES * NUM_GRADES, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    scores, targets = [], []
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with precision.autocast(device):
            probs = _probabilities(model, augment.eval(images), tta)
        loss_sum += nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double()
        cm += torch.bincount(labels * NUM_GRADES + probs.argmax(1), minlength=NUM_GRADES**2).double()
        scores.append(probs[:, REFERABLE_GRADE:].sum(dim=1).cpu())
        targets.append(labels.cpu())
    totals = all_reduce_sum(torch.cat([cm, loss_sum]))
    cm_counts = totals[:-1].cpu().numpy().round().astype(np.int64).reshape(NUM_GRADES, NUM_GRADES)
    count = cm_counts.sum()
    local = (torch.cat(scores).numpy() if scores else np.zeros(0), torch.cat(targets).numpy() if targets else np.zeros(0, np.int64))
    shards = all_gather_objects(local)
    return EvalResult(cm_counts, float(totals[-1].item() / count) if count else 0.0,
                      np.concatenate([s for s, _ in shards]), np.concatenate([t for _, t in shards]).astype(np.int64))
