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

distmerge merges row shards, and a stacked sum of a shard would put the tail at the end of
the shard, so callers pass where their shard starts in the whole tensor (:func:`stack_sum`),
and the fused kernels apply the same rule (:mod:`.kernels.stack_order`) from
:func:`tail_start`. Which elements form the tail depends on the width of torch's vectors,
found by probing torch once (:func:`vector_lanes`).

Threads: torch splits the columns between threads at multiples of 128 bytes. On 256-bit
vectors (AVX2) those are whole groups, so the result does not depend on the thread count;
with wider vectors it can, and this reproduces one thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache

import torch

log = logging.getLogger(__name__)

_QUAD = 4  # row_sum's accumulators (ATen's ilp_factor) and the vectors in a group (nrows)
_LEVELS = 4  # multi_row_sum's num_levels


def _load_lanes(dtype: torch.dtype, lanes: int) -> int:
    """Elements in one of torch's vectors of ``dtype`` when a float32 vector holds ``lanes``."""
    return {torch.float64: lanes // 2, torch.float32: lanes}.get(dtype, 2 * lanes)


def tail_start_for(numel: int, dtype: torch.dtype, lanes: int) -> int:
    """The flat index from which torch sums a stack of ``numel``-element ``dtype`` tensors in
    ``row_sum``'s order, with ``lanes``-wide float32 vectors (0: every element left to right)."""
    if lanes == 0:
        return numel
    if numel < _load_lanes(dtype, lanes):  # scalar_outer_sum: whole quads of columns, then the rest
        return _QUAD * (numel // _QUAD)
    group = _QUAD * (lanes // 2 if dtype == torch.float64 else lanes)
    return group * (numel // group)


def loops_follow(numel: int, models: int) -> bool:
    """Whether the fused loops (:mod:`.kernels.stack_order`) give torch's stacked sum: always,
    except a one-element tensor's sum over five models or more, which torch takes as one
    contiguous vector by another kernel (its own order, which :func:`stack_sum` leaves to torch)."""
    return numel > 1 or models <= _QUAD


def tail_start(numel: int, dtype: torch.dtype) -> int:
    """:func:`tail_start_for` with this machine's torch vectors."""
    return tail_start_for(numel, dtype, vector_lanes())


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _cascade(terms: Sequence[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    """``multi_row_sum`` over ``terms``, from +0.0."""
    count = len(terms)
    power = max(4, _ceil_log2(count) // _LEVELS)
    step = 1 << power
    mask = step - 1
    acc = [zero] * _LEVELS
    i = 0
    while i + step <= count:
        for _ in range(step):
            acc[0] = acc[0] + terms[i]
            i += 1
        for level in range(1, _LEVELS):
            acc[level] = acc[level] + acc[level - 1]
            acc[level - 1] = zero
            if i & (mask << (level * power)):
                break
    while i < count:
        acc[0] = acc[0] + terms[i]
        i += 1
    for level in range(1, _LEVELS):
        acc[0] = acc[0] + acc[level]
    return acc[0]


def _row_sum(terms: Sequence[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    """``row_sum`` over ``terms``: quads into four sums, the rest into the first, then the others."""
    quads = len(terms) // _QUAD
    partial = [_cascade([terms[_QUAD * i + k] for i in range(quads)], zero) for k in range(_QUAD)]
    first = partial[0]
    for t in terms[_QUAD * quads:]:
        first = first + t
    for k in range(1, _QUAD):
        first = first + partial[k]
    return first


def stack_sum_for(tensors: Sequence[torch.Tensor], start: int, numel: int, lanes: int) -> torch.Tensor:
    """:func:`stack_sum` with ``lanes``-wide float32 vectors."""
    dtype = tensors[0].dtype
    if numel == 1:  # a lone element: torch sums it as one contiguous vector, wherever it is
        return torch.stack(list(tensors)).sum(dim=0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    terms = [t.reshape(-1).to(acc) for t in tensors]
    zero = torch.zeros_like(terms[0])
    out = zero + _cascade(terms, zero)
    tail = max(tail_start_for(numel, dtype, lanes) - start, 0)
    if len(terms) > _QUAD and tail < out.numel():
        out[tail:] = zero[tail:] + _row_sum([t[tail:] for t in terms], zero[tail:])
    return out.to(dtype).reshape(tensors[0].shape)


def stack_sum(tensors: Sequence[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """``torch.stack(tensors).sum(dim=0)`` of the whole tensors, for the shard of them given:
    equal-shaped ``tensors`` holding the elements from flat index ``start`` of tensors of
    ``numel`` elements. bfloat16/float16 accumulate in float32, rounded once, as torch does."""
    return stack_sum_for(tensors, start, numel, vector_lanes())


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
        xs = [(torch.randn(numel, generator=g, dtype=torch.float64)
               * torch.exp(3 * torch.randn(numel, generator=g, dtype=torch.float64))).to(dtype) for _ in range(n)]
        probes.append((xs, numel))
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wanted = [torch.stack(xs).sum(dim=0) for xs, _ in probes]
    finally:
        torch.set_num_threads(saved)
    for lanes in (8, 16, 4):
        if all(torch.equal(stack_sum_for(xs, 0, numel, lanes), w) for (xs, numel), w in zip(probes, wanted, strict=True)):
            return lanes
    log.warning("torch's stacked sums follow no known vector width here: sums over five or more models are "
                "taken left to right, and may differ from mergekit's in the last bit")
    return 0
