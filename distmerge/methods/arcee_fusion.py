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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import torch
import torch.nn.functional as F  # noqa: N812

from distmerge.methods import scalars
from distmerge.methods.base import (
    MergeMethod,
    Partials,
    Reductions,
    ShardContext,
    TensorParams,
    promoted_to_float32,
)
from distmerge.methods.random_stream import uniforms
from distmerge.methods.selection import dense_low, locate

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


def sample_weights(ctx: ShardContext, numel: int, chunk_numel: int) -> torch.Tensor | None:
    """How often each element of this chunk is in the tensor's sample (None: no sampling)."""
    if numel <= SAMPLE_SIZE:
        return None
    u = torch.from_numpy(uniforms(ctx.seed, ctx.tensor, SAMPLE_STREAM, 0, SAMPLE_SIZE))
    picks = torch.clamp((u * numel).to(torch.int64), max=numel - 1) - ctx.element_start
    picks = picks[(picks >= 0) & (picks < chunk_numel)]
    return torch.bincount(picks, minlength=chunk_numel)


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
    dtype: torch.dtype = torch.float32


@dataclass(kw_only=True)
class FusionReductions(Reductions):
    maxima: tuple[float, float] | None = None
    exp_sums: tuple[float, float] | None = None
    kl: torch.Tensor | None = None  # 1-D: the whole vector's KL, compute dtype
    buckets: list[tuple[int, int]] = field(default_factory=list)
    threshold: torch.Tensor | None = None


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    uses_base = True
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

    def _importance(self, base, x, shape, red: FusionReductions | None) -> torch.Tensor:
        diff = (x - base).abs()
        if len(shape) >= 2:
            p = F.softmax(x, dim=-1) + EPS
            q = F.softmax(base, dim=-1) + EPS
            return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        assert red is not None and red.kl is not None
        return diff * red.kl

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> FusionPartials:
        assert base is not None
        x, dtype = experts[0], experts[0].dtype
        red = cast(FusionReductions | None, previous)
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
        keys = order_keys(self._importance(base, x, ctx.shape, red))
        full = 1
        for d in ctx.shape:
            full *= d
        weights = sample_weights(ctx, full, keys.numel())
        if round_ == vector:
            return FusionPartials(high=sparse_counts(keys >> 16, weights), dtype=dtype)
        assert red is not None
        lows = []
        for bucket, _ in red.buckets:
            inside = (keys >> 16) == bucket
            lows.append(sparse_counts(keys[inside] & 0xFFFF, None if weights is None else weights[inside]))
        return FusionPartials(low=lows, dtype=dtype)

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
        x = experts[0]
        mask = (self._importance(base, x, ctx.shape, reduced) >= reduced.threshold).float()
        return base + (x - base) * mask


