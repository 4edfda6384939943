"""The Ray tasks: stateless and idempotent, so Ray may retry them after a worker dies.

A retried batch rewrites the same rows with the same bytes, so retries cannot corrupt output.
SPREAD scheduling places batches across nodes so every node reads and writes its share.
"""

from __future__ import annotations

import ray

from distmerge.engine.batch import run_batch
from distmerge.engine.worker import BatchResult, MergeJob, ReductionResult, run_reduction_round
from distmerge.methods.base import Reductions
from distmerge.plan import WorkUnit

TASK_RETRIES = 3


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")
def merge_batch_task(job: MergeJob, units: list[WorkUnit], reduced: dict[int, Reductions],
                     read_once: frozenset[int]) -> BatchResult:
    result = run_batch(job, units, reduced, read_once=read_once)
    result.node = _node(result.node)
    return result


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")
def reduction_task(job: MergeJob, units: list[WorkUnit], round_: int,
                   previous: dict[int, Reductions]) -> ReductionResult:
    result = run_reduction_round(job, units, round_, previous)
    result.node = _node(result.node)
    return result


def _node(hostname: str) -> str:
    """The report's name of this task's node: simulated nodes share a hostname, and the Ray node
    id tells them apart."""
    return f"{hostname}/{ray.get_runtime_context().get_node_id()[:12]}"
