"""Freed memory kept in the process while a model trains (glibc's allocator), so that each step's tensors do
not fault fresh pages in again."""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's own upper limit for a fixed threshold on 64-bit systems
_TRIM_THRESHOLD = 2**30
_kept = False


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the system after every large
    ``free`` (its default gives back the heap's top and maps each block above a moving threshold afresh):
    a training step's activations and gradients, tens of MB each, then reuse the same pages step after step
    instead of faulting them in and zeroing them again. Only the allocator's bookkeeping changes, never a
    number. True when set (now or before); False off glibc, where nothing is done."""
    global _kept
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _kept


__all__ = ["keep_freed_memory"]
