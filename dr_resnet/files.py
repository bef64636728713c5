"""Atomic file writes, the one way this project writes a file that someone may read while it is being
written (a resuming run, the report, a killed process's successor): into a temporary file next to the
target, renamed onto it only when complete. A reader finds the old file or the new one, never half of
one; a failed write leaves the target as it was and no temporary file behind. And the one non-blocking
file lock (try_lock) that node-local copies and cached backbones are shared under. No torch here."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TEMPORARY_SUFFIX = ".tmp"  # .<name>.<pid>.tmp: hidden, and one per process (two writers never share one)


def try_lock(fd: int, kind: int) -> bool:
    """Take an flock of `kind` (fcntl.LOCK_SH or LOCK_EX) on an open file without waiting: False when another
    process holds a lock that excludes it (a file system with working flock: node-local, or a cluster's that
    says so)."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write the whole file to (for a library that wants a path: PIL, torch);
    renamed onto `path` when the block ends without an error, removed when it raises. A write that must
    survive a power cut fsyncs the file inside the block and calls sync_folder after it (checkpoint.py)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", newline: str | None = None,
                 encoding: str | None = None) -> Iterator[IO]:
    """An open file (text by default) whose content replaces `path` atomically when the block ends."""
    with atomic_path(path) as tmp, open(tmp, mode, newline=newline, encoding=encoding) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`path` holds exactly `text` (UTF-8), written atomically."""
    with atomic_write(path, encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
