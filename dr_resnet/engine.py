"""The loops: one training epoch, one exact evaluation. Nothing else lives here."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from . import metrics
from .augment import DeviceAugment
from .distributed import all_gather_objects, all_reduce_sum


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
                    scheduler: torch.optim.lr_scheduler.LRScheduler, head, augment: DeviceAugment,
                    generator: torch.Generator, device: torch.device, precision: Precision,
                    scaler: torch.amp.GradScaler, channels_last: bool = False, progress=None,
                    log_every: int = 20, clip_grad_norm: float = 0.0, keep_outputs: bool = False) -> dict:
    """One pass over the loader; returns loss, accuracy and images summed over every process (and, with
    keep_outputs, every rank's outputs and labels, to fit a regression head's thresholds on).
    `progress` (a tqdm bar) shows the loss every log_every batches (reading it syncs a GPU)."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images
    kept_outputs, kept_labels = [], []
    start = time.perf_counter()
    show = progress is not None and not progress.disable
    for step, (images, labels) in enumerate(loader):
        images, labels = _to_device(images, labels, device, channels_last)
        inputs = augment.train(images, generator)
        with precision.autocast(device):
            outputs = model(inputs)
            loss = head.loss(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad_norm > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = labels.shape[0]
        totals += torch.stack([loss.detach().double() * n, (head.predict_outputs(outputs.detach()) == labels).sum().double(),
                               torch.tensor(float(n), dtype=torch.float64, device=device)])
        if keep_outputs:
            kept_outputs.append(outputs.detach().float().squeeze(1).cpu())
            kept_labels.append(labels.cpu())
        if show:
            progress.update(n)
            if step % log_every == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    seconds = time.perf_counter() - start
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    stats = {"train_loss": loss_sum / count, "train_acc": correct / count, "train_images": int(count),
             "train_seconds": seconds, "images_per_s": count / seconds}
    if keep_outputs:
        shards = all_gather_objects((torch.cat(kept_outputs).numpy(), torch.cat(kept_labels).numpy()))
        stats["outputs"] = np.concatenate([o for o, _ in shards])
        stats["labels"] = np.concatenate([lab for _, lab in shards])
    return stats


@dataclass(frozen=True)
class EvalResult:
    """A whole split's evaluation, identical on every rank: the confusion matrix (counts), the mean
    loss (cross-entropy, or squared error for regression), and per image (in shard order): the head's
    output (class probabilities, or the regressed grade; TTA views averaged), the referable-DR score
    (grade >= 2) and the true grade."""

    confusion_matrix: np.ndarray
    loss: float
    outputs: np.ndarray
    referable_scores: np.ndarray
    targets: np.ndarray

    @classmethod
    def of(cls, outputs: np.ndarray, targets: np.ndarray, head) -> "EvalResult":
        """Score the head's outputs (a regression head cuts them at its current thresholds)."""
        values, labels = torch.from_numpy(outputs), torch.from_numpy(targets)
        cm = metrics.confusion_matrix(targets, head.predict(values).numpy())
        loss = head.eval_loss_sum(values.double(), labels).item() / len(targets) if len(targets) else 0.0
        return cls(cm, loss, outputs, head.referable_score(values).numpy(), targets)

    def scores(self) -> dict:
        """Every metric of metrics.summarize, plus the referable-DR ROC AUC."""
        auc = metrics.roc_auc(self.targets >= metrics.REFERABLE_GRADE, self.referable_scores)
        return {**metrics.summarize(self.confusion_matrix), "referable_auc": auc}


TTA_MODES = ("none", "flips")


def _views(inputs: Tensor, tta: str) -> list[Tensor]:
    """The image alone, or with its h-, v- and hv-flips (tta='flips')."""
    return [inputs] if tta == "none" else [inputs, inputs.flip(-1), inputs.flip(-2), inputs.flip(-1, -2)]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, augment: DeviceAugment, device: torch.device,
             precision: Precision, head, channels_last: bool = False, tta: str = "none") -> EvalResult:
    """Every image of the split exactly once, gathered across processes and scored. With TTA the
    head averages its views (probabilities, or regression outputs) before predicting.

    Pass the bare model (not the DDP wrapper): shards may differ in length by one, and DDP's forward
    could wait on a collective that the other ranks never reach.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    model.eval()
    outputs, targets = [], []
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with precision.autocast(device):
            aggregated = head.aggregate([model(v) for v in _views(augment.eval(images), tta)])
        outputs.append(aggregated.float().cpu())
        targets.append(labels.cpu())
    local = (torch.cat(outputs).numpy() if outputs else np.zeros((0, head.outputs) if head.outputs > 1 else 0, np.float32),
             torch.cat(targets).numpy() if targets else np.zeros(0, np.int64))
    shards = all_gather_objects(local)
    return EvalResult.of(np.concatenate([o for o, _ in shards]),
                         np.concatenate([t for _, t in shards]).astype(np.int64), head)
