"""The merge schedule: a tensor's merge is handed out only once its last round is reduced, the
reduced values equal global rounds' whatever order tasks return in, merges of early tensors
overlap the statistics of later ones, and resumed runs reduce only the tensors left to write."""

from __future__ import annotations

import random

import pytest

from distmerge.engine.batch import reduce_held
from distmerge.engine.schedule import MergeSchedule, MergeTask, ReductionTask
from distmerge.engine.worker import MergeJob, read_block, run_reduction_round
from distmerge.methods.base import chunk_read
from distmerge.output.writers import LocalFiles
from distmerge.plan import batches, build_plan, reduction_chunks
from tests.helpers import make_config


def _plan(llama_family, method: str = "ties", shard_size: int = 30_000):
    base, experts = llama_family
    extra = {"base_model": str(base), "parameters": {"density": 0.4}}
    if method == "breadcrumbs_ties":
        extra["parameters"] = {"density": 0.4, "gamma": 0.02}
    return build_plan(make_config(method, None, experts, [0.6, 0.4], **extra), shard_size)


def _job(plan) -> MergeJob:
    return MergeJob(plan.method.name, tuple(plan.tensors), LocalFiles(()), plan.compute_dtype, 0)


def _global_rounds(plan, job):
    """The reductions as global rounds compute them: every tensor's round r before any round r+1."""
    reduced = {}
    for round_ in range(plan.reduction_rounds):
        units = [u for u in plan.reduction_units(round_) if chunk_read(reduced.get(u.tensor), round_, u.row_start, u.row_end)]
        partials: dict[int, dict[int, object]] = {}
        for unit in units:
            for tensor, row_start, part in run_reduction_round(job, [unit], round_, reduced).partials:
                partials.setdefault(tensor, {})[row_start] = part
        for i, chunks in partials.items():
            t = plan.tensors[i]
            reduced[i] = plan.method.reduce([chunks[r] for r in sorted(chunks)], t.params, t.shape, round_,
                                            reduced.get(i))
    return reduced


def _drain(schedule, job, rng: random.Random, width: int):
    """Run the schedule with up to ``width`` tasks "in flight", completing a random one each time."""
    log, running = [], []
    while True:
        while len(running) < width and (task := schedule.take()) is not None:
            running.append(task)
            log.append(("start", task))
        if not running:
            assert schedule.finished
            return log
        task = running.pop(rng.randrange(len(running)))
        result = run_reduction_round(job, task.units, task.round_, task.previous) \
            if isinstance(task, ReductionTask) else None
        schedule.done(task, result)
        log.append(("done", task))


@pytest.mark.parametrize(("method", "seed"), [("ties", 0), ("ties", 1), ("breadcrumbs_ties", 2)])
def test_reductions_equal_global_rounds_and_merges_wait_for_them(llama_family, method, seed):
    plan = _plan(llama_family, method)
    job = _job(plan)
    merge_batches = list(batches(plan.units, plan.shard_size))
    schedule = MergeSchedule(plan, merge_batches)
    log = _drain(schedule, job, random.Random(seed), width=4)

    expected = _global_rounds(plan, job)
    # Tensors whose rows fit the shard size are reduced by their merge task (read once), on
    # their rows held whole: the same reductions.
    assert schedule.read_once and not schedule.read_once & set(schedule.reduced)
    assert set(schedule.reduced) | schedule.read_once == set(expected)
    assert set(schedule.reduced), "no tensor was reduced by reduction tasks"
    for i, r in expected.items():
        if i in schedule.read_once:
            held = [read_block(job, c) for c in reduction_chunks(i, plan.tensors[i])]
            assert repr(reduce_held(job, i, held)) == repr(r), plan.tensors[i].name
        else:
            assert repr(schedule.reduced[i]) == repr(r), plan.tensors[i].name

    merged = [task for kind, task in log if kind == "start" and isinstance(task, MergeTask)]
    assert sorted((u.tensor, u.row_start) for t in merged for u in t.units) == sorted(
        (u.tensor, u.row_start) for u in plan.units)
    finished_at: dict[int, int] = {}  # tensor -> log position where its last reduction returned
    for k, (kind, task) in enumerate(log):
        if kind == "done" and isinstance(task, ReductionTask):
            for u in task.units:
                finished_at[u.tensor] = k
    for k, (kind, task) in enumerate(log):
        if kind == "start" and isinstance(task, MergeTask):
            for u in task.units:
                if u.tensor in schedule.read_once:
                    assert u.tensor in task.read_once and u.tensor not in task.reduced
                elif plan.tensors[u.tensor].reduction_rounds:
                    assert finished_at[u.tensor] < k, "a merge started before its tensor was reduced"
                    assert repr(task.reduced[u.tensor]) == repr(expected[u.tensor])


def test_merges_of_early_tensors_overlap_later_statistics(llama_family):
    plan = _plan(llama_family)
    schedule = MergeSchedule(plan, list(batches(plan.units, plan.shard_size)))
    log = _drain(schedule, _job(plan), random.Random(0), width=2)
    starts = [task for kind, task in log if kind == "start"]
    first_merge = next(k for k, t in enumerate(starts) if isinstance(t, MergeTask) and t.reduced)
    assert any(isinstance(t, ReductionTask) for t in starts[first_merge:]), "statistics all ran before any merge"
    assert schedule.work_bytes >= sum(u.write_bytes for u in plan.units) + sum(
        u.read_bytes for u in plan.reduction_units(0))


def test_a_resumed_run_reduces_only_the_tensors_it_still_writes(llama_family):
    plan = _plan(llama_family)
    left = [u for u in plan.units if u.tensor == plan.units[-1].tensor]
    schedule = MergeSchedule(plan, [left])
    _drain(schedule, _job(plan), random.Random(0), width=3)
    assert set(schedule.reduced) == {left[0].tensor}


def test_nothing_to_do_is_finished_at_once(llama_family):
    schedule = MergeSchedule(_plan(llama_family), [])
    assert schedule.take() is None and schedule.finished and schedule.work_bytes == 0


def test_a_tensor_is_read_once_when_its_rows_fit_and_its_units_share_a_batch(llama_family):
    plan = _plan(llama_family, shard_size=200_000)
    fits = plan.read_once_tensors
    split = {u.tensor for u in plan.units} - {u.tensor for u in plan.units if sum(
        v.tensor == u.tensor for v in plan.units) == 1}
    assert fits & split, "no tensor both fits and is cut into several units"
    # Local outputs keep such a tensor's units in one batch, past the budget if need be.
    grouped = list(batches(plan.units, plan.shard_size, fits))
    holding = {i: {k for k, b in enumerate(grouped) if any(u.tensor == i for u in b)} for i in fits}
    assert all(len(ks) == 1 for ks in holding.values())
    assert MergeSchedule(plan, grouped).read_once == fits
    # Batches fixed elsewhere (an object store's upload parts) may cut one: it is reduced apart.
    one_per_unit = [[u] for u in plan.units]
    schedule = MergeSchedule(plan, one_per_unit)
    assert schedule.read_once == fits - split
    _drain(schedule, _job(plan), random.Random(0), width=3)
    assert set(schedule.reduced) == {i for i, t in enumerate(plan.tensors) if t.reduction_rounds} - (fits - split)
    # A tensor too large for the shard size is never held whole.
    small = _plan(llama_family, shard_size=5_000)
    assert all(sum(t.row_nbytes(s.dtype) for s in t.sources) * t.rows <= 5_000
               for t in (small.tensors[i] for i in small.read_once_tensors))
