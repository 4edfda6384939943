"""Arcee Fusion: take the other model's value only where its change is important (mergekit 0.1.5).

    p = softmax(x) + 1e-8, q = softmax(base) + 1e-8 along the last dim;  kl = sum p log(p / q)
    importance = |x - base| * kl                 (kl per last-dim vector, broadcast along it)
    threshold = Q2 + 1.5 (Q3 - Q1)   (quartiles of the importance: the sorted values at
                                      int(q * (n - 1)), q = 0.25, 0.5, 0.75 as float32)
    out = base + (x - base) * [importance >= threshold]

The quartiles are exact order statistics of the whole tensor, by radix selection over the
importances' float32 bit patterns mapped to order-preserving unsigned keys (high 16 bits in one
reduction round, low 16 bits inside the located buckets in the next, ``selection.locate``).
Above 1,000,000 elements mergekit takes the quartiles of a sample of 1,000,000 elements drawn
with replacement (torch.randint, unseeded); distmerge draws that sample from its counter-based
stream (draw j picks element floor(u_j * numel)), so the chunks weigh each element by how often
it was drawn and the result is reproducible for a seed. A matrix's softmax and KL are per row
(shard-local); a 1-D tensor's span the whole vector: rounds for its maxima, its exp sums and its
KL sum come first (float64 over canonical chunks, softmax rounded once to the compute dtype).
A matrix's KL per last-dim vector is computed once, in the first quartile round, and carried in
the reductions; in float32 compute the quartile rounds and the merge then run as fused loops
from it (:mod:`.kernels.fusion_loops`, the same floats), visiting only the sampled elements
where the quartiles come from a sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from distmerge.methods import kernels, scalars
from distmerge.methods.base import (
    MergeMethod,
    Partials,
    Reductions,
    ShardContext,
    TensorParams,
    compute_dtype,
    in_compute,
    promoted_to_float32,
    rows_in_compute,
)
from distmerge.methods.kernels import fusion_loops
from distmerge.methods.random_stream import stream_key
from distmerge.methods.selection import dense_low, dense_to_sparse, locate

SAMPLE_SIZE = 1_000_000
SAMPLE_STREAM = -1  # the stream's "model" index: one sample per tensor, not per model
QUANTILES = (0.25, 0.5, 0.75)
EPS = 1e-8
DIGIT_BINS = 1 << 16  # the quartile search counts the keys' high, then low, 16 bits


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) that order like the float32 values of ``x`` (flattened)."""
    b = x.detach().reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64)
    u = b & 0xFFFFFFFF
    return torch.where(b >= 0, u | 0x80000000, (~u) & 0xFFFFFFFF)


def key_value(key: int) -> float:
    u = key - 0x80000000 if key >= 0x80000000 else (~key) & 0xFFFFFFFF
    return float(torch.tensor([u], dtype=torch.int64).to(torch.int32).view(torch.float32)[0])


def sample_picks(ctx: ShardContext, numel: int, chunk_numel: int) -> np.ndarray | None:
    """The tensor's sampled elements that fall in this chunk, chunk-relative, with repetition,
    ascending (None: no sampling): draw ``i`` of the stream is element
    ``min(floor(u_i * numel), numel - 1)`` (:func:`fusion_loops.sample_positions`)."""
    if numel <= SAMPLE_SIZE:
        return None
    key = stream_key(ctx.seed, ctx.tensor, SAMPLE_STREAM)
    return fusion_loops.sample_positions(key, SAMPLE_SIZE, numel, ctx.element_start, ctx.element_start + chunk_numel)


def sample_weights(ctx: ShardContext, numel: int, chunk_numel: int) -> torch.Tensor | None:
    """How often each element of this chunk is in the tensor's sample (None: no sampling)."""
    picks = sample_picks(ctx, numel, chunk_numel)
    return None if picks is None else torch.bincount(torch.from_numpy(picks), minlength=chunk_numel)


def row_kl(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mergekit's KL of each last-dim vector, ``(..., 1)``: softmaxes along the last dim + 1e-8."""
    p = F.softmax(x, dim=-1).add_(EPS)  # in place: the same floats, fewer chunk-sized buffers
    q = F.softmax(base, dim=-1).add_(EPS)
    ratio = torch.div(p, q, out=q).log_().mul_(p)
    return torch.sum(ratio, dim=-1, keepdim=True)


def sparse_counts(bins: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ``bins`` (16-bit key digits) and how often each occurs (each occurrence counted
    ``weights`` times), ascending: ``torch.unique``'s answer from a dense count, in time linear in
    the chunk (unique sorts it)."""
    occurs = torch.bincount(bins, minlength=DIGIT_BINS)
    values = torch.nonzero(occurs).reshape(-1)
    if weights is None:
        return values, occurs[values]
    # float64 sums of integer weights are exact below 2**53 (a chunk's sample count is far below)
    weighted = torch.bincount(bins, weights=weights.to(torch.float64), minlength=DIGIT_BINS)
    return values, weighted[values].to(torch.int64)


@dataclass
class FusionPartials(Partials):
    floats: list[float] = field(default_factory=list)  # 1-D rounds: maxima, exp sums, KL sum
    high: tuple[torch.Tensor, torch.Tensor] | None = None  # quartile round 0: high bits, (weighted) counts
    low: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per quartile
    kl: torch.Tensor | None = None  # >= 2-D, first quartile round: the chunk's KL per last-dim vector
    dtype: torch.dtype = torch.float32


@dataclass(kw_only=True)
class FusionReductions(Reductions):
    maxima: tuple[float, float] | None = None
    exp_sums: tuple[float, float] | None = None
    kl: torch.Tensor | None = None  # 1-D: the whole vector's KL, compute dtype
    kl_vectors: torch.Tensor | None = None  # >= 2-D: the KL of every last-dim vector, flat, in order
    buckets: list[tuple[int, int]] = field(default_factory=list)
    threshold: torch.Tensor | None = None


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    uses_base = True
    reads_stored_rows = True
    # The mask is a float multiply: out = base + (x - base) * m, and (x - base) * 0 is NaN where x
    # or base is NaN or Inf, so every input NaN/Inf reaches its output element, whatever the
    # quartiles made of them (tests/methods/test_nonfinite_reaches_output.py).
    nonfinite_reaches_output = True
    min_experts = 1
    max_experts = 1
    global_parameters = {}
    model_parameters = {}

    def result_dtype(self, compute: torch.dtype) -> torch.dtype:
        """float32 (float64 for float64 compute): mergekit's mask is ``.float()``, so the blend
        ``base + (x - base) * mask`` promotes, and mergekit writes that unless ``out_dtype`` is set."""
        return promoted_to_float32(compute)

    @staticmethod
    def _vector_rounds(shape: tuple[int, ...] | None) -> int:
        return 3 if shape is None or len(shape) < 2 else 0

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        return self._vector_rounds(shape) + 2

    @staticmethod
    def _softmax_1d(x: torch.Tensor, top: float, total: float) -> torch.Tensor:
        return (torch.exp(x.to(torch.float64) - top) / total).to(x.dtype)

    def _importance(self, base, x, shape, red: FusionReductions | None, kl: torch.Tensor | None = None) -> torch.Tensor:
        diff = (x - base).abs()
        if len(shape) >= 2:
            return diff * (row_kl(base, x) if kl is None else kl)
        assert red is not None and red.kl is not None
        return diff * red.kl

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> FusionPartials:
        assert base is not None
        red = cast(FusionReductions | None, previous)
        if _fused(base, experts, ctx):
            return self._fused_partials(base, experts[0], ctx, round_, red)
        base, (x,) = rows_in_compute(base, experts, ctx)
        dtype = x.dtype
        vector = self._vector_rounds(ctx.shape)
        if round_ < vector:
            if round_ == 0:
                return FusionPartials([float(x.max()), float(base.max())], dtype=dtype)
            assert red is not None and red.maxima is not None
            if round_ == 1:
                return FusionPartials([scalars.total(torch.exp(t.to(torch.float64) - m))
                                       for t, m in zip((x, base), red.maxima, strict=True)], dtype=dtype)
            assert red.exp_sums is not None
            p = self._softmax_1d(x, red.maxima[0], red.exp_sums[0]) + EPS
            q = self._softmax_1d(base, red.maxima[1], red.exp_sums[1]) + EPS
            return FusionPartials([scalars.total(p * torch.log(p / q))], dtype=dtype)
        kl = row_kl(base, x) if round_ == vector and len(ctx.shape) >= 2 else None  # shipped: the later rounds' KL
        keys = order_keys(self._importance(base, x, ctx.shape, red, kl))
        weights = sample_weights(ctx, ctx.tensor_numel, keys.numel())
        if round_ == vector:
            return FusionPartials(high=sparse_counts(keys >> 16, weights), kl=None if kl is None else kl.reshape(-1),
                                  dtype=dtype)
        assert red is not None
        lows = []
        for bucket, _ in red.buckets:
            inside = (keys >> 16) == bucket
            lows.append(sparse_counts(keys[inside] & 0xFFFF, None if weights is None else weights[inside]))
        return FusionPartials(low=lows, dtype=dtype)

    def _fused_partials(self, base: torch.Tensor, x: torch.Tensor, ctx: ShardContext, round_: int,
                        red: FusionReductions | None) -> FusionPartials:
        """A matrix's quartile rounds in float32 compute, by the fused loops."""
        picks = sample_picks(ctx, ctx.tensor_numel, base.numel())
        cols = ctx.shape[-1]
        if round_ == 0:
            kl = row_kl(in_compute(base, ctx), in_compute(x, ctx)).reshape(-1)
            buckets = np.zeros(0, dtype=np.int64)
        else:
            assert red is not None and red.kl_vectors is not None
            kl = self._shard_kl(red, ctx)
            buckets = np.array([b for b, _ in red.buckets], dtype=np.int64)
        b, xb = kernels.value_arrays([base, x], torch.float32)
        hist = fusion_loops.fusion_counts(b, xb, kl.numpy(), cols, picks, buckets)
        if round_ == 0:
            return FusionPartials(high=dense_to_sparse(hist[0]), kl=kl, dtype=torch.float32)
        return FusionPartials(low=[dense_to_sparse(h) for h in hist], dtype=torch.float32)

    @staticmethod
    def _shard_kl(red: FusionReductions, ctx: ShardContext) -> torch.Tensor:
        """The KL of the last-dim vectors in this shard's rows."""
        assert red.kl_vectors is not None
        per_row = ctx.row_numel // ctx.shape[-1]
        return red.kl_vectors[ctx.row_start * per_row:ctx.row_end * per_row]

    def reduce(self, partials: Sequence[Partials], params: TensorParams, shape: tuple[int, ...],
               round_: int, previous: Reductions | None) -> FusionReductions:
        chunks = cast(Sequence[FusionPartials], partials)
        dtype = chunks[0].dtype
        out = FusionReductions() if previous is None else replace(cast(FusionReductions, previous))
        vector = self._vector_rounds(shape)
        if round_ < vector:
            if round_ == 0:
                out.maxima = (max(c.floats[0] for c in chunks), max(c.floats[1] for c in chunks))
            elif round_ == 1:
                out.exp_sums = (sum(c.floats[0] for c in chunks), sum(c.floats[1] for c in chunks))
            else:
                out.kl = scalars.as_dtype(sum(c.floats[0] for c in chunks), dtype)
            return out
        if round_ == vector:
            if len(shape) >= 2:  # every chunk ships its vectors' KL in this round
                assert all(c.kl is not None for c in chunks), "a chunk without its KL"
                out.kl_vectors = torch.cat([cast(torch.Tensor, c.kl) for c in chunks])
            high = dense_low([c.high for c in chunks if c.high is not None])  # 2**16 bins, like the low bits
            n = int(high.sum())
            idx = (torch.tensor(QUANTILES) * (n - 1)).long()
            out.buckets = [locate(high, n - int(i)) for i in idx]  # (i+1)-th smallest = (n-i)-th largest
            return out
        values = []
        for j, (bucket, residual) in enumerate(out.buckets):
            low, _ = locate(dense_low([c.low[j] for c in chunks]), residual)
            values.append(torch.tensor(key_value((bucket << 16) | low), dtype=dtype))
        q1, median, q3 = values
        out.threshold = median + 1.5 * (q3 - q1)
        return out

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        assert base is not None and isinstance(reduced, FusionReductions) and reduced.threshold is not None
        if _fused(base, experts, ctx):
            b, xb = kernels.value_arrays([base, experts[0]], torch.float32)
            kl = self._shard_kl(reduced, ctx).numpy()
            merged = fusion_loops.fusion_merge(b, xb, kl, ctx.shape[-1], float(reduced.threshold))
            return torch.from_numpy(merged).reshape(base.shape)
        base, (x,) = rows_in_compute(base, experts, ctx)
        mask = (self._importance(base, x, ctx.shape, reduced) >= reduced.threshold).float()
        return base + (x - base) * mask


def _fused(base: torch.Tensor, experts: Sequence[torch.Tensor], ctx: ShardContext) -> bool:
    """Whether this shard runs the fused loops: a matrix (or more dims) in float32 compute."""
    return len(ctx.shape) >= 2 and compute_dtype(base, ctx) == torch.float32
