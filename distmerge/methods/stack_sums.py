"""torch's ``torch.stack(xs).sum(dim=0)`` for one shard of a whole tensor, as mergekit gets it.

Why: mergekit sums over the models with a stacked ``sum(dim=0)`` (the task-vector family's
mixed delta, its sign votes and divisor; SCE's). torch's CPU kernel (``cascade_sum`` in
ATen's ``SumKernel.cpp``) adds the models' values of one element in one of two orders, and
which one depends on where the element sits in the whole tensor:

* elements in whole groups of four vectors (``multi_row_sum``): a running sum from +0.0 over
  the models, carried into level accumulators every 16 models (so left to right up to 17);
* the elements after the last whole group (``row_sum``): four running sums over the models
  taken by quads (model 4i + k into sum k), the leftover models into the first, then the
  other three into it. Up to four models that is left to right too; from five it is not.

Level 0 takes its ``2 ** max(4, ceil_log2(n) // 4)`` values one by one; after each such group
it is added into level 1 and cleared, and whenever the count so far is a multiple of
``step ** j`` level j is carried into level j + 1 the same way; at the end level 0 += level 1,
+= level 2, += level 3 (:class:`CascadeSum`; :class:`RowSum` runs four of them). Accumulators
are float32 for float32, bfloat16 and float16, float64 for float64.

distmerge merges row shards, and a stacked sum of a shard would put the tail at the end of
the shard, so callers pass where their shard starts in the whole tensor (:func:`stack_sum`),
and the fused kernels apply the same rule (:mod:`.kernels.stack_order`) from
:func:`tail_start`. Which elements form the tail depends on the width of torch's vectors,
found by probing torch once (:func:`vector_lanes`). The vocabulary's padding mean
(``vocab.cascade.StreamingMean``, ``torch.mean(rows, dim=0)`` over many rows fed in chunks)
streams the same two orders.

Threads: torch splits the columns between threads at multiples of 128 bytes. On 256-bit
vectors (AVX2) those are whole groups, so the result does not depend on the thread count;
with wider vectors it can, and this reproduces one thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch

from distmerge.methods.kernels.stack_order import LEFT_TO_RIGHT_MAX, QUAD
from distmerge.methods.kernels.sum_orders import ceil_log2
from distmerge.torch_threads import torch_threads

log = logging.getLogger(__name__)

LEVELS = 4  # multi_row_sum's num_levels


def _group(dtype: torch.dtype, lanes: int) -> int:
    """Elements per main-loop group (four vectors of the accumulator) with ``lanes``-wide float32 vectors."""
    return QUAD * (lanes // 2 if dtype == torch.float64 else lanes)


def _load_lanes(dtype: torch.dtype, lanes: int) -> int:
    """Elements in one of torch's vectors of ``dtype`` when a float32 vector holds ``lanes``."""
    return {torch.float64: lanes // 2, torch.float32: lanes}.get(dtype, 2 * lanes)


def tail_start_for(numel: int, dtype: torch.dtype, lanes: int) -> int:
    """The flat index from which torch sums a stack of ``numel``-element ``dtype`` tensors in
    ``row_sum``'s order, with ``lanes``-wide float32 vectors (0: every element left to right)."""
    if lanes == 0:
        return numel
    if numel < _load_lanes(dtype, lanes):  # scalar_outer_sum: whole quads of columns, then the rest
        return QUAD * (numel // QUAD)
    group = _group(dtype, lanes)
    return group * (numel // group)


def loops_follow(numel: int, models: int) -> bool:
    """Whether the fused loops (:mod:`.kernels.stack_order`) give torch's stacked sum: always,
    except a one-element tensor's sum over five models or more, which torch takes as one
    contiguous vector by another kernel (its own order, which :func:`stack_sum` leaves to torch)."""
    return numel > 1 or models <= QUAD


def tail_start(numel: int, dtype: torch.dtype) -> int:
    """:func:`tail_start_for` with this machine's torch vectors."""
    return tail_start_for(numel, dtype, vector_lanes())


def tail_offset(numel: int, start: int, dtype: torch.dtype) -> int:
    """Where the tail starts in a shard that begins at flat index ``start`` of a ``numel``-element
    tensor, as the fused loops take it (negative: before the shard; past its end: beyond it)."""
    return tail_start(numel, dtype) - start


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CascadeSum:
    """Sum of ``n`` rows (known in advance), fed in order in chunks of any size."""

    def __init__(self, n: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.n = n
        self.dtype = dtype
        self.acc_dtype = accumulator_dtype(dtype)
        self.power = max(4, ceil_log2(n) // LEVELS)
        self.step = 1 << self.power
        self.mask = self.step - 1
        self.acc = [torch.zeros(row_shape, dtype=self.acc_dtype) for _ in range(LEVELS)]
        self.seen = 0
        self.full_end = (n // self.step) * self.step  # rows before this go through the levels

    def add(self, rows: torch.Tensor) -> None:
        """Add the next ``len(rows)`` rows (in order). Level 0 takes a group's rows with
        ``numpy.add.accumulate`` (one IEEE addition after another, like torch's loop)."""
        if self.seen + rows.shape[0] > self.n:
            raise ValueError(f"more than the {self.n} rows announced")
        x = rows.to(self.acc_dtype).numpy()
        acc, level0 = self.acc, self.acc[0].numpy()
        i, k = 0, x.shape[0]
        while i < k:
            take = min(self.step - self.seen % self.step, k - i) if self.seen < self.full_end else k - i
            chain = np.concatenate([level0[None], x[i:i + take]])
            np.add.accumulate(chain, axis=0, out=chain)
            level0[...] = chain[-1]
            i += take
            self.seen += take
            if self.seen <= self.full_end and self.seen % self.step == 0:
                for j in range(1, LEVELS):
                    acc[j] += acc[j - 1]
                    acc[j - 1].zero_()
                    if self.seen & (self.mask << (j * self.power)):
                        break

    def total(self) -> torch.Tensor:
        if self.seen != self.n:
            raise ValueError(f"{self.seen} of {self.n} rows added")
        out = self.acc[0].clone()
        for j in range(1, LEVELS):
            out += self.acc[j]
        return out

    def mean(self) -> torch.Tensor:
        """``torch.mean(rows, dim=0)`` of all the rows, in the input dtype."""
        return self.total().div_(self.n).to(self.dtype)


class RowSum:
    """torch's ``row_sum``: four interleaved cascades over n // 4 rows, then the tail."""

    def __init__(self, n: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.n, self.quarter = n, n // 4
        self.parts = [CascadeSum(self.quarter, row_shape, dtype) for _ in range(4)]
        self.tail: torch.Tensor | None = None if self.quarter else torch.zeros(row_shape, dtype=accumulator_dtype(dtype))
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.parts[0].acc_dtype)
        split = max(0, min(rows.shape[0], 4 * self.quarter - self.seen))
        for r in range(4):  # rows of global index = r (mod 4), before the tail
            first = (r - self.seen) % 4
            if first < split:
                self.parts[r].add(rows[first:split:4])
        if split < rows.shape[0]:
            if self.tail is None:
                self.tail = self.parts[0].total()
            for row in rows[split:]:
                self.tail += row
        self.seen += rows.shape[0]

    def total(self) -> torch.Tensor:
        out = self.tail if self.tail is not None else self.parts[0].total()
        for part in self.parts[1:]:
            out = out + part.total() if self.quarter else out + part.acc[0]
        return out


def stack_sum_for(tensors: Sequence[torch.Tensor], start: int, numel: int, lanes: int) -> torch.Tensor:
    """:func:`stack_sum` with ``lanes``-wide float32 vectors."""
    if numel == 1:  # a lone element: torch sums it as one contiguous vector, wherever it is
        return torch.stack(list(tensors)).sum(dim=0)
    return _accumulated(tensors, start, numel, lanes).to(tensors[0].dtype).reshape(tensors[0].shape)


def _accumulated(tensors: Sequence[torch.Tensor], start: int, numel: int, lanes: int) -> torch.Tensor:
    """The stacked sum, flat, in the accumulator dtype (not yet rounded to the tensors')."""
    dtype = tensors[0].dtype
    n = len(tensors)
    rows = [t.reshape(-1) for t in tensors]
    size = rows[0].numel()
    if n <= LEFT_TO_RIGHT_MAX:  # multi_row_sum's order: one accumulator, no copy of the stack
        out = torch.zeros(size, dtype=accumulator_dtype(dtype))
        for row in rows:
            out.add_(row)
    else:
        head = CascadeSum(n, (size,), dtype)
        for row in rows:
            head.add(row.unsqueeze(0))
        out = head.total()
    tail = max(tail_start_for(numel, dtype, lanes) - start, 0)
    if n > QUAD and tail < size:  # fewer than one group of vectors
        rest = RowSum(n, (size - tail,), dtype)
        rest.add(torch.stack([row[tail:] for row in rows]))
        out[tail:] = rest.total()
    return out


def stack_sum(tensors: Sequence[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """``torch.stack(tensors).sum(dim=0)`` of the whole tensors, for the shard of them given:
    equal-shaped ``tensors`` holding the elements from flat index ``start`` of tensors of
    ``numel`` elements. bfloat16/float16 accumulate in float32, rounded once, as torch does."""
    return stack_sum_for(tensors, start, numel, vector_lanes())


def stack_mean(tensors: Sequence[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """``torch.stack(tensors).mean(dim=0)`` of the whole tensors, for this shard of them (as
    :func:`stack_sum`): torch divides the unrounded sum by the count in the accumulator dtype,
    then rounds once."""
    if numel == 1:
        return torch.stack(list(tensors)).mean(dim=0)
    total = _accumulated(tensors, start, numel, vector_lanes())
    return (total / len(tensors)).to(tensors[0].dtype).reshape(tensors[0].shape)


def spread_values(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """float64 values of exponents spread over 2**-12..2**12: their sums round in every dtype,
    so a different order of additions shows."""
    return torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-12, 13, shape, generator=g).double())


def group_width(dtype: torch.dtype) -> int | None:
    """Columns per main-loop group of torch's dim-0 sum of ``dtype`` (4 SIMD vectors of its
    accumulator), None where :func:`vector_lanes` found no width."""
    lanes = vector_lanes()
    return _group(dtype, lanes) if lanes else None


@cache
def vector_lanes() -> int:
    """The float32 vector width (8, 16 or 4) with which :func:`stack_sum_for` equals torch's
    one-thread stacked sum on this machine and torch build; 0 when none does (then every
    element is summed left to right, which differs from torch's tails from five models on)."""
    g = torch.Generator().manual_seed(0)
    cases = [(dtype, n, numel) for dtype in (torch.float32, torch.bfloat16, torch.float64)
             for n in (5, 6, 9, 19) for numel in (3, 7, 13, 30, 100, 150)]
    probes = []
    for dtype, n, numel in cases:
        probes.append(([spread_values((numel,), g).to(dtype) for _ in range(n)], numel))
    with torch_threads(1):
        wanted = [torch.stack(xs).sum(dim=0) for xs, _ in probes]
    for lanes in (8, 16, 4):
        if all(torch.equal(stack_sum_for(xs, 0, numel, lanes), w) for (xs, numel), w in zip(probes, wanted, strict=True)):
            return lanes
    log.warning("torch's stacked sums follow no known vector width here: sums over five or more models are "
                "taken left to right, and may differ from mergekit's in the last bit")
    return 0
