"""``requirements-cpu.lock``: the versions the suite passed with (``make lock`` writes it, ``make setup`` installs
exactly it). Read by the GPU kit, whose pins are the lock's, and by the tests that hold the lock to pyproject."""

from __future__ import annotations

import re
from pathlib import Path

LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements-cpu.lock"


def normalize(dist: str) -> str:
    """A distribution name as PEP 503 compares them (``Markdown_It.py`` -> ``markdown-it-py``)."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """The lock's ``name==version`` lines (comments and blank lines skipped): normalized name -> version."""
    lines = [line.split("#")[0].strip() for line in Path(path).read_text().splitlines()]
    return {normalize(name): version for name, _, version in (line.partition("==") for line in lines if line)}
