"""Process memory: hand freed memory back to the OS (params finetune.release_memory, issue 13's 3 GiB target)."""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameter number, and the threshold (its initial default) from which each allocation is its own mmap
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 * 1024


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist in glibc only; musl has no effect here either)
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> bool:
    """Fix glibc malloc's mmap threshold at 128 KiB for the rest of this process; False where that is not possible.

    By default glibc raises the threshold to the size of each mmapped block freed (up to 32 MiB), so after the first
    allocations every tensor below that comes from heap arenas, which keep freed memory resident. Fixed, each
    allocation above 128 KiB is mapped and unmapped on its own: the lowest peak, but page faults on every new tensor
    (a fine-tune step 1.8x slower), so only prepare, which loads once, uses it; training trims instead (trim_heap).
    """
    libc = _glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


_trim = None  # glibc's malloc_trim once release_at_peaks() has switched trim_heap on


def release_at_peaks() -> bool:
    """Switch trim_heap on for the rest of this process (params finetune.release_memory); False where it cannot be."""
    global _trim
    libc = _glibc()
    _trim = libc.malloc_trim if libc is not None else None
    return _trim is not None


def trim_heap() -> None:
    """Hand the heap arenas' free pages back to the OS now, if release_at_peaks() switched this on.

    Called just before a fine-tune step's memory peak (the LM-head loss, whose transients come on top of the whole
    forward pass) and before the checkpoint is saved: the free pages the forward's temporaries left in the heap then
    do not count toward the peak, while between peaks malloc keeps reusing its heap at full speed. Measured on Gemma
    3 LoRA (benchmarks/README.md): the peak of a fixed 128 KiB mmap threshold at the speed of glibc's default."""
    if _trim is not None:
        _trim(0)
