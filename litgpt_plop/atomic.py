"""Writing so that a reader never sees half of anything, even if the writer is killed (SIGKILL included).

A file is written to a temporary name in its directory, then renamed over the target. A directory is built
whole in a staging directory next to its target, then swapped in: with Linux's ``renameat2(RENAME_EXCHANGE)``
the swap is one atomic step; elsewhere it is two renames, and a kill between them leaves the previous directory
under a ``.<name>.old-<pid>-*`` name, which the next write to the same target puts back before anything else.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# A failed write that leaves less than this free on its filesystem is taken as the disk having filled up.
_FULL_BELOW = 2**20
# Every file and directory this process has written through this module, in order (for the line an
# interrupted command prints).
WRITTEN: list[Path] = []


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file next to it; on failure ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(e, path.parent):
            raise _disk_full_error(e, path) from e
        raise
    WRITTEN.append(path)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_bytes_atomic`` for text (UTF-8)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def replace_directory(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Make ``out_dir`` exactly what ``fill(staging)`` writes into an empty staging directory, all at once.

    Until the swap, ``out_dir`` is untouched (a previous version stays complete); after it, ``out_dir`` holds only
    the new files: nothing of the previous version is left in it. If ``fill`` raises, the staging directory is
    removed and ``out_dir`` is as it was. Leftovers of writers that were killed (staging directories, a previous
    version parked between the two renames of the fallback swap) are cleaned up or put back first.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        fill(staging)
        _swap_in(staging, out_dir)
    except BaseException as e:
        full = _disk_full(e, staging)  # measured before the staging directory's space is given back
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise _disk_full_error(e, out_dir) from e
        raise
    WRITTEN.append(out_dir)
    return out_dir


def _disk_full(error: BaseException, where: Path) -> bool:
    """Whether ``error`` came from a full filesystem: ENOSPC, or a write error (torch's zip writer reports one as
    ``RuntimeError: ... unexpected pos``) that left almost nothing free where it was writing."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(where).free < _FULL_BELOW
    except OSError:
        return False


def _disk_full_error(error: BaseException, target: Path) -> OSError:
    """A full disk as ``OSError(ENOSPC)`` that says so, names ``target`` and says it is unchanged."""
    return OSError(
        errno.ENOSPC, f"the disk holding {str(target)!r} is full: it could not be written, and is as it was before ({error})"
    )


def recover_directory(out_dir: Path) -> None:
    """Clean up after writers of ``out_dir`` that were killed: put back a previous version parked by the fallback
    swap if ``out_dir`` is missing, and remove staging directories and parked versions whose writer is gone."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return
    for entry in sorted(out_dir.parent.glob(f".{out_dir.name}.*-*-*")):
        kind, _, rest = entry.name[len(out_dir.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("staging", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out_dir.exists():
            os.rename(entry, out_dir)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _swap_in(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    if _exchange(staging, out_dir):
        shutil.rmtree(staging)  # it now holds the previous version
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
    os.rename(staging, out_dir)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with ``renameat2(RENAME_EXCHANGE)``; False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
