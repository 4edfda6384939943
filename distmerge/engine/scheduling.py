"""Ray's side of draining a merge schedule: bounded Ray tasks in flight, errors unwrapped.

Ray stays here, in :mod:`distmerge.engine.tasks` and :mod:`distmerge.engine.ray_executor`: the
phases hand a schedule to an executor and never wait on Ray themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from distmerge.engine.executors import drain
from distmerge.engine.schedule import WorkSource
from distmerge.errors import DistmergeError

log = logging.getLogger(__name__)


def run_bounded(submit: Callable[[Any], Any], schedule: WorkSource, limit: int,
                on_done: Callable[[Any, Any], None]) -> None:
    """Ray tasks for the tasks of ``schedule`` (``submit`` makes one), at most ``limit`` in flight;
    ``on_done(task, result)`` as each returns. On an error every task still in flight is cancelled,
    and waited for (up to a minute), so none goes on writing after the merge has failed."""
    pending: dict[Any, Any] = {}
    try:
        drain(schedule, limit, pending, submit, _wait_any, on_done)
    except BaseException:
        _cancel(list(pending))
        raise


CANCEL_WAIT_S = 60.0


def _cancel(refs: list[Any]) -> None:
    """Interrupt running tasks and drop queued ones, then wait for them to end.

    Not ``force=True``: a force-cancel kills the worker while its reply may be on the way, and
    Ray 2.x's task manager then aborts the *driver* process ("Tried to complete task that was
    not pending"): a failed merge would take the user's process (or a ``ray job``'s entrypoint)
    down with a core dump instead of its one-line error. A plain cancel raises
    KeyboardInterrupt in the task, which ends at its next Python step (between row blocks).
    """
    if not refs:
        return
    import ray

    for ref in refs:
        try:
            ray.cancel(ref)
        except Exception as e:  # noqa: BLE001 - a task that ended meanwhile: nothing to cancel
            log.debug("cancel of a finished task: %s", e)
    _, running = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
    if running:
        log.warning("%d merge tasks did not stop within %.0f s of the cancel; the output stays unpublished",
                    len(running), CANCEL_WAIT_S)


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


