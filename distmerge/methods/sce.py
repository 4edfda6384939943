"""SCE (Select, Calculate, Erase; arXiv 2408.07990), mergekit 0.1.5's ``sce``.

    tv_i = x_i - base
    select (select_topk < 1): v = var_i(tv_i) per element (population variance, compute dtype);
        k = int(count_nonzero(v) * select_topk); keep the k elements torch.topk(|v|, k) picks
        from the whole tensor (none when k = 0); tv_i *= keep
    calculate: w_i = mean(tv_i^2) over the whole tensor; w = w / sum(w)  (1/N each when |sum| < 1e-6)
    erase: TIES sign consensus, m_i = [sign(tv_i) == sign(sum_i tv_i)]  (ties to +, a zero never matches)
    out = base + sum_i(tv_i w_i m_i) / max(sum_i(w_i m_i), 1e-6)

Whole-tensor quantities, in reduction rounds over canonical chunks. With selection, a tensor
of at most ``TOPK_GATHER_MAX_ELEMENTS`` elements gathers its |variance| in round 0 (chunks in
row order) and the driver runs mergekit's ``torch.topk`` selection on it once
(:class:`kernels.PackedMagnitudes`, torch's algorithm on packed float32 keys): that gives the
count of nonzero variances (so k), the k-th largest variance key, and which of the elements
tied at it are among the k (that choice depends on the whole array, and it moves the weights,
so no cheaper tie rule gives mergekit's output); round 1 is skipped. A larger tensor keeps its
memory bounded: round 0 counts the nonzero variances (exact) and histograms the high 16 bits of
the variances' float32 bit patterns, round 1 finds the exact k-th largest from the low 16 bits
inside the located bucket (``selection``'s radix selection, the same as TIES's threshold), and
every element tied at it is kept. The last round sums the kept task vectors' squares in
float64 (rounded once to the compute dtype, as mergekit's mean returns). Without selection only
that last round runs. Everything elementwise is mergekit's torch expression in the compute
dtype; in float32 compute the rounds and the merge run as fused loops over the rows as stored
(:mod:`.kernels.sce_loops`, the same floats).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch

from distmerge.methods import kernels, scalars, stack_sums
from distmerge.methods.base import (
    MergeMethod,
    ParamSpec,
    Partials,
    Reductions,
    ShardContext,
    TensorParams,
    compute_dtype,
    rows_in_compute,
    unit_interval,
)
from distmerge.methods.kernels import sce_loops
from distmerge.methods.selection import (
    HIGH_BINS,
    dense_low,
    dense_to_sparse,
    locate,
    magnitude_keys,
    sum_histograms,
)
from distmerge.methods.sparsification.base import numel

NONE_KEPT = 0x7FFFFFFF  # a threshold key above every finite variance: keep nothing
# The largest tensor whose variances the driver gathers to select as torch.topk does: 2^26
# elements are 256 MB of float32 variances plus 512 MB of packed keys. A larger tensor keeps
# every element tied at the threshold (more than k by the ties; the same for any sharding, and
# memory stays bounded by the shard size): docs/methods.md, difference 12.
TOPK_GATHER_MAX_ELEMENTS = 1 << 26
LOW_ROUND = 1  # with selection, above TOPK_GATHER_MAX_ELEMENTS: the low 16 bits of the k-th key


@dataclass
class ScePartials(Partials):
    values: torch.Tensor | None = None  # round 0 of a gathered tensor: the chunk's |variance|, flat
    nonzero: int = 0  # round 0 of a larger tensor: nonzero variance keys,
    high: torch.Tensor | None = None  # and the high-bits histogram of the variance keys
    low: tuple[torch.Tensor, torch.Tensor] | None = None  # round 1: low bits in the bucket, counts
    squares: tuple[float, ...] = ()  # last round: float64 sums of the kept tv_i^2
    dtype: torch.dtype = torch.float32


@dataclass(kw_only=True)
class SceReductions(Reductions):
    bucket: tuple[int, int] | None = None  # (bucket, rank left inside it) after round 0 of a larger tensor
    threshold: int | None = None  # variance key of the k-th largest (None: no selection)
    k: int = 0
    tie_kept: torch.Tensor | None = None  # sorted flat indices of the kept ties (None: every tie kept)
    weights: torch.Tensor | None = None  # [N], compute dtype, normalized


class Sce(MergeMethod):
    name = "sce"
    uses_base = True
    reads_stored_rows = True
    min_experts = 1
    global_parameters = {
        "select_topk": ParamSpec(1.0, check=unit_interval(allow_zero=True)[0], allowed=unit_interval(True)[1]),
        "int8_mask": ParamSpec(False, bool),
    }
    model_parameters = {}

    @staticmethod
    def _selects(params: TensorParams) -> bool:
        return 0.0 < params.global_["select_topk"] < 1.0

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        return 3 if self._selects(params) else 1

    @staticmethod
    def _gathers(count: int) -> bool:
        """Whether a selecting tensor of ``count`` elements gathers its variances in round 0."""
        return count <= TOPK_GATHER_MAX_ELEMENTS

    @staticmethod
    def _task_vectors(base, experts):
        return torch.stack([x - base for x in experts], dim=0)

    def _keep_rule(self, params: TensorParams, red: SceReductions | None, ctx: ShardContext,
                   count: int) -> tuple[int, np.ndarray]:
        """The kernels' form of :meth:`_kept`'s selection for ``count`` elements from
        ``ctx.element_start``: the threshold key, and which ties are kept (empty: every one)."""
        density = params.global_["select_topk"]
        if density >= 1:
            return sce_loops.KEEP_ALL, np.zeros(0, dtype=np.bool_)
        if density <= 0:
            return sce_loops.KEEP_NONE, np.zeros(0, dtype=np.bool_)
        assert red is not None and red.threshold is not None
        if red.tie_kept is None:
            return red.threshold, np.zeros(0, dtype=np.bool_)
        return red.threshold, self._tied_here(red.tie_kept, ctx, torch.Size([count])).numpy()

    def _kept(self, tvs: torch.Tensor, params: TensorParams, red: SceReductions | None,
              ctx: ShardContext) -> torch.Tensor:
        """The task vectors after selection (mergekit's ``tvs * mask``, mask in the compute dtype)."""
        density = params.global_["select_topk"]
        if density >= 1:
            return tvs * torch.ones_like(tvs[0]).unsqueeze(0)
        if density <= 0:
            return tvs * torch.zeros_like(tvs[0]).unsqueeze(0)
        assert red is not None and red.threshold is not None
        var = kernels.variance_across(tvs)
        keys = magnitude_keys(var)
        keep = keys >= red.threshold
        if red.tie_kept is not None:
            keep = (keys > red.threshold) | ((keys == red.threshold) & self._tied_here(red.tie_kept, ctx, keys.shape))
        return tvs * keep.reshape(var.shape).to(tvs.dtype).unsqueeze(0)

    @staticmethod
    def _tied_here(tie_kept: torch.Tensor, ctx: ShardContext, shape: torch.Size) -> torch.Tensor:
        """Which elements of this block are among the kept ties: the block's slice of the sorted
        flat indices, found by binary search (a membership test against all of them per block
        cost time proportional to the tensor's ties for every block)."""
        count = shape.numel()
        span = torch.searchsorted(tie_kept, torch.tensor([ctx.element_start, ctx.element_start + count],
                                                         dtype=tie_kept.dtype))
        here = torch.zeros(count, dtype=torch.bool)
        here[tie_kept[int(span[0]):int(span[1])] - ctx.element_start] = True
        return here.reshape(shape)

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> ScePartials:
        assert base is not None
        red = cast(SceReductions | None, previous)
        if _fused(base, experts, ctx):
            return self._fused_partials(base, experts, params, ctx, round_, red)
        base, experts = rows_in_compute(base, experts, ctx)
        tvs = self._task_vectors(base, experts)
        last = self.reduction_rounds(params) - 1
        if round_ < last:
            var = kernels.variance_across(tvs)
            if round_ == 0 and self._gathers(ctx.tensor_numel):
                return ScePartials(values=var.abs().reshape(-1), dtype=tvs.dtype)
            keys = magnitude_keys(var)
            if round_ == 0:
                return ScePartials(nonzero=int(torch.count_nonzero(keys)), dtype=tvs.dtype,
                                   high=torch.bincount(keys >> 16, minlength=HIGH_BINS))
            assert red is not None
            if red.bucket is None:
                return ScePartials(dtype=tvs.dtype)
            inside = keys[(keys >> 16) == red.bucket[0]] & 0xFFFF
            return ScePartials(low=torch.unique(inside, return_counts=True), dtype=tvs.dtype)
        kept = self._kept(tvs, params, red, ctx)
        return ScePartials(squares=tuple(scalars.total(t.square()) for t in kept), dtype=tvs.dtype)

    def _fused_partials(self, base: torch.Tensor, experts: Sequence[torch.Tensor], params: TensorParams,
                        ctx: ShardContext, round_: int, red: SceReductions | None) -> ScePartials:
        """:meth:`partial_reductions` in float32 compute, by the fused loops."""
        b, *xs = kernels.value_arrays([base, *experts], torch.float32)
        last = self.reduction_rounds(params) - 1
        if round_ == last:
            threshold, tied = self._keep_rule(params, red, ctx, b.size)
            sums = sce_loops.sce_square_sums(b, xs, threshold, tied)
            return ScePartials(squares=tuple(float(v) for v in sums), dtype=torch.float32)
        if round_ == 0 and self._gathers(ctx.tensor_numel):
            values = sce_loops.sce_counts(b, xs, sce_loops.MAGNITUDES)[1]
            return ScePartials(values=torch.from_numpy(values), dtype=torch.float32)
        if round_ == 0:
            nonzero, high = sce_loops.sce_counts(b, xs, sce_loops.HISTOGRAM)  # keys < 2**31: HIGH_BINS
            return ScePartials(nonzero=nonzero, dtype=torch.float32, high=torch.from_numpy(high[:HIGH_BINS]))
        assert red is not None
        if red.bucket is None:
            return ScePartials(dtype=torch.float32)
        low = sce_loops.sce_counts(b, xs, sce_loops.LOW_BITS, red.bucket[0])[1]
        return ScePartials(low=dense_to_sparse(low), dtype=torch.float32)

    def reduce(self, partials: Sequence[Partials], params: TensorParams, shape: tuple[int, ...],
               round_: int, previous: Reductions | None) -> SceReductions:
        chunks = cast(Sequence[ScePartials], partials)
        out = SceReductions() if previous is None else replace(cast(SceReductions, previous))
        last = self.reduction_rounds(params) - 1
        if round_ == last:
            count = numel(shape)
            dtype = chunks[0].dtype
            n = len(chunks[0].squares)
            sums = [sum(c.squares[i] for c in chunks) for i in range(n)]  # left to right, chunk order
            weights = torch.stack([scalars.as_dtype(s / count, dtype) for s in sums])
            weight_sum = torch.sum(weights).item()
            out.weights = torch.ones_like(weights) / n if abs(weight_sum) < 1e-6 else weights / weight_sum
        elif round_ == 0 and self._gathers(numel(shape)):
            self._select(chunks, params, out)
            out.round_rows = {LOW_ROUND: ()}  # the selection is complete: round 1 reads nothing
        elif round_ == 0:
            if self._set_k(out, sum(c.nonzero for c in chunks), params):
                out.bucket = locate(sum_histograms([c.high for c in chunks]), out.k)
        elif out.bucket is not None:  # round 1 of a larger tensor
            histogram = dense_low([c.low for c in chunks if c.low is not None])
            low, _ = locate(histogram, out.bucket[1])
            out.threshold = (out.bucket[0] << 16) | low
        return out

    @staticmethod
    def _set_k(out: SceReductions, nonzero: int, params: TensorParams) -> bool:
        """Set how many elements the selection keeps, and whether it keeps any (at k = 0 the
        threshold is ``NONE_KEPT`` and nothing is left to select). mergekit multiplies the 0-dim
        int64 count of nonzero variances by the float, a float32 product (which stays within
        the count: no ``select_topk`` below 1 rounded it past counts up to 2^26)."""
        out.k = int(torch.tensor(nonzero) * params.global_["select_topk"])
        if out.k == 0:
            out.threshold = NONE_KEPT
        return out.k > 0

    def _select(self, chunks: Sequence[ScePartials], params: TensorParams, out: SceReductions) -> None:
        """k, the threshold and the kept ties of a gathered tensor, from its chunks' |variance|.

        ``torch.topk``'s choice among equal values follows from the whole array (libstdc++'s
        selection on CPU), so the same selection runs on the chunks' variances in row order
        (:class:`kernels.PackedMagnitudes`, torch's algorithm on packed float32 keys, ~3x faster
        than it, packing each chunk where it lies rather than joining them first); it also
        gives the k-th largest key. Variances of float64 compute would lose their order as
        float32 keys, and a torch built on another C++ library selects otherwise
        (``topk_select.agrees_with_torch``): torch.topk itself chooses there (unsorted: the
        same set, see ``kernels.topk_select``)."""
        parts = [c.values for c in chunks if c.values is not None]
        if parts[0].dtype != torch.float64 and kernels.topk_select.agrees_with_torch():  # bf16/fp16 widen exactly
            packed = kernels.PackedMagnitudes([p.to(torch.float32).numpy() for p in parts])
            if not self._set_k(out, packed.nonzero, params):
                return
            out.threshold, tied = packed.top(out.k)
            out.tie_kept = None if tied is None else torch.from_numpy(tied)
            return
        flat = torch.cat(parts)
        keys = magnitude_keys(flat).to(torch.int64)
        if not self._set_k(out, int(torch.count_nonzero(keys)), params):
            return
        out.threshold = int(torch.kthvalue(keys, keys.numel() - out.k + 1).values)  # the k-th largest
        if int((keys >= out.threshold).sum()) > out.k:  # only some of the tied are among the k
            indices = torch.topk(flat, k=out.k, largest=True, sorted=False).indices
            out.tie_kept = torch.sort(indices[keys[indices] == out.threshold]).values

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        assert base is not None and isinstance(reduced, SceReductions) and reduced.weights is not None
        if _fused(base, experts, ctx):
            b, *xs = kernels.value_arrays([base, *experts], torch.float32)
            threshold, tied = self._keep_rule(params, reduced, ctx, b.size)
            weights = reduced.weights.to(torch.float32).numpy()
            tail = stack_sums.tail_offset(ctx.tensor_numel, ctx.element_start, torch.float32)
            return torch.from_numpy(sce_loops.sce_merge(b, xs, threshold, tied, weights, tail)).reshape(base.shape)
        base, experts = rows_in_compute(base, experts, ctx)
        tvs = self._kept(self._task_vectors(base, experts), params, reduced, ctx)
        sign = tvs.sign()
        majority = (self._sum(tvs, ctx) >= 0).to(tvs.dtype) * 2 - 1
        erase_mask = sign == majority
        tv_weights = reduced.weights.to(tvs.dtype)
        while tv_weights.dim() < tvs.dim():
            tv_weights = tv_weights.unsqueeze(-1)
        erased = tv_weights * erase_mask
        merged = self._sum(tvs * erased, ctx)
        return base + merged / self._sum(erased.expand_as(tvs), ctx).clamp(min=1e-6)

    @staticmethod
    def _sum(stacked: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        """mergekit's ``sum(dim=0)`` of the stack over the whole tensor, for this shard."""
        return stack_sums.stack_sum(list(stacked), ctx.element_start, ctx.tensor_numel)


def _fused(base: torch.Tensor, experts: Sequence[torch.Tensor], ctx: ShardContext) -> bool:
    """Whether this shard runs the fused loops: float32 compute, where they follow torch's
    stacked sums (``stack_sums.loops_follow``)."""
    return compute_dtype(base, ctx) == torch.float32 and stack_sums.loops_follow(ctx.tensor_numel, len(experts))
