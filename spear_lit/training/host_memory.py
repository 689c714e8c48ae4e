"""Keep freed host memory for reuse instead of handing it back to the OS after every large tensor.

glibc serves allocations above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with fresh
pages and trims the heap above 128 KiB of free space back to the OS. A CPU training step allocates and
frees the same multi-MiB activations every micro-batch (the MLP's [rows, tokens, 4·hidden] tensors), and
what was handed back page-faults and is zeroed again. Raising both thresholds keeps the process's heap at its
peak instead, as a caching allocator does on a GPU; on the vs_trl workload this made the CPU update ~3 %
faster (bench/vs_trl.py). The cost: up to ``trim_mib`` of freed memory stays mapped to the process.
``train()`` calls it once at start-up. No effect, and no error, off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(*, trim_mib: int = 256, top_pad_mib: int = 64, mmap_mib: int = 32) -> bool:
    """Set glibc's trim threshold, top pad and mmap threshold (MiB); True if glibc accepted all three."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mib = 1 << 20
    return all(
        mallopt(opt, value * mib) == 1
        for opt, value in (
            (M_TRIM_THRESHOLD, trim_mib),
            (M_TOP_PAD, top_pad_mib),
            (M_MMAP_THRESHOLD, mmap_mib),
        )
    )
