"""Phase: reduction rounds and merges (each tensor's merge once its rounds are reduced), written by the workers.

The driver holds no tensor data: it hands one job description to the executor, submits
batches of units with a bounded number in flight, journals each unit's checksum as its batch
returns, and finishes each output file (renamed, or its upload completed) once all of its rows are in.
Who runs the batches (threads here, or Ray tasks) is the executor's business (engine.executors).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from distmerge.engine.executors import Executor
from distmerge.engine.features import RowStep
from distmerge.engine.schedule import MergeSchedule, ReductionTask, Task
from distmerge.engine.scheduling import progress_bar
from distmerge.engine.worker import BatchResult, MergeJob, ReductionResult
from distmerge.output.journal import JournalWriter
from distmerge.output.local_files import UnitKey
from distmerge.output.target import OutputTarget
from distmerge.plan import MergePlan

log = logging.getLogger(__name__)


def merge_job(plan: MergePlan, target: OutputTarget, row_steps: tuple[RowStep, ...]) -> MergeJob:
    """What every worker needs, shipped once: tensors, the output's writer, dtypes, seed, row steps."""
    execution = plan.config.execution
    return MergeJob(plan.method.name, tuple(plan.tensors), target.writer(plan),
                    plan.compute_dtype, execution.seed, not execution.allow_nonfinite, row_steps,
                    pins=plan.pinned_versions())


def merge_units(plan: MergePlan, target: OutputTarget, job: MergeJob, journal: JournalWriter,
                done_units: set[UnitKey], executor: Executor, workers: int | None,
                progress: bool) -> tuple[list[BatchResult], list[ReductionResult]]:
    """Write every unit not in ``done_units``; finish each file once all its rows are in.
    Returns what the merge batches and the reduction tasks did (the report's figures)."""
    limit = executor.in_flight(workers)
    todo = [u for u in plan.units if (u.tensor, u.row_start, u.row_end) not in done_units]
    remaining: dict[int, int] = defaultdict(int)
    for u in todo:
        remaining[plan.tensors[u.tensor].file_index] += 1
    for i in range(len(plan.files)):
        if remaining[i] == 0:
            target.file_done(plan, i, journal)
    schedule = MergeSchedule(plan, list(target.batches(plan, todo)))
    results: list[BatchResult] = []
    reductions: list[ReductionResult] = []
    desc = f"merge ({plan.method.name})" + (" + statistics" if plan.reduction_rounds else "")
    bar = progress_bar(schedule.work_bytes, progress, desc)

    def done(task: Task, result: Any) -> None:
        bar.total = schedule.work_bytes  # one more round for a tensor moves the end
        bar.update(schedule.work(task))
        if isinstance(task, ReductionTask):
            reductions.append(result)
            return
        results.append(result)
        target.parts_done(result.parts, journal)
        for r in result.units:
            journal.unit(r.tensor, r.row_start, r.row_end, r.crc32, r.nonfinite)
        for w in result.warnings:
            log.warning("%s", w)
        for u in task.units:
            f = plan.tensors[u.tensor].file_index
            remaining[f] -= 1
            if remaining[f] == 0:
                target.file_done(plan, f, journal)

    executor.run(job, schedule, limit, done)
    bar.close()
    return results, reductions
