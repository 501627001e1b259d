"""The one error type for bad input: what the user gave (a flag, a file, a checkpoint) cannot be used.

The command line turns an ``InputError`` into one line on stderr, ``error: <message>``, and exit code 2 (as
argparse does for a bad flag); any other exception is a bug of ours and keeps its traceback. A message names the
flag or file and says what would be valid.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator


class InputError(ValueError):
    """Bad input from the user, with a message that names it and says what would be valid."""


TRACEBACK_ENV = "LITGPT_PLOP_TRACEBACK"


@contextmanager
def reported_as_one_line() -> Iterator[None]:
    """Turn an ``InputError`` raised inside into ``error: <message>`` on stderr and exit code 2, without a traceback;
    with the environment variable ``LITGPT_PLOP_TRACEBACK=1`` it is raised as it is (for debugging)."""
    try:
        yield
    except InputError as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
