"""Scheduling primitives: bounded Ray tasks in flight (batches of units: :func:`distmerge.plan.batches`).

Ray stays here and in :mod:`distmerge.engine.tasks`: the phases submit work through
:func:`run_bounded` and never wait on Ray themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from distmerge.errors import DistmergeError


def run_bounded(submit: Callable[[Any], Any], items: Iterable[Any], limit: int,
                on_done: Callable[[Any, Any], None]) -> None:
    """Submit Ray tasks for ``items`` with at most ``limit`` in flight; ``on_done(item, result)``."""
    import ray

    pending: dict[Any, Any] = {}
    iterator = iter(items)

    def fill() -> None:
        while len(pending) < limit:
            item = next(iterator, None)
            if item is None:
                return
            pending[submit(item)] = item

    fill()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                item = pending.pop(ref)
                on_done(item, _unwrap(ref))
            fill()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _unwrap(ref: Any) -> Any:
    """ray.get that re-raises a task's DistmergeError as itself (a message, not a traceback)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, DistmergeError):
            raise cause from None
        raise


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                disable=not enabled, dynamic_ncols=True, mininterval=0.5)


