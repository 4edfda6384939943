"""What may run now: each tensor's reduction rounds in order, and its merge as soon as they are done.

Why per tensor: a method with whole-tensor statistics (TIES thresholds, L1 norms, SLERP dots)
reads a tensor once for its statistics and once more for its merge. Run as two global passes,
the statistics pass is disk-bound while the CPU idles and the merge pass the other way round.
Here a tensor's merge batches are released the moment its last round is reduced, and the work
of the earliest tensors goes first, so the merge of one tensor computes while the statistics
of the next ones read: the two passes overlap.

A tensor whose rows of every source fit the shard size, and whose units are in one batch, is
not read twice at all: it is *read once* (:meth:`MergePlan.read_once`). That batch's task reads
it chunk by chunk, runs its rounds on the chunks it holds and merges from them (``MergeTask.read_once``,
:func:`distmerge.engine.batch.reduce_held`), which saves a pass over the inputs that the
overlap above only hides.

Each tensor's rounds are reduced from its canonical chunks in chunk order (every chunk, unless
the previous round's reduction names the chunks the next one needs), so the reduced values (and
the merged bytes) are the same whatever runs when. Pure Python, no
Ray: the executors pull tasks with :meth:`MergeSchedule.take` and report with :meth:`done`.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from distmerge.methods.base import Partials, Reductions
from distmerge.plan import MergePlan, TensorPlan, WorkUnit, batches


@dataclass(frozen=True)
class ReductionTask:
    """Canonical chunks of tensors in one reduction round, and what earlier rounds gave them."""

    units: list[WorkUnit]
    round_: int
    previous: dict[int, Reductions]


@dataclass(frozen=True)
class MergeTask:
    """A batch of units to merge and write, with the reductions of the tensors it touches;
    ``read_once`` names the tensors whose rounds the task runs itself, on the rows it reads
    for their merge (:meth:`MergePlan.read_once`)."""

    units: list[WorkUnit]
    reduced: dict[int, Reductions]
    read_once: frozenset[int] = frozenset()


Task = ReductionTask | MergeTask


class WorkSource(Protocol):
    """What an executor drains: tasks that may run now, and word of each one that is done."""

    def take(self) -> Any | None:
        """A task that may run now, or None: nothing is ready until a running task is done."""
        ...

    @property
    def finished(self) -> bool: ...

    def done(self, task: Any, result: Any) -> None: ...


@dataclass
class _Tensor:
    round_: int = 0
    outstanding: int = 0  # chunks of the current round not yet returned
    partials: dict[int, Partials] = field(default_factory=dict)  # row_start -> partial, this round


class MergeSchedule:
    """Hands out tasks in dependency order (:class:`WorkSource`); ``work_bytes`` is the work handed
    out or ready so far (reductions' reads, merges' writes), for a progress bar whose end moves
    when a tensor needs one more round."""

    def __init__(self, plan: MergePlan, merge_batches: Sequence[list[WorkUnit]]) -> None:
        self.plan = plan
        self.reduced: dict[int, Reductions] = {}
        self.work_bytes = 0
        self._ready: list[tuple[int, int, Task]] = []  # (first tensor, sequence, task): earliest tensor first
        self._sequence = 0
        self._running = 0
        self._chunks: dict[int, list[WorkUnit]] = defaultdict(list)  # tensor -> its canonical chunks
        for u in plan.reduction_units(0):
            self._chunks[u.tensor].append(u)
        self._batches = list(merge_batches)
        in_batches: dict[int, set[int]] = defaultdict(set)  # tensor -> the batches holding its units
        for k, batch in enumerate(self._batches):
            for u in batch:
                in_batches[u.tensor].add(k)
        # A tensor whose rows fit in memory and whose units are in one batch is read once: that
        # batch's task runs its rounds too (no reduction tasks, no second read).
        self.read_once = frozenset(i for i, ks in in_batches.items()
                                   if self._chunks.get(i) and len(ks) == 1 and plan.read_once(i))
        self._tensors = {i: _Tensor() for i in sorted(in_batches) if self._chunks.get(i) and i not in self.read_once}
        self._waiting: dict[int, list[int]] = defaultdict(list)  # tensor -> merge batches waiting for it
        self._blocked: list[set[int]] = []
        for k, batch in enumerate(self._batches):
            blockers = {u.tensor for u in batch if u.tensor in self._tensors}
            self._blocked.append(blockers)
            for i in blockers:
                self._waiting[i].append(k)
            if not blockers:
                self._push(self._merge_task(batch))
        # Every tensor's first round is ready at once: its chunks batched across tensors, as small
        # tensors (norms, biases) would otherwise make a task each.
        first: list[WorkUnit] = []
        for i in self._tensors:
            self._tensors[i].outstanding = len(self._chunks[i])
            first.extend(self._chunks[i])
        for batch in batches(first, plan.shard_size):
            self._push(ReductionTask(batch, 0, {}))

    # -- what the executors call -----------------------------------------------------------

    def take(self) -> Task | None:
        if not self._ready:
            return None
        self._running += 1
        return heapq.heappop(self._ready)[2]

    @property
    def finished(self) -> bool:
        return not self._ready and not self._running

    def done(self, task: Task, result: Any) -> None:
        """A task came back: a reduction's chunk partials go to their tensors (a tensor's round is
        reduced once all of its chunks are in); a merge needs nothing more from here."""
        self._running -= 1
        if isinstance(task, MergeTask):
            return
        for tensor, row_start, part in result.partials:  # a ReductionResult (engine.worker)
            state = self._tensors[tensor]
            state.partials[row_start] = part
            state.outstanding -= 1
            if state.outstanding == 0:
                self._reduce(tensor)

    # -- inside ------------------------------------------------------------------------------

    def work(self, task: Task) -> int:
        """A task's share of the progress bar: a reduction's reads; a merge's writes, and the
        reads of the tensors it reads once (their rounds run in it)."""
        if isinstance(task, ReductionTask):
            return sum(u.read_bytes for u in task.units)
        return sum(u.write_bytes for u in task.units) + sum(
            c.read_bytes for i in task.read_once for c in self._chunks[i])

    def _push(self, task: Task) -> None:
        first = min(u.tensor for u in task.units)
        self.work_bytes += self.work(task)
        heapq.heappush(self._ready, (first, self._sequence, task))
        self._sequence += 1

    def _start_round(self, tensor: int, round_: int, chunks: list[WorkUnit]) -> None:
        state = self._tensors[tensor]
        state.round_, state.partials = round_, {}
        state.outstanding = len(chunks)
        previous = {tensor: self.reduced[tensor]} if tensor in self.reduced else {}
        for batch in batches(chunks, self.plan.shard_size):
            self._push(ReductionTask(batch, round_, previous))

    def _reduce(self, tensor: int) -> None:
        state, t = self._tensors[tensor], self.plan.tensors[tensor]
        parts = [state.partials[r] for r in sorted(state.partials)]
        reduced = self.plan.method.reduce(parts, t.params, t.shape, state.round_, self.reduced.get(tensor))
        self.reduced[tensor] = reduced
        following = next_round(t, self._chunks[tensor], state.round_, reduced)
        if following is not None:
            self._start_round(tensor, *following)
            return
        for k in self._waiting.pop(tensor, []):
            self._blocked[k].discard(tensor)
            if not self._blocked[k]:
                self._push(self._merge_task(self._batches[k]))

    def _merge_task(self, batch: list[WorkUnit]) -> MergeTask:
        touched = {u.tensor for u in batch}
        return MergeTask(batch, {i: self.reduced[i] for i in touched if i in self.reduced},
                         self.read_once & touched)


def next_round(t: TensorPlan, chunks: list[WorkUnit], after: int, reduced: Reductions) -> tuple[int, list[WorkUnit]] | None:
    """The round after round ``after`` that reads anything, and the chunks it reads (a round may
    need only some chunks, or none: then it is skipped); None once the tensor is reduced."""
    for round_ in range(after + 1, t.reduction_rounds):
        reading = [c for c in chunks if reduced.reads(round_, c.row_start, c.row_end)]
        if reading:
            return round_, reading
    return None
