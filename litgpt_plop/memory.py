"""Handing the memory that malloc keeps for reuse back to the system, without changing how the process allocates.

glibc's malloc does not give freed memory back at once. A block under the mmap threshold (128 KiB at first, but
it rises, up to 32 MiB, to the size of each mmapped block freed) comes from a heap, and a free hole in a heap
stays resident until it is reused; every thread that allocates may get a heap (an arena) of its own. Quantizing a
model on CPU frees many such blocks (each weight's float32 copy, its bucketized codes, ...) between the small
4-bit weights that stay, and a 4-bit forward dequantizes every weight it uses: on a 1B-shaped checkpoint, 1.1 GB
of the 1.9 GB a 4-bit load owned was such holes (in the main heap: ``malloc_info`` counted 797 MiB free in 1479
chunks). Setting ``MALLOC_MMAP_THRESHOLD_`` hides that, but a user does not set it.

``release_free_memory`` calls glibc's ``malloc_trim(0)``, which returns the free pages of every arena to the
kernel (the top of each heap, and the whole pages inside its free chunks). It changes no allocator setting,
unlike ``mallopt`` or the ``MALLOC_*`` variables, which would change the whole process this runs in (the plugin's
callback runs inside the user's Trainer); it locks each arena while it trims it, so other threads stay safe; a
later allocation that reuses a trimmed page gets a fresh zero page. It costs a walk over the free chunks and a
``madvise`` per run of free pages: 0.1 s to hand back the 1.1 GB above, microseconds when little is free. Where
the C library is not glibc (macOS, Windows, musl), it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Callable


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has no such symbol  # noqa: B018
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Give the free memory glibc's malloc keeps in every arena back to the kernel (``malloc_trim(0)``); see the
    module docstring for why and what it costs. Memory in use is untouched. Returns False, having done nothing,
    where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
