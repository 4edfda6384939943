"""A batch of units, as one task runs it: its steps in order, read one step ahead, merged and
written at their offsets; the rows of its read-once tensors held while their rounds and merge use
them.

Why a module apart from :mod:`distmerge.engine.worker`: the worker module holds what one unit
needs (reading its rows, a chunk's partials, a block's merge); this one holds what only a batch
has, the order of its steps and the memory they share. A read-once tensor
(:meth:`~distmerge.plan.MergePlan.read_once`) is read chunk by chunk on the batch's reader
thread, each read overlapping the previous chunk's first-round partials; its later rounds run on
the held chunks (:func:`reduce_held`, the schedule's rounds exactly), and its blocks, cut at chunk
ends, are views of them: one read of the inputs where the rounds and the merge took two.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from distmerge.dtypes import TORCH_NAME
from distmerge.engine.memory import PeakAnonRss, retain_freed_memory
from distmerge.engine.schedule import next_round
from distmerge.engine.worker import (
    BatchResult,
    MergeJob,
    UnitResult,
    blocks,
    check_inputs,
    merge_block,
    output_scan_suffices,
    read_counted,
    rows_part,
    unit_partials,
)
from distmerge.errors import OutputError
from distmerge.io.checksums import crc32
from distmerge.io.remote import pin_versions
from distmerge.io.scan import count_nonfinite
from distmerge.methods import get_method
from distmerge.methods.base import Partials, Reductions
from distmerge.plan import WorkUnit, reduction_chunks, tensor_read_bytes


@dataclass(frozen=True)
class Step:
    """One step of a batch: ``kind`` "chunk" reads a canonical chunk of a read-once tensor and
    computes its first round's partials; "merge" merges and writes a block of unit ``unit``."""

    kind: str
    unit: int  # the batch's unit a merge step writes (-1 for a chunk)
    rows: WorkUnit


def batch_steps(job: MergeJob, units: list[WorkUnit], read_once: frozenset[int]) -> list[Step]:
    """A batch's steps in order. A read-once tensor's chunks come before its first block, and its
    blocks are cut at chunk ends, so that each block is a view of one held chunk."""
    steps: list[Step] = []
    chunks: dict[int, list[WorkUnit]] = {}
    for i, unit in enumerate(units):
        if unit.tensor not in read_once:
            steps += [Step("merge", i, b) for b in blocks(unit, job.block_bytes)]
            continue
        if unit.tensor not in chunks:
            chunks[unit.tensor] = reduction_chunks(unit.tensor, job.tensors[unit.tensor])
            steps += [Step("chunk", -1, c) for c in chunks[unit.tensor]]
        for b in blocks(unit, job.block_bytes):
            steps += [Step("merge", i, piece) for c in chunks[unit.tensor] if (piece := _overlap(b, c)) is not None]
    return steps


def _overlap(block: WorkUnit, chunk: WorkUnit) -> WorkUnit | None:
    r0, r1 = max(block.row_start, chunk.row_start), min(block.row_end, chunk.row_end)
    return rows_part(block, r0, r1) if r0 < r1 else None


class HeldRows:
    """The rows of a batch's read-once tensors (:meth:`MergePlan.read_once`), read chunk by chunk
    and held until the tensor's last block: its rounds run on them and its blocks are views of
    them. :meth:`read` runs on the batch's reader thread, one step ahead of the merging thread
    (a chunk's read overlaps the previous chunk's first-round partials); the dict is only grown
    there and shrunk on the merging thread. Each held tensor also has a scratch dict
    (``ShardContext.held``) where its rounds leave per-element results for its merge; it goes
    with the rows."""

    def __init__(self, job: MergeJob, tensors: frozenset[int]) -> None:
        self.job, self.tensors = job, tensors
        self._chunks: dict[int, list[tuple[WorkUnit, list[torch.Tensor]]]] = {}
        self._scratch: dict[int, dict[Any, Any]] = {}

    def read(self, step: Step) -> tuple[list[torch.Tensor], int]:
        """A step's raw rows of every source, and the bytes fetched from remote storage for them."""
        block = step.rows
        if step.kind == "chunk":
            raw, fetched = read_counted(self.job, block)
            self._chunks.setdefault(block.tensor, []).append((block, raw))
            return raw, fetched
        if block.tensor not in self.tensors:
            return read_counted(self.job, block)
        chunk, raw = next((c, r) for c, r in self._chunks[block.tensor] if c.row_start <= block.row_start < c.row_end)
        return rows_of(raw, block.row_start - chunk.row_start, block.row_end - chunk.row_start), 0

    def held(self, tensor: int) -> list[list[torch.Tensor]]:
        return [raw for _, raw in self._chunks[tensor]]

    def scratch(self, tensor: int) -> dict[Any, Any] | None:
        """A held tensor's scratch (None for a tensor read per block)."""
        return self._scratch.setdefault(tensor, {}) if tensor in self.tensors else None

    def release(self, tensor: int) -> None:
        self._chunks.pop(tensor, None)
        self._scratch.pop(tensor, None)


def rows_of(raw: list[torch.Tensor], row_start: int, row_end: int) -> list[torch.Tensor]:
    """Rows ``[row_start, row_end)`` of each source's rows, as views (a 0-d tensor is its one row)."""
    return [r[row_start:row_end] if r.dim() else r for r in raw]


def reduce_held(job: MergeJob, tensor: int, held: list[list[torch.Tensor]], first: list[Partials] | None = None,
                scratch: dict[Any, Any] | None = None) -> Reductions:
    """A tensor's reduction rounds on its rows held in memory (``held[k]``: the raw rows of its
    canonical chunk ``k``; ``first``: round 0's partials, when computed already; ``scratch``: its
    ``ShardContext.held``), as the schedule
    runs them: the same chunks, the same partials reduced in chunk order, the same rounds skipped,
    so the reductions (and the merged bytes) are the ones separate reduction tasks give."""
    t = job.tensors[tensor]
    method = get_method(job.method)
    chunks = reduction_chunks(tensor, t)
    rows = {c.row_start: raw for c, raw in zip(chunks, held, strict=True)}
    reduced: Reductions | None = None
    round_, reading = 0, chunks
    while True:
        parts = first if round_ == 0 and first is not None else [
            unit_partials(job, c, rows[c.row_start], round_, reduced, scratch) for c in reading]
        reduced = method.reduce(parts, t.params, t.shape, round_, reduced)
        following = next_round(t, chunks, round_, reduced)
        if following is None:
            return reduced
        round_, reading = following


def run_batch(job: MergeJob, units: list[WorkUnit], reduced: dict[int, Reductions],
              stop: threading.Event | None = None, read_once: frozenset[int] = frozenset()) -> BatchResult:
    """Merge and write a batch of units; returns checksums and I/O and memory figures.

    ``stop`` (the local executor's): once set, the batch ends before its next block, so a
    failed or interrupted merge does not go on writing (its output is not published either way).
    ``read_once``: tensors whose reduction rounds run here, on the rows read for their merge
    (all of their units are in this batch).
    """
    retain_freed_memory()
    pin_versions(job.pins)
    started, fetched = time.perf_counter(), 0
    warnings: list[str] = []
    work = batch_steps(job, units, read_once)
    last_step = {step.rows.tensor: k for k, step in enumerate(work)}
    crcs, sizes, nonfinite = [0] * len(units), [0] * len(units), [0] * len(units)
    scan_output_only = output_scan_suffices(job)
    held = HeldRows(job, read_once)
    reduced = dict(reduced)
    first: dict[int, list[Partials]] = {}  # a read-once tensor's round-0 partials, chunk by chunk
    sink = job.output.open_batch(units, job.tensors)
    with PeakAnonRss() as memory, ThreadPoolExecutor(1, thread_name_prefix="prefetch") as reader:
        # Read the next step's rows while this one computes: disk and CPU overlap.
        upcoming = reader.submit(held.read, work[0]) if work else None
        for k, step in enumerate(work):
            assert upcoming is not None
            raw, fetched_now = upcoming.result()
            fetched += fetched_now
            if stop is not None and stop.is_set():
                raise InterruptedError("the merge stopped")
            upcoming = reader.submit(held.read, work[k + 1]) if k + 1 < len(work) else None
            block = step.rows
            if step.kind == "chunk":
                scratch = held.scratch(block.tensor)
                first.setdefault(block.tensor, []).append(unit_partials(job, block, raw, 0, None, scratch))
                if block.row_end == job.tensors[block.tensor].rows:  # its last chunk: the rest of its rounds
                    reduced[block.tensor] = reduce_held(job, block.tensor, held.held(block.tensor),
                                                        first.pop(block.tensor), scratch)
                continue
            i = step.unit
            t = job.tensors[block.tensor]
            out = merge_block(job, block, raw, reduced.get(block.tensor), warnings, not scan_output_only,
                              held.scratch(block.tensor))
            if last_step[block.tensor] == k:
                held.release(block.tensor)
            bad = count_nonfinite(out)  # what the output holds: the inputs were finite, a cast can overflow
            if bad and scan_output_only and t.params is not None:
                check_inputs(job, block, raw, warnings=warnings)  # which input, before anything is written
            del raw
            offset, _ = t.out_span(block.row_start, block.row_end)
            sizes[i] += sink.write(t.file_index, offset, out)
            crcs[i] = crc32(out.contiguous().reshape(-1).view(torch.uint8).numpy(), crcs[i])
            if bad and job.check_finite:
                raise OutputError(f"tensor {t.name!r} rows {block.row_start}:{block.row_end}: the merge makes {bad} "
                                  f"NaN/Inf values in {TORCH_NAME.get(t.out_dtype, t.out_dtype)} (an output dtype too narrow for the merged "
                                  "values, or parameters that overflow); nothing was published. Use another "
                                  "out_dtype or parameters, or pass --allow-nonfinite to write them with a warning")
            nonfinite[i] += bad
            del out
        parts = sink.close()
    results = [UnitResult(u.tensor, u.row_start, u.row_end, crcs[i], sizes[i], nonfinite[i])
               for i, u in enumerate(units)]
    read = sum(u.read_bytes for u in units if u.tensor not in read_once) + sum(
        tensor_read_bytes(job.tensors[i]) for i in read_once)
    written = sum(sizes)
    return BatchResult(units=results, bytes_read=read, bytes_written=written, seconds=time.perf_counter() - started,
                       peak_anon_rss=memory.peak, start_anon_rss=memory.start, warnings=warnings,
                       bytes_fetched=fetched, parts=parts)
