"""Keep freed memory in the process: where the CPU runs' kernel time came from.

Measured (scripts/bench_memory.py, and /tmp runs in the issue-9 notes): a CPU forward pass
of tf_efficientnet_lite0 at 224x168, batch 256, allocates activation tensors of 100-300 MB.
glibc serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
gives it back with ``munmap`` when the tensor dies, so each step faults every page in again
(zero-filled by the kernel): 16.6 million minor faults and system time 1.25x user time for
three batches. PyTorch has no caching allocator on the CPU, so the fix is glibc's own knobs,
set once per process by the console entry points: serve big blocks from the heap
(``M_MMAP_MAX=0``) and do not trim the heap top back to the OS (``M_TRIM_THRESHOLD``). The
same three batches then take 0.17 million faults, system time 7% of user, 2.6x less wall time.
The cost: the process keeps its peak heap until it exits (what a training run needs anyway).

``FASHION_LIGHTNING_MALLOC=default`` leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "FASHION_LIGHTNING_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the glibc settings above (Linux + glibc only; idempotent). True when applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "keep").lower() in ("default", "off", "0") or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _applied = bool(ok)
    return _applied
