"""Retrying remote reads: transient failures are retried with backoff, the rest fail at once.

Why here and not only in the client libraries: boto3 and huggingface_hub retry a request that
fails before its body arrives, but a connection dropped while the body streams surfaces as a
read error in the middle of a span. A span read is idempotent (the same bytes at the same
offset), so it is simply asked for again, from the byte where it broke off.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST_DELAY_S = 0.2
MAX_DELAY_S = 10.0


def attempts() -> int:
    """How many times a remote request is tried (``DISTMERGE_REMOTE_ATTEMPTS``, default 6)."""
    try:
        return max(1, int(os.environ.get("DISTMERGE_REMOTE_ATTEMPTS", "6")))
    except ValueError:
        return 6


def with_retries(call: Callable[[], T], what: str, transient: Callable[[BaseException], bool],
                 tries: int | None = None) -> T:
    """``call()``, retried while it raises a ``transient`` error, with jittered exponential backoff.

    The last error is raised unchanged, for the caller to word; a non-transient one at once.
    """
    tries = tries or attempts()
    for attempt in range(1, tries + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - classified just below
            if attempt == tries or not transient(e):
                raise
            delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("%s: %s (attempt %d of %d); retrying in %.1fs", what, _short(e), attempt, tries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__
