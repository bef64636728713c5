"""The requeue policy, in one place: how a job outlives its time limit and preemption on SLURM.

- SLURM signals the job SIGNAL_LEAD_S seconds before its time limit; the job then asks to be requeued
  (submitit's handler for launch.sweep's jobs, the batch script's trap for slurm/train.sbatch) and the
  next attempt resumes from the run directory's last checkpoint.
- Every job may be requeued, and its log is appended to, not overwritten, by the next attempt.
- A job in one of the ALIVE states will still run (again): a failure read while it is in one was
  written by an attempt that SLURM has since requeued.

launch.sweep passes these to submitit; slurm/train.sbatch spells them as #SBATCH lines and shell variables
(shell cannot import them), and a test keeps those lines equal to SBATCH_LINES, SHUTDOWN_LINE and
SLURM_CALL_LINE.
"""

from __future__ import annotations

SIGNAL_LEAD_S = 120  # seconds before the time limit
REQUEUE = {"requeue": True, "open-mode": "append"}  # sbatch options every job gets
BATCH_SIGNAL = "USR1"  # slurm/train.sbatch: to the batch shell (B:), whose trap calls scontrol requeue
SBATCH_LINES = (f"#SBATCH --signal=B:{BATCH_SIGNAL}@{SIGNAL_LEAD_S}", "#SBATCH --requeue", "#SBATCH --open-mode=append")
# torchrun passes the stop signal on to its workers, then kills them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# (default 30 s): too short to finish a step and write and fsync a ResNet50 checkpoint on a busy shared file
# system. The batch script gives them the signal's lead time less a margin for the requeue itself.
SHUTDOWN_S = SIGNAL_LEAD_S - 20
SHUTDOWN_LINE = f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{SHUTDOWN_S}}}"
# That margin holds the trap's SLURM commands: squeue (is the training step running?) and scancel (SIGTERM to
# the steps' tasks) before torchrun's SHUTDOWN_S starts, scontrol requeue after the tasks ended, which must come
# before the time limit. The trap cuts each off after SLURM_CALL_S (`timeout`): a controller slow to answer
# must not spend the checkpoint's time. 2 x 5 + 100 + 5 = 115 s of the 120 s lead, SPARE_S = 5 s to spare.
SLURM_CALL_S = 5
TRAP_CALLS = 3  # squeue, scancel, scontrol requeue
SPARE_S = SIGNAL_LEAD_S - SHUTDOWN_S - TRAP_CALLS * SLURM_CALL_S
SLURM_CALL_LINE = f"SLURM_CALL_S={SLURM_CALL_S}"

# SLURM states of a job that will still run (again). Preemption's `scontrol requeue` can kill the
# handler that called it, which then reports a failure the requeued attempt later overwrites.
ALIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
         "SUSPENDED", "RESIZING")
