"""The Ray tasks: stateless and idempotent, so Ray may retry them after a worker dies.

A retried batch rewrites the same rows with the same bytes, so retries cannot corrupt output.
SPREAD scheduling places batches across nodes so every node reads and writes its share.
"""

from __future__ import annotations

from typing import Any

import ray

from distmerge.engine.worker import BatchResult, MergeJob, run_batch, run_statistics
from distmerge.plan import WorkUnit

TASK_RETRIES = 3


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")
def merge_batch_task(job: MergeJob, units: list[WorkUnit], stats: dict[int, dict[str, Any]]) -> BatchResult:
    result = run_batch(job, units, stats)
    # Simulated nodes share a hostname; the Ray node id tells them apart in the report.
    context = ray.get_runtime_context()
    result.node = f"{result.node}/{context.get_node_id()[:12]}"
    return result


@ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")
def statistics_task(job: MergeJob, units: list[WorkUnit], round_: int,
                    previous: dict[int, dict[str, Any]]) -> list[tuple[int, int, dict[str, Any]]]:
    return run_statistics(job, units, round_, previous)
