"""Process-group set-up from the environment that torchrun, srun or a submitit task leaves, and the few
collective helpers training needs. One process with no such environment is a world of one.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under plain ``srun`` we read
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, with the master on the job's first node. NCCL with one
GPU per process on CUDA, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                               text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"MASTER_ADDR is not set and `scontrol show hostnames {nodelist}` failed ({exc}): "
                           f"export MASTER_ADDR to the first node's address") from exc
    return hosts[0]


def env_ranks(env: os._Environ | dict = os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else SLURM's, else a world of one."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init(timeout_minutes: float = 30) -> DistInfo:
    """Join the process group described by the environment; pick this process's device."""
    rank, world_size, local_rank = env_ranks()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistInfo(device=device)
    if "MASTER_ADDR" not in os.environ:  # plain srun: no launcher set these
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_minutes),
                            device_id=device if cuda else None)
    return DistInfo(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (in place, and returned); a no-op in a world of one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a world of one returns [obj])."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def run_entry(work: Callable[[DistInfo], None], user_errors: tuple[type[Exception], ...]) -> int:
    """The frame of every entry point: join the group, log per rank, run `work`, always leave the group.
    A user error (bad data, config, missing file) is one logged line and exit code 2."""
    info = init()
    setup_logging(info)
    try:
        work(info)
        return 0
    except user_errors as exc:
        log.error("%s", exc)
        return 2
    finally:
        teardown()


def setup_logging(info: DistInfo) -> None:
    """INFO on rank 0, WARNING elsewhere, each line tagged with its rank in multi-process runs."""
    prefix = f"[rank {info.rank}] " if info.distributed else ""
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, force=True,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
