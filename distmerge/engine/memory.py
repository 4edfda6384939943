"""Peak anonymous memory of the current process, sampled while a unit of work runs.

``ru_maxrss`` counts file-backed pages and never resets, so it cannot tell what one batch of
units allocated inside a long-lived Ray worker. Sampling ``RssAnon`` from /proc/self/status in
a background thread measures what the bounded-memory invariant is about: heap and tensor
buffers, not page cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from types import TracebackType

log = logging.getLogger(__name__)

STATUS = "/proc/self/status"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30
_retaining = False


def retain_freed_memory() -> bool:
    """Have glibc keep freed buffers for reuse instead of returning them to the kernel.

    A worker allocates the same few row-block buffers (reads, casts, results) over and over.
    By default glibc serves each large one with a fresh ``mmap`` and unmaps it on free, so
    every block page-faults its buffers in again: measured, a bfloat16 -> float32 cast into
    a fresh 64 MB buffer cost 3x the same cast into a reused one. Raising the mmap and trim
    thresholds makes buffers below 32 MB come from the heap and stay there, so resident
    memory settles at the worker's working set (which it reaches anyway) and stays flat.
    No-op (False) where the C library has no ``mallopt`` (macOS, musl).
    """
    global _retaining
    if _retaining:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _retaining = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("glibc keeps freed buffers below %d bytes: %s", MMAP_THRESHOLD, _retaining)
    return _retaining


def anon_rss() -> int:
    """Current anonymous resident memory in bytes (0 where /proc is not available)."""
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakAnonRss:
    """Context manager sampling ``RssAnon`` every ``interval`` seconds; ``peak`` after exit."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, anon_rss())

    def __enter__(self) -> PeakAnonRss:
        self.start = self.peak = anon_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, anon_rss())
