"""Batches as Ray tasks: the distributed path (a cluster, ``ray job submit``, KubeRay, AIM).

The job description and each round's reductions go to Ray's object store once and every task
reads them from there; the driver holds no tensor data. Ray itself stays in this module,
:mod:`distmerge.engine.tasks`, :mod:`distmerge.engine.scheduling` and
:mod:`distmerge.engine.cluster`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from distmerge.engine.cluster import cluster_cpus, connect
from distmerge.engine.scheduling import run_bounded
from distmerge.engine.worker import BatchResult, MergeJob
from distmerge.methods.base import Reductions
from distmerge.plan import WorkUnit


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self._shared: tuple[MergeJob, Any] | None = None

    def start(self) -> None:
        connect(self.address)

    def in_flight(self, workers: int | None) -> int:
        cpus = cluster_cpus()
        concurrency = workers or cpus
        # Ray runs at most one task per CPU, so when every CPU may work, a queue of as many again
        # hides the submit/return round trip at no memory cost (queued tasks hold no buffers).
        return concurrency * 2 if concurrency >= cpus else concurrency

    def _job_ref(self, job: MergeJob) -> Any:
        """The job in the object store, put once per merge however many rounds read it."""
        import ray

        if self._shared is None or self._shared[0] is not job:
            self._shared = (job, ray.put(job))
        return self._shared[1]

    def reduction_round(self, job: MergeJob, batches: Iterable[list[WorkUnit]], round_: int,
                        previous: dict[int, Reductions], limit: int,
                        on_done: Callable[[list[WorkUnit], Any], None]) -> None:
        import ray

        from distmerge.engine.tasks import reduction_task

        job_ref, previous_ref = self._job_ref(job), ray.put(previous)
        run_bounded(lambda b: reduction_task.remote(job_ref, b, round_, previous_ref), batches, limit, on_done)

    def merge(self, job: MergeJob, batches: Iterable[list[WorkUnit]], reduced: dict[int, Reductions], limit: int,
              on_done: Callable[[list[WorkUnit], BatchResult], None]) -> None:
        import ray

        from distmerge.engine.tasks import merge_batch_task

        job_ref, reduced_ref = self._job_ref(job), ray.put(reduced)
        run_bounded(lambda b: merge_batch_task.remote(job_ref, b, reduced_ref), batches, limit, on_done)
