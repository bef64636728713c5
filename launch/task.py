"""The callables submitit runs in every task of a job: they turn submitit's JobEnvironment into the
variables torchrun would set and call the same entry as every other launch: `dr_resnet.train`'s main
(TrainTask, a run of an arm) or `dr_resnet.pretrain`'s (PretrainTask, the backbone a sweep's ssl arms
fine-tune from), with the same preemption and requeue behaviour.

A task carries only its command's arguments. On preemption or a time limit, SLURM sends submitit's signal
(SIGUSR2) to every task: training writes a checkpoint at its next step boundary and stops, then this
task hands the signal to submitit's own handler, which calls `checkpoint()` (a fresh task with the same
arguments) and requeues the job. Training resumes from the run directory's last checkpoint (and the
same W&B run, whose id that checkpoint holds), never from state kept in this object. A local job stopped
by SIGTERM (launch.interrupt) is not requeued: no scheduler preempts it.
"""

from __future__ import annotations

import os
import signal
import time

import submitit

PREEMPTION_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").removeprefix("SIG"))
AFTER_STOP_WAIT_S = 300  # how long a stopped task waits to be requeued or ended before it fails


# entry -> (module whose main(argv) it calls, the command as its messages name it)
ENTRIES = {"train": ("dr_resnet.training.train", "dr_resnet.train"),
           "pretrain": ("dr_resnet.pretraining.run", "dr_resnet.pretrain")}


class EntryTask(submitit.helpers.Checkpointable):
    """One command's main(argv) in a submitit task (ENTRIES[entry]); the subclasses name the entry."""

    entry = ""

    def __init__(self, argv: list[str], threads: int = 0) -> None:
        self.argv = list(argv)
        self.threads = threads  # torch threads per task; 0: SLURM_CPUS_PER_TASK, else torch's default

    def __call__(self) -> int:
        import importlib

        import torch

        module, command = ENTRIES[self.entry]
        main = importlib.import_module(module).main
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # Some SLURM set-ups (task/none) and submitit's local executor bind no CPUs: use what was asked for.
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        code = main(self.argv)
        if code == 0:
            return code
        stopped_by = code - 128 if code > 128 else None  # the command's exit code after a stop signal
        if stopped_by not in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            raise RuntimeError(f"{command} exited with code {code}: the reason is logged above")
        if stopped_by == signal.SIGTERM and submitit.JobEnvironment().cluster == "local":
            # No scheduler preempts a local job: its SIGTERM comes from a person, `timeout` or the launcher
            # stopping its jobs (launch.interrupt), and a requeued job would start again at once. Its time
            # limit's signal is submitit's own, which still requeues it.
            raise RuntimeError(f"{command} stopped at SIGTERM after writing a checkpoint; a local job is not "
                               "requeued at SIGTERM: the same launch.sweep command resumes it")
        # The command wrote a checkpoint and stopped, at submitit's preemption signal or at the SIGTERM that
        # SLURM sends first when it preempts a job: hand over to submitit's preemption handler (restored
        # when the command stopped), which calls checkpoint() and requeues the job on rank 0 (a job being
        # cancelled cannot be requeued, and stays cancelled). The other ranks wait for SLURM to end them.
        handler = signal.getsignal(PREEMPTION_SIGNAL)
        if callable(handler):
            handler(PREEMPTION_SIGNAL, None)
        deadline = time.monotonic() + AFTER_STOP_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(1)  # a signal's handler runs here (submitit's exits after requeueing)
        raise RuntimeError(f"{command} stopped at {signal.Signals(stopped_by).name} after writing a checkpoint, "
                           f"and the job was neither requeued nor ended: a resubmitted job resumes from it")

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(type(self)(self.argv, self.threads))


class TrainTask(EntryTask):
    """A run of an arm: dr_resnet.train's arguments."""

    entry = "train"


class PretrainTask(EntryTask):
    """A sweep's pretraining of a backbone (launch/backbones.py): dr_resnet.pretrain's arguments."""

    entry = "pretrain"
