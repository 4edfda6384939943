"""What a worker does with a batch of units: read rows, merge, relax (AIM), write at offsets.

Plain functions, no Ray: the Ray tasks in :mod:`distmerge.engine.tasks` call them, and tests
call them directly. A batch touches only its units' rows of each input and output.
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from distmerge.checkpoint import TensorInfo, read_rows
from distmerge.dtypes import ITEMSIZE, SAFETENSORS_TO_TORCH
from distmerge.engine.memory import PeakAnonRss
from distmerge.errors import CheckpointError
from distmerge.methods import get_method
from distmerge.methods.base import ShardContext
from distmerge.plan import TensorPlan, WorkUnit
from distmerge.writer import write_at


@dataclass(frozen=True)
class MergeJob:
    """Everything a worker needs, shipped once per merge through the object store."""

    method: str
    tensors: tuple[TensorPlan, ...]
    out_paths: tuple[str, ...]
    compute_dtype: str
    seed: int
    check_finite: bool = True
    aim_omega: float | None = None
    aim_factors: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class UnitResult:
    tensor: int
    row_start: int
    row_end: int
    crc32: int
    nbytes: int


@dataclass
class BatchResult:
    """What a batch did and where: for progress, the journal and the report."""

    units: list[UnitResult]
    bytes_read: int
    bytes_written: int
    seconds: float
    node: str
    pid: int
    peak_anon_rss: int
    start_anon_rss: int


def _read(info: TensorInfo, r0: int, r1: int, dtype: torch.dtype, check_finite: bool) -> torch.Tensor:
    rows = read_rows(info, r0, r1)
    if check_finite and rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
        bad = int((~torch.isfinite(rows)).sum())
        raise CheckpointError(
            f"{info.file}: tensor {info.name!r} has {bad} NaN/Inf values in rows {r0}:{r1}; "
            "the input is broken (set execution.allow_nonfinite: true to merge anyway)"
        )
    return rows.to(dtype)


def merge_unit(job: MergeJob, unit: WorkUnit, stats: dict[str, Any] | None) -> torch.Tensor:
    """The merged (and relaxed) rows of one unit, in the tensor's output dtype."""
    t = job.tensors[unit.tensor]
    out_dtype = SAFETENSORS_TO_TORCH[t.out_dtype]
    if t.params is None:
        return read_rows(t.experts[0], unit.row_start, unit.row_end).to(out_dtype)
    compute = SAFETENSORS_TO_TORCH[job.compute_dtype]
    base = _read(t.base, unit.row_start, unit.row_end, compute, job.check_finite) if t.base is not None else None
    experts = [_read(e, unit.row_start, unit.row_end, compute, job.check_finite) for e in t.experts]
    ctx = ShardContext(t.name, t.shape, unit.row_start, unit.row_end, job.seed, tuple(range(len(experts))))
    merged = get_method(job.method).merge(base, experts, t.params, ctx, stats)
    factors = job.aim_factors.get(unit.tensor)
    if factors is not None and job.aim_omega is not None and base is not None:
        from distmerge.aim import apply_relaxation, shard_factors

        merged = apply_relaxation(base, merged, shard_factors(factors, t.shape, unit.row_start, unit.row_end),
                                  job.aim_omega)
    if not t.shape:
        merged = merged.reshape(())
    return merged.to(out_dtype)


def run_batch(job: MergeJob, units: list[WorkUnit], stats: dict[int, dict[str, Any]]) -> BatchResult:
    """Merge and write a batch of units; returns checksums and I/O and memory figures."""
    started = time.perf_counter()
    results, read, written = [], 0, 0
    with PeakAnonRss() as memory:
        for unit in units:
            t = job.tensors[unit.tensor]
            out = merge_unit(job, unit, stats.get(unit.tensor))
            offset = t.out_offset + unit.row_start * t.row_numel * ITEMSIZE[t.out_dtype]
            n = write_at(job.out_paths[t.file_index], offset, out)
            crc = zlib.crc32(out.contiguous().reshape(-1).view(torch.uint8).numpy())
            del out
            results.append(UnitResult(unit.tensor, unit.row_start, unit.row_end, crc, n))
            read += unit.read_bytes
            written += n
    return BatchResult(results, read, written, time.perf_counter() - started, socket.gethostname(),
                       os.getpid(), memory.peak, memory.start)


def run_statistics(job: MergeJob, units: list[WorkUnit]) -> list[tuple[int, int, dict[str, torch.Tensor]]]:
    """Phase one of a two-phase method: partial statistics of canonical chunks."""
    method = get_method(job.method)
    compute = SAFETENSORS_TO_TORCH[job.compute_dtype]
    out = []
    for unit in units:
        t = job.tensors[unit.tensor]
        base = _read(t.base, unit.row_start, unit.row_end, compute, job.check_finite) if t.base is not None else None
        experts = [_read(e, unit.row_start, unit.row_end, compute, job.check_finite) for e in t.experts]
        ctx = ShardContext(t.name, t.shape, unit.row_start, unit.row_end, job.seed, tuple(range(len(experts))))
        out.append((unit.tensor, unit.row_start, method.statistics(base, experts, t.params, ctx)))
    return out
