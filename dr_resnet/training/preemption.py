"""What may stop or checkpoint a run between two training steps, decided by every process together.

Three things can ask for it: a signal (SIGTERM from `scontrol requeue`, a preemption, torchrun passing
on its own SIGTERM, or `kill`; SIGUSR1; submitit's preemption signal SIGUSR2), the checkpoint clock
(train.checkpoint_every_minutes, on rank 0's clock), and a non-finite loss or gradient that a rank has
seen. A rank's own view differs from another's (a signal lands on one process first, only rank 0 keeps
the clock), so at each step boundary every rank contributes its flags to one small all-reduce on the CPU
(gloo: it never waits on the GPU's queue) and every rank acts on the same decision at the same step.

With 2+ processes that all-reduce is asynchronous: the flags sent after step k travel while step k + 1
runs, and every rank acts on them after step k + 1. A step boundary then never waits on the network
(a blocking all-reduce costs a few round trips between nodes, every step), at the price of one step:
a signal or the clock is acted on one step later, and a non-finite step is caught one step later
(nothing is saved after it either way: a checkpoint first checks every rank's exact count). The flags
are sent after the boundary has acted, so the clock they carry has seen its checkpoint, and a
checkpoint can still land after each step. One process decides at once (there is nothing to wait for).
`settle()` ends the lag at an epoch's end.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import torch

from dr_resnet.processes import STOP_SIGNALS
from dr_resnet.training import distributed

log = logging.getLogger(__name__)



class RunStopped(Exception):
    """The run stopped at a signal after writing a checkpoint; the next start resumes from it."""

    def __init__(self, signum: int, where: str) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; the next start of this run resumes there")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a process killed by the signal would report


class StopSignals:
    """While active (a context manager), SIGTERM, SIGUSR1 and SIGUSR2 are only recorded: training
    checkpoints at the next step boundary, then stops. Leaving restores the handlers found on entry (a
    launcher's, e.g. submitit's requeue handler, which TrainTask then calls). Outside the main thread
    (where Python allows no handlers) nothing is installed and `received` stays None."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


@dataclass(frozen=True)
class Decision:
    """What every rank does at this step boundary."""

    checkpoint: bool  # write a resumable checkpoint now (the clock ran out, or before stopping)
    stop_signal: int | None  # then stop for this signal
    nonfinite: bool  # some rank saw a non-finite loss or gradient: stop without writing anything


class StepBoundary:
    """The collective decision at each step boundary (see the module's docstring). `every_minutes` <= 0:
    no timed checkpoints, only at epoch ends and on signals."""

    def __init__(self, every_minutes: float, signals: StopSignals, is_main: bool) -> None:
        self.every_s = every_minutes * 60
        self.signals = signals
        self.is_main = is_main
        self.last_checkpoint = time.monotonic()
        self.in_flight: tuple[torch.Tensor, object] | None = None  # flags sent, and their all-reduce

    def checkpointed(self) -> None:
        """A checkpoint was just written: the clock starts again."""
        self.last_checkpoint = time.monotonic()

    def _flags(self, nonfinite_seen: bool) -> torch.Tensor:
        due = self.is_main and self.every_s > 0 and time.monotonic() - self.last_checkpoint >= self.every_s
        return torch.tensor([self.signals.received or 0, int(due), int(nonfinite_seen)])

    def decide(self, nonfinite_seen: bool = False) -> Decision:
        """This boundary's decision. One process: on its own flags, now. 2+ processes: the one agreed on
        the flags sent at the boundary before (nothing at the first); once the caller has acted on it
        (written a checkpoint: the clock starts again), it sends this boundary's flags with `send`."""
        if not distributed.is_distributed():
            return _decision(self._flags(nonfinite_seen))
        return self._arrived()

    def send(self, nonfinite_seen: bool = False) -> None:
        """Start the all-reduce of this boundary's flags (2+ processes; nothing with one)."""
        if distributed.is_distributed():
            flags = self._flags(nonfinite_seen)
            self.in_flight = (flags, distributed.all_reduce_max_async(flags))

    def _arrived(self) -> Decision:
        if self.in_flight is None:
            return Decision(False, None, False)
        flags, work = self.in_flight
        self.in_flight = None
        work.wait()
        return _decision(flags)

    def settle(self) -> Decision:
        """A decision on every rank's flags now, waiting for them (at an epoch's end, after its
        checkpoint): any flags still in flight are superseded (a signal stays recorded)."""
        self._arrived()
        flags = distributed.all_reduce_max(self._flags(False))
        return _decision(flags)


def _decision(flags: torch.Tensor) -> Decision:
    signum, due, nonfinite = (int(v) for v in flags)
    if nonfinite:
        return Decision(False, None, True)
    return Decision(bool(due or signum), signum or None, False)
