"""Peak anonymous memory of the current process, sampled while a unit of work runs.

``ru_maxrss`` counts file-backed pages and never resets, so it cannot tell what one batch of
units allocated inside a long-lived Ray worker. Sampling ``RssAnon`` from /proc/self/status in
a background thread measures what the bounded-memory invariant is about: heap and tensor
buffers, not page cache.
"""

from __future__ import annotations

import threading
from types import TracebackType

STATUS = "/proc/self/status"


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
