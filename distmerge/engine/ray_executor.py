"""Batches as Ray tasks: the distributed path (a cluster, ``ray job submit``, KubeRay, AIM).

The job description goes to Ray's object store once and every task reads it from there; a
task carries only the reductions of its own tensors; the driver holds no tensor data. Ray itself stays in this module,
:mod:`distmerge.engine.tasks`, :mod:`distmerge.engine.scheduling` and
:mod:`distmerge.engine.cluster`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distmerge.engine.cluster import cluster_cpus, connect
from distmerge.engine.schedule import ReductionTask, Task, WorkSource
from distmerge.engine.scheduling import run_bounded
from distmerge.engine.worker import MergeJob


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def start(self) -> None:
        connect(self.address)

    def in_flight(self, workers: int | None) -> int:
        cpus = cluster_cpus()
        concurrency = workers or cpus
        # Ray runs at most one task per CPU, so when every CPU may work, a queue of as many again
        # hides the submit/return round trip at no memory cost (queued tasks hold no buffers).
        return concurrency * 2 if concurrency >= cpus else concurrency

    def run(self, job: MergeJob, schedule: WorkSource, limit: int, on_done: Callable[[Task, Any], None]) -> None:
        import ray

        from distmerge.engine.tasks import merge_batch_task, reduction_task

        job_ref = ray.put(job)  # once per merge, read by every task from the object store

        def submit(task: Task) -> Any:
            if isinstance(task, ReductionTask):
                return reduction_task.remote(job_ref, task.units, task.round_, task.previous)
            return merge_batch_task.remote(job_ref, task.units, task.reduced, task.read_once)

        run_bounded(submit, schedule, limit, on_done)
