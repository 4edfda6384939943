"""Where a merge's time went, phase by phase, for the report and the last log line.

Why: a user waits for the whole command, and "16.9 s" alone does not say whether Ray's start,
the merge itself, the verification or the output's fsync took it; the report's ``phases_s``
does, on every run, without a profiler.
"""

from __future__ import annotations

import time


class Phases:
    """``mark(name)`` ends the phase ``name`` (time since the previous mark, or since made)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._since, 3)
        self._since = now

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.seconds.items())
