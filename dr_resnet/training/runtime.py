"""What the loops need to run well on this hardware: the device, the numeric precision, cuDNN's
settings, torch.compile, and a timer that waits for the GPU. One place decides each."""

from __future__ import annotations

import logging
import os
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from dr_resnet import config
from dr_resnet.config import ConfigError
from dr_resnet.errors import UserError

log = logging.getLogger(__name__)

DEVICES = typing.get_args(config.Device)  # --device, train.device
PRECISIONS = typing.get_args(config.Amp)  # --amp, train.amp
NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere and later; V100 (7.0) and T4 (7.5) emulate bf16, slowly


class DeviceError(UserError, RuntimeError):
    """The processes and the GPUs do not fit together (or CUDA was asked for and is absent)."""


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

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @staticmethod
    def named(name: str) -> "Precision":
        return Precision({"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name])


# Most conservative first: what every rank can run when the ranks' own choices differ (amp=auto on a job
# mixing GPU kinds): full fp32 over any autocast, then fp16 (with its loss scale), which every GPU runs.
CONSERVATIVE = ("fp32", "fp16", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware. torch.cuda.is_bf16_supported() also says yes for
    emulation on older GPUs, where bf16 autocast is slower than fp32."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def resolve_precision(amp: str, device: torch.device, key: str = "train.amp") -> Precision:
    """auto: bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, fp32 on CPU (whose bf16
    is slow on CPUs without bf16 units). bf16 on a GPU without native bf16 is refused, naming `key`."""
    if amp not in PRECISIONS:
        raise ConfigError(f"{key}={amp!r} is not one of {', '.join(PRECISIONS)}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision(None)
    if amp == "auto":
        return Precision(torch.bfloat16 if native_bf16(device) else torch.float16)
    if amp == "bf16" and device.type == "cuda" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"{key}=bf16: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has "
                          f"no native bf16 (needs 8.0+): use {key}=fp16 or {key}=auto")
    return Precision(torch.bfloat16 if amp == "bf16" else torch.float16)


def select_device(preference: str, local_rank: int, local_world_size: int | None) -> torch.device:
    """This process's device. With CUDA, one GPU per process: local rank r takes GPU r. A process
    that sees a single GPU takes it (per-task GPU binding shows each task one GPU; that no two
    processes share one is checked once the group is up). More processes on a node than GPUs is an
    error that names the counts."""
    if preference not in DEVICES:
        raise DeviceError(f"train.device={preference!r} is not one of {', '.join(DEVICES)}")
    available = torch.cuda.is_available()
    if preference == "cpu" or (preference == "auto" and not available):
        return torch.device("cpu")
    if not available:
        raise DeviceError("train.device=cuda but CUDA is not available here (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda}): use train.device=auto or cpu")
    count = torch.cuda.device_count()
    if count > 1 and max(local_rank + 1, local_world_size or 0) > count:
        processes = local_world_size or local_rank + 1
        raise DeviceError(too_many_processes(processes, count))
    return torch.device("cuda", local_rank if local_rank < count else 0)


def too_many_processes(processes: int, gpus: int, host: str = "this node") -> str:
    return (f"{processes} processes on {host} but {gpus} GPU(s) visible: one process per GPU. Start at most "
            f"{gpus} (torchrun --nproc_per_node {gpus}, or srun --ntasks-per-node {gpus}), or run them on CPU "
            f"with train.device=cpu")


def configure_backends(device: torch.device, cudnn_benchmark: bool, deterministic: bool, tf32: bool = True) -> None:
    """cuDNN autotuning for the fixed-size inputs of training (off when determinism is asked for),
    deterministic kernels on request, and TF32 convolutions (PyTorch's default; tf32=False gives full
    fp32, e.g. to compare with a CPU)."""
    if deterministic:
        # cuBLAS needs a fixed workspace for repeatable results; set before its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a ResNet's pooling backward has no deterministic CUDA kernel; PyTorch names such
        # ops in a warning instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    if cudnn_benchmark and deterministic:
        log.info("train.deterministic is on: cuDNN autotuning (train.cudnn_benchmark) is off")


def compile_model(model: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """torch.compile'd `model` when enabled. The compiled wrapper shares the parameters; checkpoints are
    taken from the bare module, so their keys never carry the `_orig_mod.` prefix."""
    return torch.compile(model, backend=backend) if enabled else model


def usable_cpus() -> int:
    """The CPUs this process may run on (SLURM's --cpus-per-task, taskset), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_shortfall(workers: int, processes: int, cpus: int) -> str:
    """Why `processes` training processes on a node with `workers` data workers each would queue for
    `cpus` CPUs ('' when they fit): each process and each worker wants a core."""
    wanted = processes * (workers + 1)
    if wanted <= cpus:
        return ""
    fits = max(0, cpus // processes - 1)
    return (f"data.workers={workers} x {processes} process(es) on this node, plus the processes themselves, want "
            f"{wanted} CPUs; this process may use {cpus} (sbatch --cpus-per-task, taskset): the workers will "
            f"queue for the cores. Give the job {wanted} CPUs a node or set data.workers={fits}")


def environment() -> str:
    """Host, Python, torch and its CUDA / cuDNN builds, and the GPUs visible: for the run log."""
    import platform
    import socket

    cuda = (f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"{torch.cuda.device_count()} GPU(s) {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
            else f"no CUDA (build {torch.version.cuda})")
    return f"host {socket.gethostname()}, Python {platform.python_version()}, torch {torch.__version__}, {cuda}"


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (for honest timings); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds of device work: the GPU is synchronised at start and stop, so queued kernels count."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        synchronize(device)
        self.start = time.perf_counter()

    def seconds(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self.start
