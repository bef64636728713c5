"""Process-group set-up from the environment that torchrun, srun or a submitit task leaves, and the few
collective helpers training needs. One process with no such environment is a world of one.

torchrun (and submitit's export) set RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR /
MASTER_PORT. A plain ``srun`` job step sets SLURM_STEP_ID, and we read SLURM_PROCID /
SLURM_STEP_NUM_TASKS / SLURM_LOCALID, with the master on the step's first node. A process started
directly in an sbatch script (the batch step, no SLURM_STEP_ID) runs alone, whatever --ntasks says.
On CUDA the group has NCCL for GPU tensors and gloo for CPU objects; on CPU, gloo.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from dr_resnet.errors import USER_ERRORS, UserError
from dr_resnet.files import write_text
from dr_resnet.training.runtime import DeviceError, select_device, too_many_processes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process's rank comes from: 'torchrun' (also submitit), 'srun' or 'single'."""

    launcher: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int | None = 1
    note: str = ""  # why a SLURM allocation with several tasks still gives a single process

    def describe(self) -> str:
        if self.launcher == "single":
            return "one process" + (f" ({self.note})" if self.note else "")
        return (f"{self.launcher}: rank {self.rank} of {self.world_size}, local rank {self.local_rank}"
                + (f" of {self.local_world_size}" if self.local_world_size else ""))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is up (launched by torchrun or srun, even as a world of one): DDP and
        SyncBatchNorm run the same code at 1 GPU as at 64."""
        return self.launcher != "single"


def tasks_per_node(compressed: str) -> list[int]:
    """SLURM's tasks-per-node list, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in compressed.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def launch_env(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    """The launcher's variables: torchrun's first, then an srun job step's, else a world of one."""
    if "RANK" in env and "WORLD_SIZE" in env:
        local_world = env.get("LOCAL_WORLD_SIZE")
        return LaunchEnv("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         int(local_world) if local_world else None)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
        if world > 1:
            return LaunchEnv("srun", int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                             max(per_node) if per_node else None)
        return LaunchEnv(note="an srun step of one task")
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return LaunchEnv(note=f"started in SLURM job {env.get('SLURM_JOB_ID', '?')}'s batch script, not by srun: "
                              f"its {env['SLURM_NTASKS']} tasks are not used; use srun or torchrun for several processes")
    return LaunchEnv()


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                               text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"MASTER_ADDR is not set and `scontrol show hostnames {nodelist}` failed ({exc}): "
                           f"export MASTER_ADDR to the first node's address") from exc
    return hosts[0]


def master_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job, the same on every node (slurm/train.sbatch asks here too)."""
    return 20000 + job_id % 20000


def _gpu_identity(device: torch.device) -> str:
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return str(uuid) if uuid is not None else f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}#{device.index}"


def shared_gpus(placements: list[tuple[str, str]]) -> str:
    """'' when every (host, GPU) pair is distinct, else what `too_many_processes` says for the worst host."""
    per_gpu = Counter(placements)
    crowded = [(host, gpu) for (host, gpu), n in per_gpu.items() if n > 1]
    if not crowded:
        return ""
    host = crowded[0][0]
    processes = sum(n for (h, _), n in per_gpu.items() if h == host)
    gpus = sum(1 for (h, _) in per_gpu if h == host)
    return too_many_processes(processes, gpus, host)


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds the IPv4 `address`, or None."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                request = struct.pack("256s", name.encode()[:15])
                held = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), 0x8915, request)[20:24])  # SIOCGIFADDR
            except OSError:  # no IPv4 address on it
                continue
            if held == address:
                return name
    return None


def _source_address(host: str) -> str | None:
    """This machine's IPv4 address that packets to `host` leave from (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return probe.getsockname()[0]
    except OSError:
        return None


def interface_towards(host: str) -> str | None:
    """The interface a group spanning several machines should use to reach `host` (the master): the one
    its route leaves by, or, where `host` is this machine under a loopback address (a hostname that this
    machine's /etc/hosts maps to 127.0.1.1), the one of the default route; None if neither is known."""
    source = _source_address(host)
    if source is None or source.startswith("127."):
        source = _source_address("192.0.2.1")  # a documentation address (RFC 5737): only the route is looked up
    if source is None or source.startswith("127."):
        return None
    return interface_of(source)


def choose_gloo_interface(env: LaunchEnv) -> None:
    """gloo takes the address this machine's hostname resolves to, unless GLOO_SOCKET_IFNAME names an
    interface; where the hostname maps to a loopback address (common in /etc/hosts) ranks on other
    machines cannot reach it. For a group spanning machines, with GLOO_SOCKET_IFNAME unset, use the
    interface that reaches the master."""
    spans_machines = env.local_world_size is None or env.local_world_size < env.world_size
    if not spans_machines or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    name = interface_towards(os.environ["MASTER_ADDR"])
    if name is None:
        log.warning("no network interface towards MASTER_ADDR=%s found; gloo uses the address of this machine's "
                    "hostname (set GLOO_SOCKET_IFNAME to choose)", os.environ["MASTER_ADDR"])
        return
    os.environ["GLOO_SOCKET_IFNAME"] = name
    if env.rank == 0:
        log.info("gloo uses interface %s (towards MASTER_ADDR=%s; set GLOO_SOCKET_IFNAME to choose another)",
                 name, os.environ["MASTER_ADDR"])


def init(device: str = "auto", timeout_minutes: float = 30, env: LaunchEnv | None = None) -> DistInfo:
    """Join the process group described by the environment (`env`, else read now); pick this
    process's device."""
    env = env or launch_env()
    chosen = select_device(device, env.local_rank, env.local_world_size)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if env.launcher == "single":
        return DistInfo(device=chosen)
    if "MASTER_ADDR" not in os.environ:  # plain srun: no launcher set these
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
        os.environ.setdefault("MASTER_PORT", str(master_port(int(os.environ.get("SLURM_JOB_ID", 0)))))
    # Object collectives (and the GPU check below) go over gloo on the CPU; GPU tensors over NCCL,
    # whose communicator starts lazily, after that check.
    backend = "cpu:gloo,cuda:nccl" if chosen.type == "cuda" else "gloo"
    choose_gloo_interface(env)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(minutes=timeout_minutes))
    info = DistInfo(env.rank, env.world_size, env.local_rank, chosen, env.launcher)
    if chosen.type == "cuda":
        placements = all_gather_objects((socket.gethostname(), _gpu_identity(chosen)))
        problem = shared_gpus(placements)
        if problem:
            raise DeviceError(problem)
    return info


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_distributed() -> bool:
    """Whether this process is one of 2+ in a process group."""
    return _group_size() > 1


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes in its group ((0, 1) without one)."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (in place, and returned); a no-op in a world of one."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over all processes (in place, and returned); a no-op in a world of one. A CPU
    tensor goes over gloo, also in a group whose GPU tensors use NCCL."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_max_async(tensor: torch.Tensor):
    """Start an element-wise maximum over all processes in place (2+ processes); returns the work to
    `wait()` on before reading `tensor`. Every rank must start the same collectives in the same order."""
    return dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True)


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a world of one returns [obj])."""
    if is_distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def _all_gather_rows(local: torch.Tensor, rows: int) -> list[torch.Tensor]:
    """Every rank's `local`, zero-padded to `rows` rows, in rank order (one all_gather, on its device)."""
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: local.shape[0]] = local
    shards = [torch.empty_like(padded) for _ in range(_group_size())]
    dist.all_gather(shards, padded)
    return shards


def gather_sharded(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rebuild a split's per-image tensor, in dataset order, from every rank's shard (rank r holds
    images r, r + w, r + 2w, ...; see loop.ShardSampler), on the tensor's device: one collective,
    no trip through the host."""
    world = _group_size()
    if world == 1:
        return local
    longest = -(-total // world)
    shards = _all_gather_rows(local, longest)
    # Row j of rank r is image j * w + r: stacking (longest, w) and reading row by row gives dataset order.
    return torch.stack(shards, dim=1).reshape(longest * world, *local.shape[1:])[:total]


ROW_DIMS = 3  # gather_rows: the most dimensions a row may have


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (on the tensor's device). Ranks may hold different
    numbers of rows (an epoch resumed by another number of processes: rank 0 carries the rows so far),
    none at all included (a rank left without steps near the epoch's end, whose empty tensor may not know
    the rows' shape): each rank's row count and row shape are gathered first, every shard padded to the
    longest and trimmed after."""
    if _group_size() == 1:
        return local
    if local.dim() - 1 > ROW_DIMS:
        raise ValueError(f"rows of {local.dim() - 1} dimensions: gather_rows takes up to {ROW_DIMS}")
    row = list(local.shape[1:]) + [-1] * (ROW_DIMS - (local.dim() - 1))
    headers = [h.tolist() for h in _all_gather_rows(torch.tensor([[local.shape[0], *row]], device=local.device), 1)]
    lengths = [h[0][0] for h in headers]
    if not any(lengths):
        return local
    shape = [d for d in next(h[0][1:] for h in headers if h[0][0]) if d >= 0]
    if local.shape[0] == 0:
        local = local.new_zeros((0, *shape))
    shards = _all_gather_rows(local, max(lengths))
    return torch.cat([shard[:n] for shard, n in zip(shards, lengths)])


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank; a no-op in a world of one. Without
    SyncBatchNorm each rank's last training step leaves its own statistics, while the checkpoint holds
    rank 0's: evaluating with rank 0's makes every rank's shard scored by the model that is saved."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class RunFilesError(UserError, OSError):
    """Rank 0 could not write a run file (disk full, permissions): every rank stops with it."""


def rank0_writes(what: str, work: Callable[[], object], is_main: bool) -> object:
    """Rank 0 runs `work` (the run's files: it alone writes them) and every rank learns whether it worked:
    a write that fails stops every process at once with one error, instead of leaving the others waiting
    in their next collective until its timeout (what a launcher without a watchdog would do: submitit's
    local executor, a plain srun without --kill-on-bad-exit). A user error `work` raises (a checkpoint
    write's, naming its file) stops them as it is. Returns `work`'s result on rank 0."""
    result, error = None, None
    if is_main:
        try:
            result = work()
        except UserError as exc:
            error = exc
        except OSError as exc:
            error = RunFilesError(f"cannot write {what}: {exc}. Free disk space or fix the run folder's permissions, "
                                  f"then start the run again: it resumes from its last checkpoint")
    if all_reduce_max(torch.tensor([int(error is not None)])).item():
        raise error or RunFilesError(f"rank 0 could not write {what}: its train.log says why")
    return result


class NodeWorkError(UserError):
    """A node leader's work (its copy of the dataset) failed or did not end in time: every rank stops with its line."""


WAIT_PROGRESS_S = 60.0  # how often a process waiting for the node leaders' work says so


def node_key(env: Mapping[str, str] = os.environ) -> str:
    """This process's node within the launch: its hostname and, where the launcher numbers nodes (torchrun's
    GROUP_RANK, srun's SLURM_NODEID), that number (emulated nodes share a hostname)."""
    number = env.get("GROUP_RANK", env.get("SLURM_NODEID", ""))
    return socket.gethostname() + (f"#{number}" if number else "")


def once_a_node(what: str, work: Callable[[], str], local_rank: int, deadline_minutes: float,
                deadline_key: str) -> str:
    """Each node's leader (local rank 0) runs `work` and publishes its result, or its one-line error, on the
    process group's store; every process waits there, not in a collective (whose timeout a long copy would
    pass), until every node's leader has published, at most `deadline_minutes` (named by `deadline_key`), and
    returns its own node's result. A failure anywhere stops every process with the leader's line."""
    if not is_distributed():
        return work()
    from torch.distributed.distributed_c10d import _get_default_store

    store, rank, mine = _get_default_store(), dist.get_rank(), node_key()
    # Quick, before anyone works: who leads which node, and a name for this call that no other launch,
    # restart or call shares (the store may outlive a restart: pytorch#135712).
    nodes = all_gather_objects((mine, local_rank, uuid.uuid4().hex))
    leaders: dict[str, int] = {}
    for r, (node, local, _) in enumerate(nodes):
        if local == 0:
            leaders.setdefault(node, r)
    if mine not in leaders:
        raise NodeWorkError(f"no process of local rank 0 on {mine} to do {what}: launch the processes with torchrun or srun")
    prefix = f"dr_resnet/once_a_node/{nodes[0][2]}/"
    if leaders[mine] == rank:
        try:
            result = work()
        except BaseException as exc:
            line = " ".join(str(exc).split()) if isinstance(exc, USER_ERRORS) else \
                f"{type(exc).__name__}: {exc} ({mine}'s log has the traceback)"
            store.set(prefix + str(rank), json.dumps({"error": line}))
            _until_read(store, prefix + "stopped", len(nodes) - 1)
            raise
        store.set(prefix + str(rank), json.dumps({"ok": result}))
    try:
        return _wait_for_leaders(store, prefix, leaders, mine, what, deadline_minutes, deadline_key)
    except NodeWorkError:
        store.add(prefix + "stopped", 1)  # a failed leader waits for this before it leaves (it may host the store)
        raise
    except RuntimeError as exc:  # the store itself is gone: its host (rank 0, or torchrun's agent) stopped
        raise NodeWorkError(f"{what}: the process group's store stopped answering ({exc}); rank 0's log says why") \
            from None


def _wait_for_leaders(store, prefix: str, leaders: dict[str, int], mine: str, what: str, deadline_minutes: float,
                      deadline_key: str) -> str:
    waiting = {prefix + str(r): node for node, r in leaders.items()}
    results: dict[str, str] = {}
    started = said_at = time.monotonic()
    while waiting:
        for key in [k for k in waiting if store.check([k])]:
            node, answer = waiting.pop(key), json.loads(store.get(key))
            if "error" in answer:
                raise NodeWorkError(answer["error"] if node == mine else f"{node}: {answer['error']}")
            results[node] = answer["ok"]
        elapsed = time.monotonic() - started
        if waiting and elapsed > deadline_minutes * 60:
            raise NodeWorkError(f"{what} on {', '.join(sorted(waiting.values()))} did not end within {deadline_key}="
                                f"{deadline_minutes:g} ({elapsed:.0f} s): raise it, or stage in a step of its own before "
                                f"training (docs/slurm.md, 'Plain sbatch')")
        if waiting and time.monotonic() - said_at >= WAIT_PROGRESS_S:
            said_at = time.monotonic()
            log.info("waiting for %s on %s: %.0f s", what, ", ".join(sorted(waiting.values())), elapsed)
        if waiting:
            time.sleep(0.2)
    return results[mine]


def _until_read(store, key: str, count: int, seconds: float = 30.0) -> None:
    """Wait (at most `seconds`) until `count` processes have added to `key`: they have read an error."""
    deadline = time.monotonic() + seconds
    try:
        while store.add(key, 0) < count and time.monotonic() < deadline:
            time.sleep(0.1)
    except RuntimeError:  # the store is gone: no one is left to read
        pass


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def run_entry(work: Callable[[DistInfo], int | None], device: str = "auto") -> int:
    """The frame of every distributed entry point: join the group, log per rank, run `work`, always leave
    the group. A user error (errors.USER_ERRORS: bad data, config, missing file, processes that do not fit
    the GPUs) is one logged line and exit code 2; `work` may return another exit code. The first line says how the process was
    launched and on what device."""
    env = launch_env()
    setup_logging(env.rank, env.world_size)
    try:
        info = init(device, env=env)
        log.info("launch: %s; device %s", env.describe(), _describe_device(info.device))
        return work(info) or 0
    except USER_ERRORS as exc:
        _record_for_torchrun(exc, user_error=True)  # every rank's error file: whichever torchrun finds first names it
        if first_to_report(env):  # every rank usually meets the same error: one line, not one per rank
            log.error("%s", exc)
        return 2
    except Exception as exc:  # logged, so that a run log (log_to_file) holds it too; the exit code stays 1
        _record_for_torchrun(exc, user_error=False)
        log.exception("stopped by an unexpected error")
        return 1
    finally:
        teardown()
        for handler in [h for h in logging.getLogger().handlers if isinstance(h, RunLogHandler)]:
            logging.getLogger().removeHandler(handler)
            handler.close()


def first_to_report(env: LaunchEnv) -> bool:
    """Whether this process is the first of its launch on this node to report an error: torchrun's workers
    share their parent (the agent, once per restart), so the first to create a marker named after it
    reports and the others stay quiet. Other launchers: every process reports."""
    if env.launcher != "torchrun" or env.world_size == 1:
        return True
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    marker = Path(tempfile.gettempdir()) / f"dr_resnet_error_{os.getppid()}_{restart}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _record_for_torchrun(exc: BaseException, user_error: bool) -> None:
    """The error in torchrun's error file (TORCHELASTIC_ERROR_FILE), so that its failure summary names the
    root cause instead of <N/A>: a user error as its one-line message where the summary shows a traceback
    (its "py_callstack"; our traceback would only bury the cause, once a rank), a bug with its traceback
    (torch's own handler, called while the exception is being handled)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    if not user_error:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(exc)
        return
    line = f"{type(exc).__name__}: " + " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    write_text(path, json.dumps({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                            "timestamp": str(int(time.time()))}}}))


def _describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"


def _log_format(rank: int, world_size: int) -> str:
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    return f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int, world_size: int) -> None:
    """INFO on rank 0, WARNING elsewhere, each line tagged with its rank in multi-process runs; Python's
    warnings (e.g. from torch) are logged like the rest."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=_log_format(rank, world_size), datefmt="%H:%M:%S")
    logging.captureWarnings(True)


class RunLogHandler(logging.FileHandler):
    """A run directory's log file (see log_to_file)."""


def log_to_file(path: Path, info: DistInfo) -> None:
    """Also log to `path`, appended to across resumes and requeues, with dates: rank 0 writes what it
    logs (INFO and up), every other rank its warnings and errors, so a failed cluster job can be read
    from its run directory alone. The one file written by every rank: each record is one append, and
    a rank that never warns never opens it. Closed when run_entry ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RunLogHandler(path, mode="a", encoding="utf-8", delay=info.rank != 0)
    handler.setLevel(logging.INFO if info.rank == 0 else logging.WARNING)
    handler.setFormatter(logging.Formatter(_log_format(info.rank, info.world_size), datefmt="%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
