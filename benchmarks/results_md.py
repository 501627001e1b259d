"""Generated sections of ``benchmarks/RESULTS.md``: each benchmark that reports there owns the text between its
two markers (``<!-- name:begin -->`` and ``<!-- name:end -->``) and rewrites only that, so sections of other
benchmarks and everything written by hand stay as they are.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.common import write_text


def write_section(md_path: Path, begin: str, end: str, block: str, before: str | None = None) -> None:
    """Put ``block`` (the generated text, from ``begin`` to ``end``) into the Markdown file ``md_path``, atomically.

    Where the file has both markers, the block replaces what lies between them. Otherwise it is inserted before
    the first occurrence of ``before`` where that is given and in the file, else appended; a file that does not
    exist yet is started with a title.
    """
    md_path = Path(md_path)
    text = md_path.read_text() if md_path.is_file() else ""
    if begin in text and end in text:
        new = text[: text.index(begin)] + block.rstrip("\n") + text[text.index(end) + len(end) :]
    elif before is not None and before in text:
        at = text.index(before)
        new = text[:at] + block + "\n" + text[at:]
    elif text:
        new = text.rstrip("\n") + "\n\n" + block
    else:
        new = "# Benchmark results\n\n" + block
    write_text(md_path, new)


def notes_between(text: str, begin: str, end: str) -> str | None:
    """What a person wrote between a section's notes markers ``begin`` and ``end`` (kept when a benchmark writes
    its section again); None when there is nothing there."""
    match = re.search(re.escape(begin) + r"\n(.*?)\n?" + re.escape(end), text, re.S)
    return match.group(1).strip("\n") if match and match.group(1).strip() else None
