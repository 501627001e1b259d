"""The one error type for bad input: what the user gave (a flag, a file, a checkpoint) cannot be used.

The command line turns an ``InputError`` into one line on stderr, ``error: <message>``, and exit code 2 (as
argparse does for a bad flag), and so a full disk and Ctrl-C; any other exception is a bug of ours and keeps its
traceback. A message names the flag or file and says what would be valid.
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from litgpt_plop.atomic import WRITTEN


class InputError(ValueError):
    """Bad input from the user, with a message that names it and says what would be valid."""


TRACEBACK_ENV = "LITGPT_PLOP_TRACEBACK"


@contextmanager
def reported_as_one_line() -> Iterator[None]:
    """Say in one line on stderr, without a traceback: an ``InputError`` (``error: <message>``, exit code 2), a full
    disk (``error: ...``, exit code 2) and Ctrl-C (``interrupted: <what was and was not written>``, exit code 130,
    as a shell reports SIGINT). With the environment variable ``LITGPT_PLOP_TRACEBACK=1`` they are raised as they
    are (for debugging)."""
    try:
        yield
    except (InputError, OSError, KeyboardInterrupt) as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        if isinstance(e, KeyboardInterrupt):
            print(f"interrupted: {written_before_interruption()}", file=sys.stderr)
            raise SystemExit(130) from None
        if isinstance(e, OSError) and e.errno != errno.ENOSPC:
            raise  # any other system error is not the user's to fix: keep its traceback
        message = e if isinstance(e, InputError) else (e.strerror if e.filename is None else f"{e.strerror}: {e.filename!r}")
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def written_before_interruption() -> str:
    """What this process wrote (through ``litgpt_plop.atomic``) before it was stopped, and what that means for the
    rest."""
    by_directory: dict[str, list[str]] = {}
    for path in dict.fromkeys(WRITTEN):
        by_directory.setdefault(str(path.parent), []).append(path.name)
    groups = [f"{', '.join(names)} in {directory}" for directory, names in by_directory.items()]
    shown = "; ".join(groups[:4]) + (f"; and {len(groups) - 4} more directories" if len(groups) > 4 else "")
    done = f"wrote {shown} before the stop" if groups else "nothing was written"
    return (
        f"{done}. Outputs are written whole or not at all, so whatever was being written (final/ included) is as it"
        " was before this run."
    )
