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
    ``on_done(task, result)`` as each returns. On an error nothing more is submitted and the tasks
    still in flight are waited for (:func:`_settle`), so none goes on writing after the merge
    has failed."""
    pending: dict[Any, Any] = {}
    try:
        drain(schedule, limit, pending, submit, _wait_any, on_done)
    except BaseException:
        _settle(list(pending))
        raise


SETTLE_WAIT_S = 120.0


def _settle(refs: list[Any]) -> None:
    """Let the tasks still in flight end, without cancelling them, and wait for them.

    No ``ray.cancel``: in Ray 2.x a cancel races a running task's reply. The cancel marks the
    task failed while its reply is on the way, and the task manager then aborts the *driver*
    process ("Tried to complete task that was not pending"). That was seen with ``force=True``
    and again with a plain cancel of a reduction task, and it turns the user's one-line error
    into a core dump of their process (or of a ``ray job``'s entrypoint). At most ``limit``
    tasks are in flight, so letting them finish costs about one batch's time before the error
    is raised, and none writes after the merge has failed.
    """
    if not refs:
        return
    import ray

    log.info("the merge stopped; waiting for the %d tasks still in flight to end (Ctrl-C again stops at once)",
             len(refs))
    _, running = ray.wait(refs, num_returns=len(refs), timeout=SETTLE_WAIT_S)
    if running:
        log.warning("%d merge tasks still run %.0f s after the merge failed; the output stays unpublished",
                    len(running), SETTLE_WAIT_S)


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


