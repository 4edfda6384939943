"""Who runs the batches of a merge: threads of this process, or Ray tasks across a cluster.

Why two: a merge on one machine needs no cluster, and starting an embedded Ray (its GCS,
raylet, workers importing torch again) costs seconds a user waits for on every command,
more than a small merge itself takes. The local executor starts in no time: a pool of
threads in this process, each merging whole batches with the same worker functions
(:func:`~distmerge.engine.batch.run_batch`) a Ray task calls, one intra-op thread each as a
Ray worker with one CPU has, so both give the same bytes. The heavy work (numba kernels,
torch ops, file I/O, CRC-32) releases the GIL, so the threads run in parallel. The distributed
path (several nodes, ``ray job submit``, AIM's calibration pipeline of several stages) stays
Ray (:mod:`distmerge.engine.ray_executor`); a one-stage calibration runs in this process
(:mod:`distmerge.aim.in_process`).

``execution.executor`` (or ``--executor``) chooses: ``auto`` (default) takes Ray when an
address is given (``--ray-address``, ``RAY_ADDRESS``), when this process already runs Ray,
or when a feature needs it (AIM calibrating the base model in several stages), and the local
threads otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

from distmerge.engine.batch import run_batch
from distmerge.engine.cluster import cluster_address, connect
from distmerge.engine.schedule import MergeTask, ReductionTask, Task, WorkSource
from distmerge.engine.worker import MergeJob, run_reduction_round
from distmerge.errors import ConfigError
from distmerge.torch_threads import torch_threads

log = logging.getLogger(__name__)


class Executor(Protocol):
    name: str  # "local" or "ray": the report's executor and the phase of its start

    def start(self) -> None: ...

    def in_flight(self, workers: int | None) -> int:
        """How many tasks to keep submitted at once for ``workers`` (None: every CPU)."""
        ...

    def run(self, job: MergeJob, schedule: WorkSource, limit: int, on_done: Callable[[Task, Any], None]) -> None:
        """Every task of ``schedule``, at most ``limit`` at once; ``on_done(task, result)`` on the
        calling thread as each returns (after ``schedule.done``)."""
        ...


def execute(job: MergeJob, task: Task, stop: threading.Event | None = None) -> Any:
    """What a worker does with one task of the schedule (the Ray tasks call the same functions)."""
    if isinstance(task, ReductionTask):
        return run_reduction_round(job, task.units, task.round_, task.previous)
    assert isinstance(task, MergeTask)
    return run_batch(job, task.units, task.reduced, stop, task.read_once)


def local_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as a container's cpuset limits it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class LocalExecutor:
    """Batches on a pool of threads of this process; ``on_done`` runs on the calling thread."""

    name = "local"

    def start(self) -> None:
        log.info("merging on %d local CPUs (threads of this process; no Ray)", local_cpus())

    def in_flight(self, workers: int | None) -> int:
        return workers or local_cpus()

    def run(self, job: MergeJob, schedule: WorkSource, limit: int, on_done: Callable[[Task, Any], None]) -> None:
        run_threaded(lambda task, stop: execute(job, task, stop), schedule, limit, on_done)


def run_threaded(work: Callable[[Any, threading.Event], Any], schedule: WorkSource, limit: int,
                 on_done: Callable[[Any, Any], None]) -> None:
    """``work(task, stop)`` for every task of ``schedule`` on ``limit`` threads.

    The first error (or Ctrl-C) sets ``stop``, so running batches end at their next block
    instead of finishing, cancels what has not started, and is raised here once the
    threads are idle: nothing keeps writing into the output after the merge has failed.
    """
    stop = threading.Event()
    pending: dict[Future[Any], Any] = {}
    # One torch intra-op thread per worker thread, as in a 1-CPU Ray worker (Ray starts its
    # workers with OMP_NUM_THREADS=1): no oversubscribed cores, and every reduction in the
    # same order as on Ray (same bytes). The count is process-wide; each thread applies it.
    with torch_threads(1), ThreadPoolExecutor(max(1, limit), thread_name_prefix="distmerge-worker") as pool:
        try:
            drain(schedule, limit, pending, lambda task: pool.submit(work, task, stop), _wait_threads, on_done)
        except BaseException:
            stop.set()
            for future in pending:
                future.cancel()
            raise


def _wait_threads(pending: list[Future[Any]]) -> list[tuple[Future[Any], Any]]:
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    return [(future, future.result()) for future in done]


def drain(schedule: WorkSource, limit: int, pending: dict[Any, Any], submit: Callable[[Any], Any],
          wait_any: Callable[[list[Any]], list[tuple[Any, Any]]], on_done: Callable[[Any, Any], None]) -> None:
    """Submit what the schedule has ready (at most ``limit`` in ``pending``), wait for any to
    return, report it, repeat until the schedule is finished. ``pending`` (handle -> task) is
    the caller's, so that it can cancel what is left when this raises."""
    while True:
        while len(pending) < limit and (task := schedule.take()) is not None:
            pending[submit(task)] = task
        if not pending:
            if not schedule.finished:
                raise RuntimeError("the merge schedule has work that can never become ready (a bug: please report it)")
            return
        for handle, result in wait_any(list(pending)):
            task = pending.pop(handle)
            schedule.done(task, result)
            on_done(task, result)


def ray_running() -> bool:
    """Whether this process already runs Ray (a test's, a notebook's): checked without importing it."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def join_named_cluster(setting: str, ray_address: str | None) -> None:
    """Before a run creates anything: refuse ``local`` with a cluster address, and join the
    cluster an address (``--ray-address`` or ``RAY_ADDRESS``) names, which the run then uses.

    Why before: a merge locks OUT, clears it for ``--overwrite`` and opens its journal before
    its executor starts; an address that failed there (nobody answers, something else answers,
    the head refuses the token, ``auto`` finds no cluster) left OUT holding only a journal, an
    earlier output deleted. Whether a cluster is there and takes this process is only certain
    once joined (:func:`~distmerge.engine.cluster.connect` checks the address first).
    """
    if setting == "local" and ray_address:
        raise ConfigError("--ray-address joins a Ray cluster, executor local runs without one; drop one of them")
    if setting != "local" and cluster_address(ray_address) and not ray_running():
        connect(ray_address)


def choose_executor(setting: str, ray_address: str | None, needs_ray: str | None) -> Executor:
    """The executor ``setting`` (auto, local, ray) names for this run.

    ``needs_ray`` is the reason a feature needs Ray (None if it does not), so that a refusal
    of ``local`` can say why.
    """
    address = cluster_address(ray_address)
    if setting == "local":
        join_named_cluster(setting, ray_address)
        if needs_ray:
            raise ConfigError(f"executor local: {needs_ray}, which runs on Ray; use executor auto or ray")
        return LocalExecutor()
    if setting == "ray" or address or ray_running() or needs_ray:
        from distmerge.engine.ray_executor import RayExecutor

        return RayExecutor(ray_address)
    return LocalExecutor()
