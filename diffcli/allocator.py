"""Host memory of a diffcli process: glibc's malloc told to keep what the tensors of a step free (docs/guides/training.md, "Precision and speed")."""

from __future__ import annotations

import ctypes
import os
import platform

# <malloc.h> mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc takes (HEAP_MAX_SIZE / 2 on 64-bit): blocks below it come from the heap
TRIM_THRESHOLD = 1 << 30  # freed heap memory kept for the next step instead of handed back to the kernel
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Serve blocks under 32 MiB from glibc's heap and keep freed memory; True when glibc took the setting.

    By default glibc maps large blocks fresh from the kernel and trims the heap on free, so every training
    step faults its activations back in page by page (a unet_small step on 2 cores: 6,000-28,000 minor
    faults; without them it runs 9-12% faster, scripts/bench_allocator.py). A user's own MALLOC_* /
    GLIBC_TUNABLES settings are left alone, and so is any libc other than glibc.
    """
    if platform.libc_ver()[0] != "glibc":  # macOS, musl, Windows: '' here
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; fixing the thresholds also stops glibc's own adjustment of them
    taken = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(taken)
