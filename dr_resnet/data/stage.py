"""Stage a prepared dataset on node-local storage (data.stage_to: /dev/shm, $TMPDIR) once per node.

Tens of thousands of small JPEGs read every epoch from a shared cluster file system are slow; a copy on
the node's own disk or memory is not. The copy is made by one process a node, into a temporary folder
renamed into place when complete, next to a manifest of every file's size and modification time: a
later job on the same node finds it unchanged and starts at once; a changed dataset is copied again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from dr_resnet.files import write_text

MANIFEST = ".dr_resnet_staged.json"


def staged_path(root: str | os.PathLike, stage_to: str) -> Path:
    """Where `root` is staged under `stage_to` (environment variables expanded): one folder per source."""
    root = Path(root).resolve()
    base = Path(os.path.expandvars(os.path.expanduser(stage_to)))
    return base / f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"


def manifest_of(root: Path) -> dict[str, list[int]]:
    """Every file under root (relative path -> size, modification time)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            stat = path.stat()
            found[str(path.relative_to(root))] = [stat.st_size, stat.st_mtime_ns]
    return found


def stage(root: str | os.PathLike, stage_to: str) -> tuple[Path, str]:
    """Copy `root` to its staged folder unless an unchanged copy is there; returns the folder and what was
    done, in words (with the time it took)."""
    root, target = Path(root).resolve(), staged_path(root, stage_to)
    started = time.perf_counter()
    wanted = manifest_of(root)
    if _manifest(target) == wanted:
        return target, f"{target} already holds an unchanged copy of {root} ({len(wanted)} files)"
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.copytree(root, temporary, copy_function=shutil.copy2)
    write_text(temporary / MANIFEST, json.dumps(wanted))
    if target.exists():
        if _manifest(target) == wanted:  # another node's process on the same disk finished first
            shutil.rmtree(temporary, ignore_errors=True)
            return target, (f"{target} was staged meanwhile by another process ({len(wanted)} files; "
                            f"{time.perf_counter() - started:.1f} s)")
        shutil.rmtree(target)
    try:
        temporary.rename(target)
    except OSError:  # another copy took its place between the check and the rename: keep that one
        shutil.rmtree(temporary, ignore_errors=True)
    size = sum(s for s, _ in wanted.values())
    return target, (f"staged {root} to {target}: {len(wanted)} files, {size / 2**20:.0f} MiB in "
                    f"{time.perf_counter() - started:.1f} s")


def _manifest(target: Path) -> dict | None:
    path = target / MANIFEST
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
