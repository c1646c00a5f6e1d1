"""Process-wide settings that make bound computation faster on CPU (opt-in).

Why: bound propagation allocates and frees many large tensors per call (coefficient matrices of
``spec x neurons``, relaxation slopes, windows). PyTorch's CPU allocator takes them from the C
library's ``malloc``. glibc serves blocks above its *mmap threshold* with fresh ``mmap`` pages and
returns them to the OS on release (and trims the heap top above its *trim threshold*), so the next
call touches new pages again: one page fault per 4 KiB. On this project's machines a fault costs
about 2.7 µs, i.e. more than the arithmetic an element-wise op does on that page. Measured (one
thread, peer models of ``benchmarks/peer_compare.py``): CROWN on the peer MLP at batch 32 took
22,078 faults per call, on the peer CNN 52,681; keeping freed memory made those calls 29 % and
23 % cheaper (``benchmarks/results/peer_compare.md``).

glibc adapts its threshold upwards after a large block is freed, so the same code runs in one of
two regimes depending on the process's history: a plain forward pass of the peer ResNet at batch
32 costs 38 ms in a fresh process (3,264 faults per pass) and 14 ms once something larger has
been freed (``benchmarks/forward_unit.py``). :func:`keep_freed_memory` fixes the fast regime
from the start.

The price: memory freed by the process stays in it (its resident size stays near its peak: +5 %
peak on a 300-s ReLU-split verification run, 1,016 against 964 MB). That is
the right trade for a process whose job is bounding or verifying; it is not the library's to
decide for a user's process, so nothing here runs on import. The ``boundprop`` command turns it on
(``BOUNDPROP_MALLOC=default`` in the environment keeps the C library's defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: glibc's ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap, which is never trimmed (``INT_MAX``: mallopt takes an
#: int); glibc versions that refuse a threshold above 32 MiB get that.
_KEEP, _KEEP_CAPPED = 2**31 - 1, 2**25

_applied = False


def keep_freed_memory() -> bool:
    """Let glibc's ``malloc`` keep freed blocks (no ``mmap`` per large block, no heap trimming).

    Idempotent; returns True when the setting is in force (glibc only: False on other C libraries
    and platforms, where nothing changes, and when ``BOUNDPROP_MALLOC=default``).
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("BOUNDPROP_MALLOC", "") == "default":
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    threshold = mallopt(_M_MMAP_THRESHOLD, _KEEP) or mallopt(_M_MMAP_THRESHOLD, _KEEP_CAPPED)
    _applied = bool(threshold) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP))
    return _applied


def _glibc_mallopt():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        return libc.mallopt
    except (OSError, AttributeError):
        return None
