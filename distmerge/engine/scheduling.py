"""Ray's side of draining a merge schedule: bounded Ray tasks in flight, errors unwrapped.

Ray stays here, in :mod:`distmerge.engine.tasks` and :mod:`distmerge.engine.ray_executor`: the
phases hand a schedule to an executor and never wait on Ray themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distmerge.engine.executors import drain
from distmerge.engine.schedule import WorkSource
from distmerge.errors import DistmergeError


def run_bounded(submit: Callable[[Any], Any], schedule: WorkSource, limit: int,
                on_done: Callable[[Any, Any], None]) -> None:
    """Ray tasks for the tasks of ``schedule`` (``submit`` makes one), at most ``limit`` in flight;
    ``on_done(task, result)`` as each returns. On an error every task still in flight is cancelled."""
    pending: dict[Any, Any] = {}
    try:
        drain(schedule, limit, pending, submit, _wait_any, on_done)
    except BaseException:
        import ray

        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _wait_any(refs: list[Any]) -> list[tuple[Any, Any]]:
    import ray

    done, _ = ray.wait(refs, num_returns=1)
    return [(ref, _unwrap(ref)) for ref in done]


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


