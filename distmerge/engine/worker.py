"""What a worker does with one unit: read its rows, compute a chunk's partials, merge a block
(row steps applied), and the figures a batch returns. A batch's order of steps and the rows it
holds are :mod:`distmerge.engine.batch`'s.

Plain functions, no Ray: the Ray tasks in :mod:`distmerge.engine.tasks` call them, and tests
call them directly. A batch touches only its units' rows of each input and output.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distmerge.dtypes import SAFETENSORS_TO_TORCH
from distmerge.engine.memory import PeakAnonRss, retain_freed_memory
from distmerge.errors import CheckpointError
from distmerge.io.remote import pin_versions, thread_fetched_bytes
from distmerge.io.safetensors import TensorInfo, read_row_set
from distmerge.io.scan import count_nonfinite
from distmerge.lora import LoraTensorInfo, read_source_rows
from distmerge.methods import get_method
from distmerge.methods.base import Partials, Reductions, ShardContext, in_compute
from distmerge.output.writers import LocalFiles, PartUploads, UploadedPart
from distmerge.plan import TensorPlan, WorkUnit


@dataclass(frozen=True)
class MergeJob:
    """Everything a worker needs, shipped once per merge through the object store."""

    method: str
    tensors: tuple[TensorPlan, ...]
    output: LocalFiles | PartUploads  # where merged rows go (output.writers)
    compute_dtype: str
    seed: int
    check_finite: bool = True
    # Applied to every merged block in order, by the features that asked for them (AIM's
    # channel relaxation): picklable objects with the RowStep interface of engine.features.
    row_steps: tuple[Any, ...] = ()
    block_bytes: int = 64 * 1000**2
    pins: tuple[tuple[str, str], ...] = ()  # remote inputs' planned versions (MergePlan.pinned_versions)


@dataclass
class UnitResult:
    tensor: int
    row_start: int
    row_end: int
    crc32: int
    nbytes: int
    nonfinite: int = 0  # NaN/Inf among the merged values written (the output's own check, see verify)


@dataclass(kw_only=True)
class TaskFigures:
    """What a task read, how long it ran, where and with how much memory: every task (a merge
    batch, a reduction round) returns them, and the report adds them up per node and worker."""

    bytes_read: int
    seconds: float
    peak_anon_rss: int
    start_anon_rss: int
    bytes_fetched: int = 0  # from remote storage (ranged requests), retries included
    node: str = field(default_factory=socket.gethostname)  # the Ray tasks add the node id
    pid: int = field(default_factory=os.getpid)


@dataclass(kw_only=True)
class BatchResult(TaskFigures):
    """What a batch did and where: for progress, the journal and the report."""

    units: list[UnitResult]
    bytes_written: int
    warnings: list[str] = field(default_factory=list)
    parts: list[UploadedPart] = field(default_factory=list)  # object-store outputs: the parts uploaded


@dataclass(kw_only=True)
class ReductionResult(TaskFigures):
    """A reduction task's partials (tensor, chunk's first row, partial): a method with rounds
    reads tensors for them too, and the report counts those reads with the batches'."""

    partials: list[tuple[int, int, Partials]]


def _check_finite(rows: torch.Tensor, raw: torch.Tensor, info: TensorInfo, r0: int, r1: int,
                  fatal: bool) -> str | None:
    """Raise (or, when not ``fatal``, return a warning) if the rows hold NaN or Inf.

    ``rows`` are the compute-dtype rows, ``raw`` the same rows as read. Where the cast to the
    compute dtype made the Infs (finite values too large for it, e.g. ``dtype: float16`` over
    float32 or bfloat16 weights), the message says so and names the dtype: the input is fine.
    """
    bad = count_nonfinite(rows)
    if not bad:
        return None
    adapted = f" with the LoRA adapter {info.adapter}" if isinstance(info, LoraTensorInfo) else ""
    where = f"{info.file}: tensor {info.name!r}{adapted}"
    stored = bad if raw is rows or not raw.is_floating_point() else count_nonfinite(raw.float())
    if stored < bad:
        compute = str(rows.dtype).removeprefix("torch.")
        also = f" (and {stored} NaN/Inf values as stored)" if stored else ""
        message = (f"{where} has {bad - stored} finite values in rows {r0}:{r1} too large for the compute dtype "
                   f"{compute}: they become Inf{also}")
        advice = (f"set a wider dtype than {compute} in the config (float32), or pass --allow-nonfinite "
                  "to merge anyway with a warning")
    else:
        message = f"{where} has {bad} NaN/Inf values in rows {r0}:{r1}"
        advice = ("the input is broken (pass --allow-nonfinite, or set execution.allow_nonfinite: true, "
                  "to merge anyway with a warning)")
    if fatal:
        raise CheckpointError(f"{message}; {advice}")
    return message


def read_block(job: MergeJob, unit: WorkUnit) -> list[torch.Tensor]:
    """The raw rows of a unit from every source (base first), as stored (a LoRA source's rows
    come adapted, as PEFT would have stored them); for a tensor of a merged vocabulary, each
    source's rows aligned to the output tokens (compute dtype)."""
    t = job.tensors[unit.tensor]
    if t.vocabulary is None:
        return [read_source_rows(info, unit.row_start, unit.row_end) for info in t.sources]
    rows, by_model = t.vocabulary, dict(zip(t.vocabulary_models, t.sources, strict=True))

    def read(model: int, wanted: np.ndarray) -> torch.Tensor:
        return read_row_set(by_model[model], wanted, read_source_rows)

    return [rows.assemble(m, unit.row_start, unit.row_end, read) for m in t.vocabulary_models]


def read_counted(job: MergeJob, unit: WorkUnit) -> tuple[list[torch.Tensor], int]:
    """:func:`read_block`, and the bytes it fetched from remote storage (counted on the thread
    that reads: several batches may read at once in one process)."""
    before = thread_fetched_bytes()
    raw = read_block(job, unit)
    return raw, thread_fetched_bytes() - before


def output_scan_suffices(job: MergeJob) -> bool:
    """Whether the output's NaN/Inf count stands in for the inputs' scans: the method carries
    every NaN/Inf of an input into the output element it merges (``MergeMethod.
    nonfinite_reaches_output``) and no row step follows it. Then a clean output proves clean
    inputs, and the inputs are scanned only when the output is not clean, to name the input
    and give the same error or warning. It saves a pass over every input (for a linear merge
    of three models, three of its four scans)."""
    return get_method(job.method).nonfinite_reaches_output and not job.row_steps


def check_inputs(job: MergeJob, unit: WorkUnit, raw: list[torch.Tensor], rows: list[torch.Tensor] | None = None,
                 warnings: list[str] | None = None) -> None:
    """Raise (``job.check_finite``) or add a warning for each source whose rows hold NaN/Inf
    (``rows``: the compute-dtype rows, made from ``raw`` when not given)."""
    t = job.tensors[unit.tensor]
    if rows is None:
        rows = compute_rows(job, unit, raw)
    for info, r, stored in zip(t.sources, rows, raw, strict=True):
        warning = _check_finite(r, stored, info, unit.row_start, unit.row_end, job.check_finite)
        if warning and warnings is not None:
            warnings.append(warning)


def merge_block(job: MergeJob, unit: WorkUnit, raw: list[torch.Tensor], reduced: Reductions | None,
                warnings: list[str] | None = None, scan_inputs: bool = True,
                held: dict[Any, Any] | None = None) -> torch.Tensor:
    """Merged rows of a unit from its raw rows, after the job's row steps, in the output dtype.
    ``scan_inputs=False``: the caller checks the inputs itself (:func:`output_scan_suffices`).
    ``held``: the tensor's scratch while its rows are held (``ShardContext.held``)."""
    t = job.tensors[unit.tensor]
    out_dtype = SAFETENSORS_TO_TORCH[t.out_dtype]
    if t.params is None:
        return raw[0].to(out_dtype)
    rows = compute_rows(job, unit, raw)
    # With rounds the inputs were scanned in round 0 (unit_partials), which read these rows already.
    if scan_inputs and not (job.check_finite and t.reduction_rounds):
        check_inputs(job, unit, raw, rows, warnings)
    base, experts = (rows[0], rows[1:]) if t.base is not None else (None, rows)
    ctx = shard_context(job, unit, rows, held)
    merged = get_method(job.method).merge(base, experts, t.params, ctx, reduced)
    if job.row_steps:  # in the compute dtype (passthrough may return its rows as read)
        base, merged = (None if base is None else in_compute(base, ctx)), in_compute(merged, ctx)
    for step in job.row_steps:
        merged = step.apply(unit.tensor, t.shape, unit.row_start, unit.row_end, base, merged)
    if not t.shape:
        merged = merged.reshape(())
    return merged.to(out_dtype)


def blocks(unit: WorkUnit, block_bytes: int) -> list[WorkUnit]:
    """Cut a unit into row blocks of at most ``block_bytes`` working memory (>= 1 row).

    Outputs are shard-invariant, so a worker may compute a unit in smaller row blocks: the
    unit is the scheduling granularity, the block the memory one (smaller buffers are reused
    by the allocator instead of being page-faulted in afresh, and stay in cache longer).
    """
    rows = unit.row_end - unit.row_start
    per_row = max(1, unit.working_bytes // max(1, rows))
    step = max(1, block_bytes // per_row)
    if step >= rows:
        return [unit]
    return [rows_part(unit, r0, min(unit.row_end, r0 + step)) for r0 in range(unit.row_start, unit.row_end, step)]


def rows_part(unit: WorkUnit, row_start: int, row_end: int) -> WorkUnit:
    """Rows ``[row_start, row_end)`` of ``unit``, its byte figures scaled to their share."""
    rows, n = unit.row_end - unit.row_start, row_end - row_start
    return WorkUnit(unit.tensor, row_start, row_end, unit.read_bytes * n // rows, unit.write_bytes * n // rows,
                    unit.working_bytes * n // rows)


def run_reduction_round(job: MergeJob, units: list[WorkUnit], round_: int,
                        previous: dict[int, Reductions]) -> ReductionResult:
    """One reduction round of a multi-phase method: the partials of canonical chunks, and what
    reading them cost."""
    retain_freed_memory()
    pin_versions(job.pins)
    started, fetched = time.perf_counter(), 0
    partials: list[tuple[int, int, Partials]] = []
    with PeakAnonRss() as memory:
        for unit in units:
            raw, fetched_now = read_counted(job, unit)
            fetched += fetched_now
            partials.append((unit.tensor, unit.row_start, unit_partials(job, unit, raw, round_, previous.get(unit.tensor))))
            del raw
    return ReductionResult(partials=partials, bytes_read=sum(u.read_bytes for u in units),
                           seconds=time.perf_counter() - started, peak_anon_rss=memory.peak,
                           start_anon_rss=memory.start, bytes_fetched=fetched)


def unit_partials(job: MergeJob, unit: WorkUnit, raw: list[torch.Tensor], round_: int,
                  previous: Reductions | None, held: dict[Any, Any] | None = None) -> Partials:
    """Round ``round_``'s partials of one canonical chunk from its raw rows; in round 0 a NaN or
    Inf in them fails the merge (unless allowed) before any output is written (see merge_block).

    The rows are scanned after the round unless its sums proved them finite
    (``Partials.inputs_finite``): a clean chunk, the common case, then costs no pass of its own
    (a round that fails on broken rows is scanned too, so the error names the input). Not for a
    method whose output shows every input NaN/Inf (:func:`output_scan_suffices`): its merge finds
    them in the output's scan, then names the input, and a clean merge saves a pass over every
    source (its rounds only make wrong statistics of a merge that then fails)."""
    t = job.tensors[unit.tensor]
    rows = compute_rows(job, unit, raw)
    scan = job.check_finite and round_ == 0 and not output_scan_suffices(job)

    def check() -> None:
        for info, r, stored in zip(t.sources, rows, raw, strict=True):
            _check_finite(r, stored, info, unit.row_start, unit.row_end, True)

    try:
        partials = chunk_partials(job, unit, rows, round_, previous, held)
    except Exception:
        if scan:
            check()
        raise
    if scan and not partials.inputs_finite:
        check()
    return partials


def compute_rows(job: MergeJob, unit: WorkUnit, raw: list[torch.Tensor]) -> list[torch.Tensor]:
    """A unit's raw rows as its method takes them: in the compute dtype, or, for a method that
    reads stored rows (``MergeMethod.reads_stored_rows``), bfloat16 rows as they are when it
    computes in float32 (its loops widen as they read: no cast pass; :func:`shard_context` tells
    the method)."""
    compute = _compute_dtype(job, unit)
    if (compute == torch.float32 and get_method(job.method).reads_stored_rows
            and all(r.dtype == torch.bfloat16 for r in raw)):
        return raw
    return [r.to(compute) for r in raw]


def _compute_dtype(job: MergeJob, unit: WorkUnit) -> torch.dtype:
    t = job.tensors[unit.tensor]
    return SAFETENSORS_TO_TORCH[t.compute_dtype or job.compute_dtype]


def shard_context(job: MergeJob, unit: WorkUnit, rows: list[torch.Tensor],
                  held: dict[Any, Any] | None = None) -> ShardContext:
    """The method's view of a unit: which tensor and rows, the compute dtype where the rows
    (from :func:`compute_rows`) are not in it, and the tensor's scratch while its rows are held."""
    t = job.tensors[unit.tensor]
    compute = _compute_dtype(job, unit)
    stored = any(r.dtype != compute for r in rows)
    return ShardContext(t.name, t.shape, unit.row_start, unit.row_end, job.seed,
                        tuple(range(len(rows) - (t.base is not None))), compute if stored else None, held)


def chunk_partials(job: MergeJob, unit: WorkUnit, rows: list[torch.Tensor], round_: int,
                   previous: Reductions | None, held: dict[Any, Any] | None = None) -> Partials:
    """Round ``round_``'s partials of one canonical chunk from its rows (:func:`compute_rows`)."""
    t = job.tensors[unit.tensor]
    base, experts = (rows[0], rows[1:]) if t.base is not None else (None, rows)
    return get_method(job.method).partial_reductions(base, experts, t.params, shard_context(job, unit, rows, held),
                                                     round_, previous)
