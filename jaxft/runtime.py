"""Process-wide settings that jaxft's command-line jobs apply before any JAX work.

`keep_freed_host_memory()`: glibc's malloc serves every allocation above its mmap threshold (a few MiB at most)
with a fresh `mmap` and gives it back with `munmap` when freed. XLA:CPU allocates each step's temporaries as one
buffer (2.9 GB for a SmolLM2-135M LoRA step at batch 4 x 512), so every step faults all of those pages in again
and the kernel zeroes them: 704k minor page faults and about 2.4 s of kernel time per step, measured with
getrusage. Serving large allocations from the heap and never trimming it keeps those pages mapped, and the next
step reuses them without a fault.

It must run before JAX starts its threads (a thread keeps the arena it first used). The price is that the
process keeps its peak host memory until it exits, as a caching allocator does. Library code never calls this;
`python -m jaxft.train` and `python -m jaxft.chat` do, first thing, unless `JAXFT_KEEP_HOST_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory mapped for reuse (see the module doc). Returns whether it applied:
    False off Linux/glibc, when `JAXFT_KEEP_HOST_MEMORY=0`, or when glibc refused a setting."""
    if os.environ.get("JAXFT_KEEP_HOST_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # M_ARENA_MAX 1: threads started from now on share the main heap. A thread's own arena grows in 64 MiB heaps
    # and falls back to mmap for anything larger, whatever M_MMAP_MAX says, so XLA's worker threads must not get
    # one. M_MMAP_MAX 0: no allocation is served by its own mmap. M_TRIM_THRESHOLD -1: the heap's top is never
    # returned to the system (glibc reads -1 as the largest unsigned value).
    return all(mallopt(param, value) for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                                          (_M_TRIM_THRESHOLD, -1)))


def reset_peak_rss() -> int | None:
    """Linux: reset this process's peak resident set size (VmHWM) to its current size, so that `peak_rss` then
    reads the peak of what follows; returns the current resident bytes. None where the kernel offers no reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def peak_rss() -> int | None:
    """Linux: this process's peak resident set size in bytes since start or the last `reset_peak_rss`."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
