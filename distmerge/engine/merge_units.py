"""Phase: reduction rounds, then every unit merged and written by the workers.

The driver holds no tensor data: it ships one job description to the object store, submits
batches of units with a bounded number in flight, journals each unit's checksum as its batch
returns, and finishes each output file (renamed, or its upload completed) once all of its rows are in.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from distmerge.engine.cluster import cluster_cpus
from distmerge.engine.features import RowStep
from distmerge.engine.reductions import run_reduction_rounds
from distmerge.engine.scheduling import progress_bar, run_bounded
from distmerge.engine.worker import BatchResult, MergeJob
from distmerge.output.journal import JournalWriter
from distmerge.output.local_files import UnitKey
from distmerge.output.target import OutputTarget
from distmerge.plan import MergePlan, WorkUnit

log = logging.getLogger(__name__)


def tasks_in_flight(workers: int | None) -> int:
    """How many batches to keep submitted: ``workers`` (default: the cluster's CPUs)."""
    cpus = cluster_cpus()
    concurrency = workers or cpus
    # Ray runs at most one task per CPU, so when every CPU may work, a queue of as many again
    # hides the submit/return round trip at no memory cost (queued tasks hold no buffers).
    return concurrency * 2 if concurrency >= cpus else concurrency


def merge_job(plan: MergePlan, target: OutputTarget, row_steps: tuple[RowStep, ...]) -> MergeJob:
    """What every worker needs, shipped once: tensors, the output's writer, dtypes, seed, row steps."""
    execution = plan.config.execution
    return MergeJob(plan.method.name, tuple(plan.tensors), target.writer(plan),
                    plan.compute_dtype, execution.seed, not execution.allow_nonfinite, row_steps,
                    pins=plan.pinned_versions())


def merge_units(plan: MergePlan, target: OutputTarget, job: MergeJob, journal: JournalWriter,
                done_units: set[UnitKey], workers: int | None, progress: bool) -> list[BatchResult]:
    """Write every unit not in ``done_units``; finish each file once all its rows are in."""
    import ray

    from distmerge.engine.tasks import merge_batch_task

    limit = tasks_in_flight(workers)
    todo = [u for u in plan.units if (u.tensor, u.row_start, u.row_end) not in done_units]
    remaining: dict[int, int] = defaultdict(int)
    for u in todo:
        remaining[plan.tensors[u.tensor].file_index] += 1
    for i in range(len(plan.files)):
        if remaining[i] == 0:
            target.file_done(plan, i, journal)
    job_ref = ray.put(job)
    reduced = run_reduction_rounds(plan, job_ref, limit, progress) if todo else {}
    reduced_ref = ray.put(reduced)
    results: list[BatchResult] = []
    bar = progress_bar(sum(u.write_bytes for u in todo), progress, f"merge ({plan.method.name})")

    def done(batch: list[WorkUnit], result: BatchResult) -> None:
        results.append(result)
        target.parts_done(result.parts, journal)
        for r in result.units:
            journal.unit(r.tensor, r.row_start, r.row_end, r.crc32, r.nonfinite)
        for w in result.warnings:
            log.warning("%s", w)
        bar.update(result.bytes_written)
        for u in batch:
            f = plan.tensors[u.tensor].file_index
            remaining[f] -= 1
            if remaining[f] == 0:
                target.file_done(plan, f, journal)

    run_bounded(lambda b: merge_batch_task.remote(job_ref, b, reduced_ref), target.batches(plan, todo), limit, done)
    bar.close()
    return results
