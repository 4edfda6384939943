"""Phase: the reduction rounds of methods that need whole-tensor quantities before merging.

Each round reads the tensors that still need it in canonical chunks (independent of the shard
size), collects every chunk's partial result and reduces them in chunk order, so the values
every unit's merge receives are the same under any sharding.
"""

from __future__ import annotations

from collections import defaultdict

from distmerge.engine.executors import Executor
from distmerge.engine.scheduling import progress_bar
from distmerge.engine.worker import MergeJob
from distmerge.methods.base import Partials, Reductions
from distmerge.plan import MergePlan, WorkUnit, batches


def run_reduction_rounds(plan: MergePlan, executor: Executor, job: MergeJob, limit: int,
                         progress: bool) -> dict[int, Reductions]:
    """Every round of every tensor that needs one; returns the reduced values per tensor index."""
    reduced: dict[int, Reductions] = {}
    for round_ in range(plan.reduction_rounds):
        units = [u for u in plan.reduction_units(round_) if not (u.tensor in reduced and reduced[u.tensor].complete)]
        if not units:
            break
        partials: dict[int, dict[int, Partials]] = defaultdict(dict)
        bar = progress_bar(sum(u.read_bytes for u in units), progress, f"reductions {round_ + 1}/{plan.reduction_rounds}")

        def done(batch: list[WorkUnit], result: list[tuple[int, int, Partials]], partials=partials, bar=bar) -> None:
            for tensor, row_start, part in result:
                partials[tensor][row_start] = part
            bar.update(sum(u.read_bytes for u in batch))

        executor.reduction_round(job, batches(units, plan.shard_size), round_, reduced, limit, done)
        bar.close()
        for i, chunks in partials.items():
            t = plan.tensors[i]
            reduced[i] = plan.method.reduce([chunks[r] for r in sorted(chunks)], t.params, t.shape, round_,
                                            reduced.get(i))
    return reduced
