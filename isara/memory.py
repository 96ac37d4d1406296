"""Process memory: hand freed memory back to the OS (params finetune.release_memory, issue 13's 3 GiB target)."""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameter number, and the threshold (its initial default) from which each allocation is its own mmap
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 * 1024


def release_freed_memory() -> bool:
    """Fix glibc malloc's mmap threshold at 128 KiB for the rest of this process; False where that is not possible.

    By default glibc raises the threshold to the size of each mmapped block freed (up to 32 MiB), so after the first
    steps every activation and gradient tensor comes from heap arenas, which keep freed memory resident: the
    process's peak grows by what fragmentation holds. Fixed, each tensor above 128 KiB is mapped and unmapped on its
    own (slower: page faults on every new tensor). Process-wide, hence called by the stages that train
    (isara.finetune.run_finetune, isara.baseline's one-shot before it generates), not by train().
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no effect here either)
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
