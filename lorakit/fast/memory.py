"""Keep freed memory in the process on CPU, so a training step does not fault its pages in again.

A CPU training step allocates and frees hundreds of MB of activations. glibc's malloc hands blocks over
128 KB (rising to 32 MB as it sees them) back to the kernel on free, with munmap or by trimming its heap,
so the next step's allocations fault every page in again, zero-filled: on SmolLM2-135M at 4 x 256 tokens
that was ~47,000 page faults and ~0.3 s of kernel time per step (benchmarks/throughput.py's CPU config;
docs/BENCHMARKS.md). Raising malloc's mmap and trim thresholds keeps freed blocks for reuse: ~9,000
faults and ~0.1 s. The price is that the process keeps the memory of its largest step until it exits.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameters (malloc.h)
SETTINGS = {M_MMAP_THRESHOLD: 2**30, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 64 * 2**20}
"""Blocks up to 1 GiB come from malloc's heap, which is trimmed only past 2 GiB of free space at its top
and grows 64 MiB at a time. (mallopt takes a C int: 2**31 and more would wrap.)"""


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide); True if it took the settings.

    Does nothing, and returns False, off Linux or with another C library (musl has no mallopt). Call it
    once before CPU training; `lorakit train` and `lorakit.train.Trainer` do on CPU.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
