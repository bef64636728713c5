"""The loops: one training epoch, one exact evaluation. Nothing else lives here.

On CUDA the hot loop never waits for the host: batches arrive pinned and are copied asynchronously,
augmentation parameters are drawn on the GPU, loss and accuracy accumulate on the GPU and are reduced
once per epoch, and the progress bar shows a loss copied back asynchronously (a few steps late).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from dr_resnet.data.augment import DeviceAugment
from dr_resnet.errors import UserError
from dr_resnet.registry import NONFINITE
from dr_resnet.results import metrics
from dr_resnet.training.average import ExponentialAverage
from dr_resnet.training.distributed import all_reduce_max, all_reduce_sum, gather_rows, gather_sharded, is_distributed
from dr_resnet.training.probe import frozen_batchnorm
from dr_resnet.training.runtime import Precision, Stopwatch

if TYPE_CHECKING:
    from dr_resnet.model.heads import Head


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rank r of w gets indices r, r+w, r+2w...: every sample exactly once over all ranks, no padding
    (DistributedSampler pads with duplicates, which would be counted twice in evaluation)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _to_device(images: Tensor, labels: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


class LaggedValue:
    """A device scalar for display without a host sync: `push` starts an asynchronous copy into pinned
    memory (unless one is still on its way), `latest` returns the newest copy that has landed. On CPU
    the value is read at once."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffer = torch.zeros((), dtype=torch.float64, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False
        self.value: float | None = None

    def push(self, value: Tensor) -> None:
        if not self.cuda:
            self.value = float(value)
            return
        self.latest()
        if not self.pending:
            self.buffer.copy_(value.detach(), non_blocking=True)
            self.event.record()
            self.pending = True

    def latest(self) -> float | None:
        if self.cuda and self.pending and self.event.query():
            self.value, self.pending = float(self.buffer), False
        return self.value


@dataclass
class EpochTotals:
    """One rank's running totals of an epoch, kept on the device until `reduce`: loss x images, correct
    and images over the steps that counted, steps whose loss or gradient was not finite (the first one's
    step and loss), and with keep_outputs the outputs and labels. `state`/`restore` carry them through
    a mid-epoch checkpoint, so a resumed epoch sums exactly what an uninterrupted one would."""

    device: torch.device
    keep_outputs: bool = False
    images: int = 0  # seen, counted or not
    sums: Tensor = field(init=False)  # loss x images, correct, images, over the finite steps
    nonfinite: Tensor = field(init=False)  # steps with a non-finite loss or gradient
    first_nonfinite: Tensor = field(init=False)  # (step, loss) of the first one; step -1 while none
    grad: Tensor = field(init=False)  # the gradients' global norm before clipping: sum, max, steps clipped, steps
    clipping: bool = False  # whether the norms were clipped (clipped_share is reported only then)
    data_wait: float = 0.0  # seconds the host waited for the loader's next batch (host time: no device sync)
    outputs: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        self.first_nonfinite = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=self.device)
        self.grad = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.seen = LaggedValue(self.device)

    def add(self, step: int, loss: Tensor, outputs: Tensor, labels: Tensor, correct: Tensor, finite: Tensor) -> None:
        n = labels.shape[0]
        loss = loss.detach().double()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums += torch.where(finite, torch.stack([loss * n, correct.double(), zero + n]), zero)
        self.images += n
        bad = ~finite
        self.nonfinite += bad
        first = bad & (self.first_nonfinite[0] < 0)
        self.first_nonfinite = torch.where(first, torch.stack([zero + step, loss]), self.first_nonfinite)
        if self.device.type == "cuda":
            self.seen.push(self.nonfinite)
        if self.keep_outputs:
            self.outputs.append(outputs.detach().float().squeeze(1))
            self.labels.append(labels)

    def add_grad_norm(self, norm: Tensor, clip: float, finite: Tensor) -> None:
        """A finite step's gradient norm before clipping (on the device: no host sync). An fp16 step whose
        scaled gradients overflowed (the scaler skips it) has no norm to count either."""
        norm = norm.detach().double()
        counted = finite & torch.isfinite(norm)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        safe = torch.where(counted, norm, zero)
        self.clipping = clip > 0
        clipped = (safe > clip).double() if self.clipping else zero
        self.grad = torch.stack([self.grad[0] + safe, torch.maximum(self.grad[1], safe), self.grad[2] + clipped,
                                 self.grad[3] + counted.double()])

    def mean_loss(self) -> Tensor:
        return self.sums[0] / self.sums[2].clamp(min=1)

    def nonfinite_seen(self) -> bool:
        """Whether a non-finite step has been seen, as far as the host knows without waiting (on CUDA a
        step or two late; exact on CPU)."""
        if self.device.type != "cuda":
            return bool(self.nonfinite)
        return bool(self.seen.latest())

    def first_nonfinite_step(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite step, waiting for the device; None if there was none."""
        step, loss = self.first_nonfinite.tolist()
        return None if step < 0 else (int(step), loss)

    def state(self) -> dict:
        """This rank's totals on the CPU, for a checkpoint."""
        return {"images": self.images, "sums": self.sums.cpu(), "nonfinite": self.nonfinite.cpu(), "grad": self.grad.cpu(),
                "clipping": self.clipping, "data_wait": self.data_wait,
                "outputs": torch.cat(self.outputs).cpu() if self.outputs else None,
                "labels": torch.cat(self.labels).cpu() if self.labels else None}

    def restore(self, state: dict) -> None:
        self.images = int(state["images"])
        self.sums = state["sums"].to(self.device, torch.float64)
        self.nonfinite = state["nonfinite"].to(self.device)
        if "grad" in state:  # not in checkpoints written before 0.3
            self.grad = state["grad"].to(self.device, torch.float64)
        self.clipping = bool(state.get("clipping", self.clipping))  # an epoch resumed after its last step adds no norm
        self.data_wait = float(state.get("data_wait", 0.0))  # not in checkpoints written before 0.4
        if self.keep_outputs and state["outputs"] is not None:
            self.outputs, self.labels = [state["outputs"].to(self.device)], [state["labels"].to(self.device)]

    def reduce(self, seconds: float) -> dict:
        """Summed over every process (the epoch's one host sync); with keep_outputs, every rank's
        outputs and labels too. train_loss and train_acc leave out steps with a non-finite loss or
        gradient; nonfinite_steps counts them (the most any rank counted: every rank skips the same steps)."""
        loss_sum, correct, images = all_reduce_sum(self.sums.clone()).tolist()
        stats = {"train_loss": loss_sum / max(1.0, images), "train_acc": correct / max(1.0, images),
                 "train_images": int(images), "train_seconds": seconds, "images_per_s": images / seconds,
                 "nonfinite_steps": int(all_reduce_max(self.nonfinite.clone()))}
        # DDP gives every rank the same gradients, so the same norms: the max over ranks is any rank's; the
        # slowest rank's wait for data, in the same reduction, is what sizes CPUs per GPU.
        waits = torch.tensor([self.data_wait], dtype=torch.float64, device=self.device)
        norm_sum, norm_max, clipped, steps, waited = all_reduce_max(torch.cat([self.grad, waits])).tolist()
        stats["data_wait_share"] = min(1.0, waited / seconds) if seconds > 0 else 0.0
        if steps:
            stats.update(grad_norm_mean=norm_sum / steps, grad_norm_max=norm_max)
            if self.clipping:
                stats["clipped_share"] = clipped / steps
        if self.keep_outputs:  # a rank may have had no step (more processes after a resume near the epoch's end)
            empty = torch.zeros(0, device=self.device)
            stats["outputs"] = gather_rows(torch.cat(self.outputs) if self.outputs else empty).cpu().numpy()
            stats["labels"] = gather_rows(torch.cat(self.labels) if self.labels else empty.long()).cpu().numpy()
        return stats


@dataclass(frozen=True)
class Execution:
    """What the loops run on: the device, the numeric precision, and the device-side augmentation, which
    also writes the memory layout (channels_last) the model's first convolution wants."""

    device: torch.device
    precision: Precision = Precision()
    augment: DeviceAugment = field(default_factory=DeviceAugment)

    @property
    def channels_last(self) -> bool:
        return self.augment.channels_last


class NonFiniteError(UserError, RuntimeError):
    """Training met a non-finite loss or gradient; the message says where and what to try."""


def total_grad_norm(parameters) -> Tensor:
    """The gradients' global 2-norm, on the device (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(nn.utils, "get_total_norm"):  # torch >= 2.6
        return nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def train_mode(model: nn.Module) -> nn.Module:
    """THE switch to training mode (every one goes through here): model.train(), except the BatchNorm
    layers whose weight and bias do not train (a linear probe's backbone, probe.frozen_batchnorm), which
    stay in eval mode: they normalise with the statistics they hold and never move them, as their weights
    stay. A network that trains every parameter is simply in train mode."""
    model.train()
    for module in model.modules():
        if frozen_batchnorm(module):
            module.eval()
    return model


@dataclass
class Trainer:
    """What one training step needs. `model` is what training calls (DDP and/or compiled wrapper).

    Every step checks its loss and gradient norm for inf/NaN on the device, without waiting for it.
    nonfinite="stop": the step is taken anyway; the run is stopped at the next step boundary (see
    preemption.StepBoundary) and nothing is saved after it. "skip": the optimizer leaves such a step out
    (fused SGD on CUDA reads the flag on the device, as it does for fp16's GradScaler; on CPU the host
    reads it), the BatchNorm statistics its forward pass moved are put back, and the epoch's totals
    leave it out too. In fp16 the GradScaler already skips steps whose gradients overflow, and lowers its
    scale: only a non-finite loss counts there, and the statistics are put back when the loss or they
    are not finite (an overflowing forward pass).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    head: Head
    execution: Execution
    clip_grad_norm: float = 0.0
    nonfinite: str = "stop"
    ema: ExponentialAverage | None = None  # train.ema: the model's weight average, updated after every step
    _statistics: tuple[list[Tensor], list[Tensor]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")

    @property
    def device(self) -> torch.device:
        return self.execution.device

    def step(self, images: Tensor, labels: Tensor, generator: torch.Generator
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One optimisation step on a uint8 batch already on the device; returns (loss, outputs, finite,
        norm): finite is a device bool, false when the loss or the gradients held inf or NaN; norm the
        gradients' global norm before clipping (None in fp16 without clipping: the scaler checks alone)."""
        inputs = self.execution.augment.train(images, generator)
        skipping = self.nonfinite == "skip"
        buffers, before = self._save_statistics() if skipping else ([], [])
        with self.execution.precision.autocast(self.device):
            outputs = self.model(inputs)
            loss = self.head.loss(outputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        finite = torch.isfinite(loss.detach())
        norm = None
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        elif not self.scaler.is_enabled():
            norm = total_grad_norm(self.model.parameters())
        if not self.scaler.is_enabled():  # fp16: the scaler checks the gradients itself
            finite = finite & torch.isfinite(norm)
        if skipping and not self.scaler.is_enabled():
            # Every rank must take the same decision, or the replicas part for good (DDP never re-syncs them):
            # with several processes, decide on the all-reduced gradients alone (the same on every rank),
            # never on this rank's own loss (an infinite loss can come with finite gradients).
            self._step_unless(torch.isfinite(norm) if is_distributed() else finite)
        else:
            self.scaler.step(self.optimizer)  # fp16: the scaler skips steps whose gradients overflowed
        if buffers:  # BatchNorm's running statistics, as they were unless the step's forward pass was finite
            intact = finite & torch.stack([torch.isfinite(b).all() for b in buffers if b.is_floating_point()]).all()
            for buffer, saved in zip(buffers, before):
                buffer.copy_(torch.where(intact, buffer, saved))
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:  # a left-out step leaves the weights as they were: the average moves towards them
            self.ema.update(self.model)
        return loss, outputs, finite, norm

    def _save_statistics(self) -> tuple[list[Tensor], list[Tensor]]:
        """The model's buffers and their copy before this step: one foreach copy into copies made at the
        first step (a clone of every buffer each step was a small allocation and kernel per BatchNorm
        tensor). The buffers are the model's own tensors for the whole run: loading a state copies into them."""
        if self._statistics is None:
            buffers = list(self.model.buffers())
            self._statistics = (buffers, [torch.empty_like(b) for b in buffers])
        buffers, copies = self._statistics
        if buffers:
            torch._foreach_copy_(copies, buffers)
        return buffers, copies

    def _step_unless(self, finite: Tensor) -> None:
        """optimizer.step() only where `finite`: on the device for optimizers that take the flag that
        GradScaler gives them (fused SGD), else read on the host (free on CPU)."""
        if getattr(self.optimizer, "_step_supports_amp_scaling", False) and self.device.type == "cuda":
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif bool(finite):
            self.optimizer.step()

    def run_steps(self, loader: Iterable, generator: torch.Generator, totals: EpochTotals, progress=None,
                  log_every: int = 20, first_step: int = 0, boundary: Callable[[int], None] | None = None) -> None:
        """The hot loop over `loader`. `progress` (a tqdm bar) shows the running loss every log_every
        batches. After each step, `boundary(steps done in the epoch)` may checkpoint or stop the run
        (by raising); `first_step` is the steps done before (a resumed epoch)."""
        train_mode(self.model)
        shown = LaggedValue(self.device) if progress is not None and not progress.disable else None
        for step, (images, labels) in enumerate(_timed(loader, totals), start=first_step):
            images, labels = _to_device(images, labels, self.device)
            loss, outputs, finite, norm = self.step(images, labels, generator)
            totals.add(step, loss, outputs, labels, (self.head.predict_outputs(outputs.detach()) == labels).sum(), finite)
            if norm is not None:
                totals.add_grad_norm(norm, self.clip_grad_norm, finite)
            if shown is not None:
                progress.update(labels.shape[0])
                if step % log_every == 0:
                    shown.push(totals.mean_loss())
                    if shown.latest() is not None:
                        progress.set_postfix(loss=f"{shown.latest():.3f}", refresh=False)
            if boundary is not None:
                boundary(step + 1)

    def epoch(self, loader: Iterable, generator: torch.Generator, progress=None, log_every: int = 20,
              keep_outputs: bool = False, totals: EpochTotals | None = None, first_step: int = 0,
              boundary: Callable[[int], None] | None = None, seconds_before: float = 0.0) -> dict:
        """One pass over the loader (the rest of one, from `first_step` with its `totals`, when resumed);
        returns loss, accuracy and images summed over every process, the time (the GPU's queued work
        included, plus `seconds_before`) and, with keep_outputs, every rank's outputs and labels."""
        totals = totals or EpochTotals(self.device, keep_outputs)
        watch = Stopwatch(self.device)
        self.run_steps(loader, generator, totals, progress, log_every, first_step, boundary)
        return totals.reduce(seconds_before + watch.seconds())


def _timed(loader: Iterable, totals: EpochTotals) -> Iterator:
    """The loader's batches, the host's wait for each added to totals.data_wait."""
    iterator = iter(loader)
    while True:
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        totals.data_wait += time.perf_counter() - started
        yield batch


@dataclass(frozen=True)
class EvalResult:
    """A whole split's evaluation, identical on every rank: the confusion matrix (counts), the mean
    loss (cross-entropy, or squared error for regression), and per image (in the split's order): the
    head's output (class probabilities, or the regressed grade; TTA views averaged), the referable-DR
    score (grade >= 2) and the true grade."""

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

    def per_image(self, head) -> tuple[np.ndarray, np.ndarray]:
        """Each image's predicted grade and what the head reports (grade probabilities, or the score)."""
        values = torch.from_numpy(self.outputs)
        return head.predict(values).numpy(), head.values(values).numpy()

    def scores(self) -> dict:
        """Every metric of metrics.summarize, plus the referable-DR ROC AUC."""
        auc = metrics.roc_auc(self.targets >= metrics.REFERABLE_GRADE, self.referable_scores)
        return {**metrics.summarize(self.confusion_matrix), "referable_auc": auc}


TTA_MODES = ("none", "flips")


def _views(inputs: Tensor, tta: str) -> list[Tensor]:
    """The image alone, or with its h-, v- and hv-flips (tta='flips')."""
    return [inputs] if tta == "none" else [inputs, inputs.flip(-1), inputs.flip(-2), inputs.flip(-1, -2)]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, head: Head, execution: Execution, tta: str = "none",
             fixed_batch: bool = False) -> EvalResult:
    """Every image of the split exactly once (`loader` samples with ShardSampler), gathered across
    processes on the device, moved to the host once, and scored. With TTA the head averages its views
    (probabilities, or regression outputs) before predicting.

    Pass the bare model (not the DDP wrapper): shards may differ in length by one, and DDP's forward
    could wait on a collective that the other ranks never reach. fixed_batch (a compiled model): a short
    last batch is padded with black images to the loader's batch size and their outputs dropped, so one
    compiled graph serves every batch instead of a recompile for the ragged one (in eval mode each
    image's output does not depend on the others in its batch).
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    model.eval()
    device = execution.device
    outputs, targets = [], []
    full = getattr(loader, "batch_size", None) if fixed_batch else None
    for images, labels in loader:
        images, labels = _to_device(images, labels, device)
        count = images.shape[0]
        if full and count < full:
            images = torch.cat([images, images.new_zeros((full - count, *images.shape[1:]))])
        with execution.precision.autocast(device):
            aggregated = head.aggregate([model(v) for v in _views(execution.augment.eval(images), tta)])
        outputs.append(aggregated[:count].float())
        targets.append(labels)
    shape = (0, head.outputs) if head.outputs > 1 else (0,)
    local_outputs = torch.cat(outputs) if outputs else torch.zeros(shape, device=device)
    local_targets = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.int64, device=device)
    total = len(loader.dataset)
    return EvalResult.of(gather_sharded(local_outputs, total).cpu().numpy(),
                         gather_sharded(local_targets, total).cpu().numpy().astype(np.int64), head)
