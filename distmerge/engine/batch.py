"""A merge batch: each unit's rows read, reduced where a unit holds its whole tensor, merged and
written at their offsets.

Why reduce here: a method with whole-tensor statistics reads a tensor once per reduction round
and once more to merge it (TIES twice, nuslerp three times). When one unit holds all of a
tensor's rows, which is most tensors of models up to a few billion parameters at the default
shard size, the worker that merges it runs the rounds on the rows it read once, chunk by
canonical chunk and in the driver's order, so the reduced values and the merged bytes are the
same; it holds the unit's raw rows meanwhile, within the plan's memory estimate
(:attr:`distmerge.plan.MergePlan.peak_worker_bytes`). The schedule
(:mod:`distmerge.engine.schedule`) leaves such tensors out of its rounds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

from distmerge.dtypes import TORCH_NAME
from distmerge.engine.memory import PeakAnonRss, retain_freed_memory
from distmerge.engine.worker import (
    BatchResult,
    MergeJob,
    UnitResult,
    blocks,
    merge_block,
    read_counted,
    round_partials,
)
from distmerge.errors import OutputError
from distmerge.io.remote import pin_versions
from distmerge.io.scan import count_nonfinite
from distmerge.methods import get_method
from distmerge.methods.base import Reductions, chunk_read
from distmerge.plan import WorkUnit


def reduce_in_unit(job: MergeJob, unit: WorkUnit, raw: list[torch.Tensor]) -> Reductions:
    """A whole tensor's reduction rounds from its rows read once (``raw``, all of its rows), as
    the schedule runs them: each round on the canonical chunks it reads, reduced in chunk order,
    a round that reads none skipped."""
    t = job.tensors[unit.tensor]
    method = get_method(job.method)
    chunks = t.reduction_chunks()
    reduced: Reductions | None = None
    for round_ in range(t.reduction_rounds):
        wanted = [(r0, r1) for r0, r1 in chunks if chunk_read(reduced, round_, r0, r1)]
        if not wanted:
            continue
        parts = [round_partials(job, WorkUnit(unit.tensor, r0, r1, 0, 0, 0), _rows(raw, unit, r0, r1), round_, reduced)
                 for r0, r1 in wanted]
        reduced = method.reduce(parts, t.params, t.shape, round_, reduced)
    assert reduced is not None  # round 0 reads every chunk
    return reduced


def _rows(raw: list[torch.Tensor], unit: WorkUnit, row_start: int, row_end: int) -> list[torch.Tensor]:
    """Rows ``[row_start, row_end)`` of a unit's raw rows (all of them as they are: a 0-d tensor
    has one row and cannot be sliced)."""
    if (row_start, row_end) == (unit.row_start, unit.row_end):
        return raw
    return [r[row_start - unit.row_start:row_end - unit.row_start] for r in raw]


def run_batch(job: MergeJob, units: list[WorkUnit], reduced: dict[int, Reductions],
              stop: threading.Event | None = None) -> BatchResult:
    """Merge and write a batch of units; returns checksums and I/O and memory figures.

    A unit is read in row blocks, the next while this one merges (disk and CPU overlap), except
    a unit whose tensor's reductions it runs itself (``reduced`` lacks them): it is read whole,
    then merged block by block from those rows.

    ``stop`` (the local executor's): once set, the batch ends before its next block, so a
    failed or interrupted merge does not go on writing (its output is not published either way).
    """
    retain_freed_memory()
    pin_versions(job.pins)
    started, fetched = time.perf_counter(), 0
    warnings: list[str] = []
    work = []  # (unit index, rows read at once, whether it runs its tensor's rounds)
    for i, unit in enumerate(units):
        t = job.tensors[unit.tensor]
        if unit.tensor not in reduced and t.reduced_in_unit(unit):
            work.append((i, unit, True))
        else:
            work += [(i, block, False) for block in blocks(unit, job.block_bytes)]
    crcs, sizes, nonfinite = [0] * len(units), [0] * len(units), [0] * len(units)
    sink = job.output.open_batch(units, job.tensors)
    with PeakAnonRss() as memory, ThreadPoolExecutor(1, thread_name_prefix="prefetch") as reader:
        upcoming = reader.submit(read_counted, job, work[0][1]) if work else None
        for k, (i, read, reduces_here) in enumerate(work):
            assert upcoming is not None
            raw, fetched_now = upcoming.result()
            fetched += fetched_now
            upcoming = reader.submit(read_counted, job, work[k + 1][1]) if k + 1 < len(work) else None
            t = job.tensors[read.tensor]
            own = reduce_in_unit(job, read, raw) if reduces_here else reduced.get(read.tensor)
            for block in blocks(read, job.block_bytes) if reduces_here else [read]:
                if stop is not None and stop.is_set():
                    raise InterruptedError("the merge stopped")
                out = merge_block(job, block, _rows(raw, read, block.row_start, block.row_end), own, warnings)
                offset, _ = t.out_span(block.row_start, block.row_end)
                sizes[i] += sink.write(t.file_index, offset, out)
                crcs[i] = zlib.crc32(out.contiguous().reshape(-1).view(torch.uint8).numpy(), crcs[i])
                bad = count_nonfinite(out)  # what the output holds: the inputs were finite, a cast can overflow
                if bad and job.check_finite:
                    raise OutputError(f"tensor {t.name!r} rows {block.row_start}:{block.row_end}: the merge makes {bad} "
                                      f"NaN/Inf values in {TORCH_NAME.get(t.out_dtype, t.out_dtype)} (an output dtype too narrow for the merged "
                                      "values, or parameters that overflow); nothing was published. Use another "
                                      "out_dtype or parameters, or pass --allow-nonfinite to write them with a warning")
                nonfinite[i] += bad
                del out
            del raw
        parts = sink.close()
    results = [UnitResult(u.tensor, u.row_start, u.row_end, crcs[i], sizes[i], nonfinite[i])
               for i, u in enumerate(units)]
    read_bytes = sum(u.read_bytes for u in units)
    written = sum(sizes)
    return BatchResult(results, read_bytes, written, time.perf_counter() - started, socket.gethostname(),
                       os.getpid(), memory.peak, memory.start, warnings, fetched, parts)
