"""Seconds and peak memory of one call: what the book's cost figures and ``benchmarks/`` both measure.

CPU memory is the peak growth of the resident set over the call, sampled every millisecond in a thread (glibc set
to hand freed blocks back at once, so the resident set follows live tensors); CUDA memory is
``torch.cuda.max_memory_allocated`` over the call.
"""

from __future__ import annotations

import os
import threading
import time

import torch


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_returns_memory() -> None:
    """Make glibc hand freed tensor memory back at once (mmap for blocks >= 16 KiB), so RSS follows live tensors."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 16384)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, device: str = "cpu", memory: bool = True):
    """(result, seconds, peak bytes above the level before the call, or 0 if not asked)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
    if not memory:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, 0
    _malloc_returns_memory()
    base, peak, done = _rss(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        watcher.join()
    return out, seconds, max(peak[0], _rss()) - base
