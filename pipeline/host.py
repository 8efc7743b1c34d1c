"""The host process: how many threads it may take, and how its allocator treats freed memory.

Process-level settings, with no torch import, so the command line can apply them before
anything heavy loads.
"""

from __future__ import annotations

import functools
import os


def threads_each(processes: int = 1) -> int:
    """Torch threads for each of ``processes`` busy processes sharing this machine's CPUs.

    The cores this process may run on, split evenly, and never more than ``OMP_NUM_THREADS``
    where it is set: on a shared node (or under a test runner with one process per core)
    that variable is how a user says how many threads a process may take. Threads beyond the
    free cores do not help: small operations then wait for each other's time slices, and a
    tiny model's step was measured 3-15x slower in CPU time at 2 threads on a busy 2-core machine.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, processes))
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    return max(1, min(share, int(cap))) if cap.isdigit() and int(cap) > 0 else share


# glibc's mallopt parameters (malloc.h) and the values a training process runs with.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_FREE_BYTES = 512 << 20  # free memory at the heap's top kept for the next step, not handed back
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit: larger blocks are always mapped on their own


def keep_freed_memory() -> bool:
    """Let glibc reuse the memory a step frees instead of handing it back and faulting it in again.

    By default glibc maps blocks above a moving threshold on their own and trims the heap's top
    as soon as it is free, so a training step's activations (a few MB each) come back as fresh
    pages every step: 6,800 page faults a step in the planted check (3 s of 20 CPU-seconds in
    the kernel over 100 steps), and several times that beside other busy processes, where the
    kernel cannot hand out huge pages. Raising both thresholds keeps up to
    :data:`KEPT_FREE_BYTES` for reuse (the same check: 1,000 faults a step, 13 % less CPU).
    Called by the command-line entry points, the sweep's run launcher and the benchmarks, once per
    process; a notebook may call it too. Returns whether the C library took the settings (False
    off glibc, where nothing changes).
    """
    libc = glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


@functools.cache
def glibc():
    """The C library by its glibc name, loaded once (None elsewhere); ``find_library`` would run ldconfig."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
