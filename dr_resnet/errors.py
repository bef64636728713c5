"""The errors a user can fix: a config key, a file, a folder, a device or a training setting. Each
module that finds one raises its own subclass of UserError (ConfigError, DatasetError, CheckpointError,
...) with a message that names the file, row or key and the fix; every entry point prints that message
as one line and exits with code 2. Anything else is a bug: a traceback and exit code 1. No torch here."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user gave or set is wrong or missing; the message says what and where."""


# What every entry point answers with one line and exit code 2: our own errors, and a path that is not
# there (open() on a file the user named raises FileNotFoundError with the path in its message).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


def run_command(work: Callable[[], int | None]) -> int:
    """The frame of a single-process entry point: `work`'s exit code (0 for None), or 2 after printing a
    user error as one line ("error: ...") on stderr."""
    try:
        return work() or 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
