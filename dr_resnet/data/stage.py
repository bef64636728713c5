"""Stage a prepared dataset on node-local storage (data.stage_to: /dev/shm, $TMPDIR) once per node.

Tens of thousands of small JPEGs read every epoch from a shared cluster file system are slow; a copy on
the node's own disk or memory is not. A copy is named by its source, its user and a hash of its manifest
(every file's size and modification time), so a changed dataset gets a new folder and a copy in use is
never replaced. It is made with several threads into a temporary folder renamed into place when complete,
under a lock on a file next to it (node-local: locks on NFS or Lustre are not reliable); a process using a
copy holds that lock shared, and `clean` removes only copies no one holds and no job used for some days.
No torch here.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dr_resnet import config
from dr_resnet.config import ConfigError
from dr_resnet.errors import UserError, run_command
from dr_resnet.files import try_lock, write_text

log = logging.getLogger(__name__)

MANIFEST = ".dr_resnet_staged.json"  # inside a copy, written last before the rename: a copy that has it is complete
LAST_USED = ".dr_resnet_last_used"  # inside a copy, touched by every job that uses it (what `clean` reads)
JOB_MARKER = ".dr_resnet_job-"  # in stage_to: which copy a SLURM job's staging step made (see _job_marker)
TEMPORARY = ".tmp"
THREADS = 8  # small files from a network file system: latency-bound, so threads overlap the round trips
PROGRESS_S = 60.0  # how often a long copy (or a wait for one) says where it stands
BLOCK = 4096  # a file takes whole blocks: 88k small files need more than the sum of their sizes
# Mount types whose files are reached over the network: a "node-local" copy there gains nothing.
NETWORK_FILE_SYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs",
                        "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.gcsfuse", "fuse.s3fs", "9p", "afs", "panfs",
                        "wekafs", "orangefs", "pvfs2", "virtiofs"}
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)

_copy_file: Callable[[str, str], object] = shutil.copy2  # keeps modification times; the tests replace it
# Shared locks on the copies this process uses, open until it exits: a copy's lock held shared is what tells
# `clean` (and nothing else) that the copy is in use.
_held: dict[Path, int] = {}


class StageError(UserError):
    """The copy could not be made (no space, an unreadable file, a folder that cannot be created)."""


@dataclass(frozen=True)
class Staged:
    path: Path  # the copy, complete
    said: str  # what was done, in words (with the time it took)


def stage_base(stage_to: str, key: str = "data.stage_to") -> Path:
    """`stage_to` with ~ and environment variables expanded, refused with one line naming `key` when a
    variable is not set or the path is relative (either would put the copy on the shared file system)."""
    expanded = os.path.expandvars(os.path.expanduser(stage_to))
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise ConfigError(f"{key}={stage_to}: ${unset.group(1)} is not set on {socket.gethostname()}; export it in "
                          f"the job, or give an absolute node-local folder (e.g. /dev/shm)")
    if not os.path.isabs(expanded):
        raise ConfigError(f"{key}={stage_to} is a relative path ({expanded}), which would put the copy in the "
                          f"working folder: give an absolute node-local folder, e.g. /dev/shm or '$TMPDIR'")
    return Path(expanded)


def manifest_of(root: Path) -> dict[str, list[int]]:
    """Every file under root (relative path -> size, modification time); linked folders are followed, as
    the dataset's readers follow them."""
    found = {}
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            path = Path(folder) / name
            stat = path.stat()
            found[str(path.relative_to(root))] = [stat.st_size, stat.st_mtime_ns]
    return found


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return str(os.getuid())


def copy_name(root: Path, manifest: dict[str, list[int]]) -> str:
    """The copy's folder name: <source name>-<user>-<hash of source path and manifest>."""
    content = json.dumps({"root": str(root), "files": manifest}, sort_keys=True)
    return f"{root.name}-{user()}-{hashlib.sha1(content.encode()).hexdigest()[:12]}"


def needed_bytes(manifest: dict[str, list[int]]) -> int:
    return sum(-(-size // BLOCK) * BLOCK for size, _ in manifest.values())


def mount_of(path: Path, mounts: Path = Path("/proc/mounts")) -> tuple[str, str] | None:
    """The mount point that holds `path` (need not exist yet) and its file system type, from `mounts`."""
    path = Path(os.path.realpath(path))
    best: tuple[str, str] | None = None
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # "\040" is a space
        if (path == Path(point) or Path(point) in path.parents) and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])  # the last of equal mount points is the one on top
    return best


def memory_room(proc_cgroup: Path = Path("/proc/self/cgroup"),
                cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(limit, in use) of the tightest memory limit over this process's cgroup and its ancestors (v2:
    memory.max, memory.current; v1: memory.limit_in_bytes, memory.usage_in_bytes), or None without one."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    places = []  # (folder of this process's cgroup, the hierarchy's root, file names)
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (cgroup_root / "cgroup.controllers").exists():
            places.append((cgroup_root, path, ("memory.max", "memory.current")))
        elif "memory" in controllers.split(","):
            places.append((cgroup_root / "memory", path, ("memory.limit_in_bytes", "memory.usage_in_bytes")))
    tightest = None
    for top, path, (limit_file, usage_file) in places:
        folder = top / path.lstrip("/")
        if not folder.is_dir():  # a cgroup namespace shows "/" or a path its mount does not have: its root
            folder = top
        while True:
            try:
                limit_text = (folder / limit_file).read_text().strip()
                if limit_text != "max" and int(limit_text) < UNLIMITED:
                    limit, used = int(limit_text), int((folder / usage_file).read_text().strip())
                    if tightest is None or limit - used < tightest[0] - tightest[1]:
                        tightest = (limit, used)
            except (OSError, ValueError):
                pass
            if folder == top or top not in folder.parents:
                break
            folder = folder.parent
    return tightest


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def check_room(base: Path, root: Path, manifest: dict[str, list[int]], mounts: Path = Path("/proc/mounts"),
               proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:
    """Refuse, in one line, a copy that does not fit: on a tmpfs (/dev/shm) in the job's memory limit less
    what it uses (the copy counts against it), and in the file system's free space everywhere."""
    need = needed_bytes(manifest)
    mount = mount_of(base, mounts)
    if mount and mount[1] == "tmpfs":
        room = memory_room(proc_cgroup, cgroup_root)
        if room is not None:
            limit, used = room
            if need > limit - used:
                raise StageError(f"data.stage_to={base} is memory (tmpfs): the copy of {root} ({_size(need)}) counts "
                                 f"against this job's memory, and only {_size(max(limit - used, 0))} of its limit "
                                 f"{_size(limit)} is left ({_size(used)} in use): ask for more memory (--mem) or "
                                 f"stage to a disk ('$TMPDIR')")
            log.info("data.stage_to=%s is memory (tmpfs): the copy (%s) counts against this job's memory (%s of its "
                     "limit %s left)", base, _size(need), _size(limit - used), _size(limit))
    free = shutil.disk_usage(base).free
    if need > free:
        raise StageError(_no_space(base, root, need, free, len(manifest)))


def _no_space(base: Path, root: Path, need: int, free: int, files: int) -> str:
    return (f"data.stage_to={base}: the copy of {root} needs {_size(need)} ({files} files) and {_size(free)} is free "
            f"there: free space there or stage elsewhere")


def warn_if_network(base: Path, mounts: Path = Path("/proc/mounts")) -> str:
    """One warning line when `base` is on a network file system ('' otherwise), also logged."""
    mount = mount_of(base, mounts)
    if mount is None or mount[1] not in NETWORK_FILE_SYSTEMS:
        return ""
    said = (f"data.stage_to={base} is on a network file system ({mount[1]} at {mount[0]}): the copy gains nothing "
            f"there; stage to node-local storage ($TMPDIR, /scratch, /dev/shm)")
    log.warning("%s", said)
    return said


def _temporary(base: Path, name: str) -> Path:
    return base / f".{name}.{socket.gethostname()}.{os.getpid()}{TEMPORARY}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(base: Path) -> list[Path]:
    """Remove this user's temporary copies left in `base` by processes of this host that no longer run
    (a killed copy cannot clean up after itself); returns them."""
    host, removed = socket.gethostname(), []
    for entry in base.glob(f".*-{user()}-*{TEMPORARY}"):
        stem, _, pid = entry.name[: -len(TEMPORARY)].rpartition(".")
        if not (stem.endswith(f".{host}") and pid.isdigit() and not _alive(int(pid))):
            continue
        # Only while no one copies that name (its lock free): a process of another pid namespace on this
        # host (a container) may be alive though its pid is not here.
        fd = os.open(_lock_file(base, stem[1:].removesuffix(f".{host}")), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if try_lock(fd, fcntl.LOCK_EX):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        finally:
            os.close(fd)  # closing releases the lock
    return removed


def _lock_file(base: Path, name: str) -> Path:
    # Next to the copy, never inside it or on the source; kept when a copy is cleaned (a process may hold it open).
    return base / f".{name}.lock"


def _job_marker(base: Path, root: Path) -> Path | None:
    """Where a SLURM job leg's staging step (python -m dr_resnet.stage --train, its own srun step) records the
    copy it made, so that the training step's node leaders do not list the source again; None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    source = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return base / f"{JOB_MARKER}{job}-{restart}-{user()}-{source}"


def _copy_tree(root: Path, temporary: Path, manifest: dict[str, list[int]], threads: int, progress_s: float) -> None:
    """Every file of `manifest` from `root` into `temporary`, `threads` at a time; the first error stops
    it (no more files are started) and is raised."""
    for folder in sorted({str(Path(rel).parent) for rel in manifest}):
        (temporary / folder).mkdir(parents=True, exist_ok=True)
    started, said_at, done, size = time.monotonic(), time.monotonic(), 0, 0
    total = sum(s for s, _ in manifest.values())
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stage")
    try:
        pending = {pool.submit(_copy_file, str(root / rel), str(temporary / rel)): rel for rel in manifest}
        while pending:
            finished, _ = wait(pending, timeout=min(progress_s, 5.0), return_when=FIRST_EXCEPTION)
            for future in finished:
                future.result()  # the first error ends the copy
                done, size = done + 1, size + manifest[pending.pop(future)][0]
            if time.monotonic() - said_at >= progress_s:
                said_at = time.monotonic()
                log.info("copying %s to %s: %d of %d files, %s of %s, %.0f s", root, temporary.parent, done,
                         len(manifest), _size(size), _size(total), said_at - started)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _make_copy(root: Path, base: Path, name: str, manifest: dict[str, list[int]], threads: int,
               progress_s: float) -> None:
    """Copy `root` to base/name through a temporary folder; on any failure, nothing is left behind."""
    temporary, target = _temporary(base, name), base / name
    try:
        try:
            if target.exists():  # without its manifest (a clean cut short): never used, so never in use
                shutil.rmtree(target)
            check_room(base, root, manifest)
            # Under the name's lock held exclusively no one else copies it: any temporary of it is a killed
            # copy's, this process's own pid too (pids are reused).
            for left in base.glob(f".{name}.*{TEMPORARY}"):
                shutil.rmtree(left, ignore_errors=True)
            temporary.mkdir()
            _copy_tree(root, temporary, manifest, threads, progress_s)
            write_text(temporary / MANIFEST, json.dumps(manifest))
            temporary.rename(target)
        finally:  # also on KeyboardInterrupt; a SIGKILLed copy is removed by the next stage (stale temporaries)
            shutil.rmtree(temporary, ignore_errors=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # one line, not shutil's list of every file
            raise StageError(_no_space(base, root, needed_bytes(manifest), shutil.disk_usage(base).free,
                                       len(manifest))) from None
        raise StageError(f"data.stage_to={base}: cannot copy {root}: {exc}") from None


def stage(root: str | os.PathLike, stage_to: str, key: str = "data.stage_to", threads: int = THREADS,
          progress_s: float = PROGRESS_S) -> Staged:
    """A complete copy of `root` under `stage_to`: an existing one (made by another process, job or this
    job's staging step) or a new one; this process then holds it shared (in use) until it exits."""
    started = time.perf_counter()
    root, base = Path(root).resolve(), stage_base(stage_to, key)
    if not root.is_dir():
        raise StageError(f"data.root {root} is not a folder: nothing to stage to {key}={stage_to}")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StageError(f"{key}={stage_to}: cannot create {base}: {exc}") from None
    warn_if_network(base)
    remove_stale_temporaries(base)
    marker = _job_marker(base, root)
    name = _recorded(marker)
    listed: dict[str, dict[str, list[int]]] = {}
    if name is None:
        listed["files"] = manifest_of(root)
        name = copy_name(root, listed["files"])
    target = base / name

    def make() -> None:
        if "files" not in listed:  # the recorded copy was cleaned meanwhile
            listed["files"] = manifest_of(root)
        _make_copy(root, base, name, listed["files"], threads, progress_s)
    made = _use(base, name, make, f"{root} into {target}", progress_s)
    if marker is not None:
        write_text(marker, name)
    took = f"{time.perf_counter() - started:.1f} s"
    manifest = listed.get("files")
    if made and manifest is not None:
        size = sum(s for s, _ in manifest.values())
        return Staged(target, f"staged {root} to {target}: {len(manifest)} files, {size / 2**20:.0f} MiB in {took}")
    files = f"{len(manifest)} files" if manifest is not None else "as this job's staging step recorded"
    return Staged(target, f"{target} already holds an unchanged copy of {root} ({files}; {took})")


def _recorded(marker: Path | None) -> str | None:
    """The copy this job's staging step recorded, when it is still complete."""
    if marker is None or not marker.is_file():
        return None
    name = marker.read_text().strip()
    return name if name and (marker.parent / name / MANIFEST).is_file() else None


def _use(base: Path, name: str, make: Callable[[], None], what: str, progress_s: float) -> bool:
    """Hold base/name's lock shared once the copy is complete, making it (`make`) under the lock held
    exclusively when no one has; returns whether this process made it. Waits, saying so, while another
    process copies."""
    target = base / name
    if target in _held:  # this process already uses it (a second run in one process)
        _touch(target)
        return False
    fd = os.open(_lock_file(base, name), os.O_RDWR | os.O_CREAT, 0o644)
    started = said_at = time.monotonic()
    try:
        while True:
            # Shared first: many jobs may use one complete copy at once, and a job holding it must never
            # keep another from starting.
            if try_lock(fd, fcntl.LOCK_SH):
                if (target / MANIFEST).is_file():
                    made = False
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
            if try_lock(fd, fcntl.LOCK_EX):
                made = not (target / MANIFEST).is_file()
                if made:
                    make()
                _touch(target)  # before the lock is downgraded: `clean` sees it fresh
                fcntl.flock(fd, fcntl.LOCK_SH)
                break
            if time.monotonic() - said_at >= progress_s:
                said_at = time.monotonic()
                log.info("waiting for another process's copy of %s: %.0f s", what, said_at - started)
            time.sleep(0.2)
    except BaseException:
        os.close(fd)
        raise
    _touch(target)
    _held[target] = fd
    return made


def _touch(target: Path) -> None:
    (target / LAST_USED).touch()


def release(target: Path) -> None:
    """Stop holding a copy this process staged (the tests; a process's exit does it)."""
    fd = _held.pop(Path(target), None)
    if fd is not None:
        os.close(fd)


def _used_within(target: Path, now: float, days: float) -> bool:
    used = target / LAST_USED
    try:
        last = used.stat().st_mtime if used.exists() else (target / MANIFEST).stat().st_mtime
    except FileNotFoundError:  # removed meanwhile (another clean)
        return True
    return now - last < days * 86400


def clean(base: Path, older_than_days: float) -> list[str]:
    """Remove this user's copies in `base` that no process holds (their lock taken exclusively, without
    waiting) and no job used for `older_than_days`; also their jobs' markers. Returns what was removed."""
    removed, now = [], time.time()
    for target in sorted(base.glob(f"*-{user()}-*")):
        if not (target / MANIFEST).is_file() or not target.is_dir():
            continue
        lock = _lock_file(base, target.name)
        if not lock.exists():
            continue  # not a copy made by this code
        if _used_within(target, now, older_than_days):
            continue
        fd = os.open(lock, os.O_RDWR)
        try:
            # Not held, and still unused once it is ours: a job touches LAST_USED before it lets go of its
            # exclusive lock, so no job can start using it between the two checks.
            if not try_lock(fd, fcntl.LOCK_EX) or _used_within(target, now, older_than_days):
                continue
            (target / MANIFEST).unlink()  # first: a half-removed copy is never taken for a complete one
            shutil.rmtree(target, ignore_errors=True)
            removed.append(str(target))
        finally:
            os.close(fd)
    for marker in base.glob(f"{JOB_MARKER}*-{user()}-*"):
        if now - marker.stat().st_mtime >= older_than_days * 86400 or not (base / marker.read_text().strip()).is_dir():
            marker.unlink(missing_ok=True)
    return removed


def build_parser() -> argparse.ArgumentParser:
    """The command's parser, built without running anything: main parses with it, and
    docs/reference/commands.md is rendered from its actions (python -m dr_resnet.reference)."""
    p = argparse.ArgumentParser(prog="python -m dr_resnet.stage", description=__doc__.split("\n\n")[0],
                                epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="the prepared dataset to copy (data.root)")
    p.add_argument("--to", help="the node-local folder to copy it under (data.stage_to)")
    p.add_argument("--train", action="store_true", help="read data.root and data.stage_to from a training's "
                   "--config and key=value arguments (slurm/train.sbatch's staging step)")
    p.add_argument("--show", action="store_true", help="with --train: print data.stage_to (empty when unset) and exit")
    p.add_argument("--config", help="with --train: the training's YAML file")
    p.add_argument("--clean", metavar="DIR", help="remove your copies in DIR that no job holds and none used lately")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="with --clean: unused for this many days")
    p.add_argument("--threads", type=int, default=THREADS, help=f"files copied at once (default {THREADS})")
    p.add_argument("overrides", nargs="*", help="with --train: the training's section.key=value arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {socket.gethostname()} %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run_command(lambda: _command(args))


USAGE = """\
  python -m dr_resnet.stage --root DIR --to DIR           copy DIR (or find its copy) under the node-local folder
  python -m dr_resnet.stage --train --config F [k=v ...]   the same for a training's data.root and data.stage_to
  python -m dr_resnet.stage --clean DIR --older-than DAYS  remove your copies no job holds or used for DAYS"""


def _command(args: argparse.Namespace) -> None:
    if args.clean:
        if args.older_than is None:
            raise UserError(f"--clean {args.clean} needs --older-than DAYS (copies unused for that long are removed)")
        for removed in clean(stage_base(args.clean, "--clean"), args.older_than):
            print(f"removed {removed}")
        return
    if args.train:
        cfg = config.load(args.config, args.overrides)
        root, stage_to, key = cfg.data.root, cfg.data.stage_to, "data.stage_to"
        if args.show or not stage_to:
            print(stage_to if args.show else "data.stage_to is not set: nothing to stage")
            return
    elif args.root and args.to:
        root, stage_to, key = args.root, args.to, "--to"
    else:
        raise UserError(f"give --root DIR --to DIR, --train [training arguments] or --clean DIR --older-than DAYS:\n"
                        f"{USAGE}")
    print(f"{socket.gethostname()}: data.stage_to: {stage(root, stage_to, key, args.threads).said}", flush=True)
