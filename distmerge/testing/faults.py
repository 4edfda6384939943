"""What the object-store test servers do to a client on purpose: cut connections, hold parts.

Why shared: the S3 and Cloud Storage servers must fail in the same ways (a body cut midway, a
request whose answer never comes, a run stalled between two parts so a test can kill it), so
the tests of both stores mean the same thing by each fault.
"""

from __future__ import annotations

import threading
from collections import Counter

METHODS = ("GET", "PUT")


class Faults:
    """Mixed into a test server: ``drop_next`` and ``hold_parts`` for tests, ``take_drop`` and
    ``wait_for_part`` for its request handler, ``dropped`` counting what was cut, per method."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self._drops: Counter[str] = Counter()
        self._drops_lock = threading.Lock()
        self._parts_allowed: int | None = None
        self._parts_seen = 0
        self._parts_released = threading.Condition()

    def drop_next(self, n: int = 1, method: str = "GET") -> None:
        """Cut the next ``n`` object GETs (headers and half the body, then close) or object/part
        PUTs (the body is read, then the connection closes without any answer)."""
        if method not in METHODS:
            raise ValueError(f"drop_next: method must be GET or PUT, not {method!r}")
        with self._drops_lock:
            self._drops[method] = n

    def hold_parts(self, after: int | None) -> None:
        """Let ``after`` more part uploads through, then keep the next ones waiting (a run stalled
        midway, to be killed); ``None`` lets every waiting and later part through."""
        with self._parts_released:
            self._parts_allowed = None if after is None else self._parts_seen + after
            self._parts_released.notify_all()

    def take_drop(self, method: str) -> bool:
        """Whether this request is one to cut (and count it)."""
        with self._drops_lock:
            drop, self._drops[method] = self._drops[method] > 0, max(self._drops[method] - 1, 0)
            self.dropped[method] += drop
            return drop

    def wait_for_part(self) -> None:
        """A part upload arrived: wait while parts are held."""
        with self._parts_released:
            self._parts_seen += 1
            mine = self._parts_seen
            self._parts_released.wait_for(lambda: self._parts_allowed is None or mine <= self._parts_allowed)
