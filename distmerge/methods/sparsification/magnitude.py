"""Magnitude trimming: TIES keeps the k largest |delta| of the whole tensor; breadcrumbs drops
the largest ``gamma`` fraction and keeps the next ``density``.

No worker holds a whole tensor, so the thresholds come from two reduction rounds of radix
selection (:mod:`distmerge.methods.selection`): ``SELECT_HIGH`` locates the bucket of each
threshold's high 16 bits (and, speculatively, its low bits: when every chunk's guess covers the
bucket, the thresholds are exact after one read), ``SELECT_LOW`` the low 16 bits. The keep rule
is then a comparison of each element's key with exact whole-tensor keys, so it is exact for
any row block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distmerge.methods import kernels, selection
from distmerge.methods.base import Params, ParamSpec, ShardContext, TensorParams
from distmerge.methods.selection import magnitude_keys
from distmerge.methods.sparsification.base import Divisor, KernelTerms, Sparsifier, numel
from distmerge.methods.sparsification.rounds import (
    Bound,
    ChunkPartials,
    HighPartial,
    LowPartial,
    Round,
    TaskVectorReductions,
)


@dataclass(frozen=True)
class TrimRanks:
    """Descending 1-based ranks bounding the kept magnitudes of one expert's delta.

    Kept: keys ``>= key(low)`` (``low=None``: no lower bound) and ``< key(high)``
    (``high=None``: no upper bound); ``nothing``: keep no element at all.
    """

    low: int | None
    high: int | None
    nothing: bool = False

    @property
    def ranks(self) -> dict[Bound, int]:
        return {b: r for b, r in ((Bound.LOW, self.low), (Bound.HIGH, self.high)) if r is not None}


def magnitude_ranks(density: float, numel: int) -> TrimRanks:
    """TIES trimming: keep the ``k = max(1, int(density * numel))`` largest magnitudes."""
    k = max(1, int(density * numel))
    return TrimRanks(k if k < numel else None, None)


def breadcrumbs_ranks(density: float, gamma: float, numel: int) -> TrimRanks:
    """Breadcrumbs: drop the ``n_top = int(gamma * numel)`` largest, keep the next
    ``int(density * numel)``; when both do not fit, fewer large ones are dropped (mergekit's
    ``n_bot < 0`` rule). ``n_top == 0`` drops none (mergekit's slice ``[n_bot:-0]`` kept none)."""
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = numel - target - n_top
    if n_bot < 0:
        n_top += n_bot
    if target <= 0:
        return TrimRanks(None, None, nothing=True)
    low = n_top + target
    return TrimRanks(low if low < numel else None, n_top if n_top > 0 else None)


def magnitude_mask(delta: torch.Tensor, ranks: TrimRanks, thresholds: dict[Bound, int]) -> torch.Tensor:
    """Keep-mask from exact whole-tensor threshold keys (see :mod:`distmerge.methods.selection`).

    Ties at a threshold are all treated alike (kept at the low one, dropped at the high one),
    so the mask does not depend on element order or sharding; mergekit's argsort breaks such
    ties arbitrarily. On continuous data the two agree exactly.
    """
    if ranks.nothing:
        return torch.zeros(delta.shape, dtype=torch.bool)
    keys = magnitude_keys(delta).reshape(delta.shape)
    mask: torch.Tensor | None = None
    if ranks.low is not None:
        mask = keys >= thresholds[Bound.LOW]
    if ranks.high is not None:
        below = keys < thresholds[Bound.HIGH]
        mask = below if mask is None else mask & below
    return torch.ones(delta.shape, dtype=torch.bool) if mask is None else mask


class MagnitudeTrim(Sparsifier):
    """TIES: keep the ``max(1, int(density * numel))`` largest magnitudes of the whole tensor."""

    name = "magnitude"

    def trim(self, p: Params, numel: int) -> TrimRanks:
        return magnitude_ranks(p["density"], numel)

    def kind_rounds(self, l1: bool, shape: tuple[int, ...] | None) -> list[Round]:
        return [Round.SELECT_HIGH, Round.SELECT_LOW] + ([Round.L1] if l1 else [])

    # ---- reduction rounds -----------------------------------------------------------------

    def partial(
        self, round_: Round, e: int, base: torch.Tensor, x: torch.Tensor, p: Params, ctx: ShardContext,
        previous: TaskVectorReductions | None,
    ) -> Any:
        if round_ is Round.L1:
            return self.l1_partial(e, base, x, p, ctx, previous)
        ranks = self.trim(p, numel(ctx.shape)).ranks
        if not ranks:
            return None
        keys = selection.DeltaKeys(base, x)
        if round_ is Round.SELECT_HIGH:
            return HighPartial(*keys.round_zero(ranks, numel(ctx.shape)))
        assert round_ is Round.SELECT_LOW and previous is not None, round_
        return LowPartial({bound: keys.low_histogram(bucket) for bound, (bucket, _) in previous.buckets[e].items()})

    def reduce_into(
        self, out: TaskVectorReductions, round_: Round, partials: Sequence[ChunkPartials[Any]],
        params: TensorParams, shape: tuple[int, ...],
    ) -> None:
        if round_ is Round.SELECT_HIGH:
            self._reduce_high(out, partials, params, shape)
        elif round_ is Round.SELECT_LOW:
            self._reduce_low(out, partials)
        else:
            self.reduce_l1(out, partials, params)

    def _reduce_high(self, out: TaskVectorReductions, partials: Sequence[ChunkPartials[HighPartial]],
                     params: TensorParams, shape: tuple[int, ...]) -> None:
        """Each threshold's bucket from the summed histograms; exact thresholds (and no round 1)
        when every chunk's speculative range holds the global bucket."""
        n = numel(shape)
        buckets: dict[int, dict[Bound, tuple[int, int]]] = {}
        for e, p in enumerate(params.experts):
            if not self.active(p) or not self.trim(p, n).ranks:
                continue
            hist = selection.sum_histograms([c.experts[e].histogram for c in partials])
            buckets[e] = {bound: selection.locate(hist, r) for bound, r in self.trim(p, n).ranks.items()}
        out.buckets = buckets
        resolved: dict[int, dict[Bound, int]] = {}
        for e, named in buckets.items():
            resolved[e] = {}
            for bound, (bucket, residual) in named.items():
                parts = [c.experts[e].speculated[bound] for c in partials]
                low = selection.resolve_speculative(parts, bucket, residual)
                if low is not None:
                    resolved[e][bound] = (bucket << 16) | low
        if all(len(resolved[e]) == len(buckets[e]) for e in buckets) and Round.L1 not in self.rounds(params, shape):
            out.thresholds = resolved
            out.complete = True

    @staticmethod
    def _reduce_low(out: TaskVectorReductions, partials: Sequence[ChunkPartials[LowPartial]]) -> None:
        """Exact thresholds from the low bits inside each located bucket."""
        thresholds: dict[int, dict[Bound, int]] = {}
        for e, named in out.buckets.items():
            thresholds[e] = {}
            for bound, (bucket, residual) in named.items():
                low = selection.dense_low([c.experts[e].low[bound] for c in partials])
                thresholds[e][bound] = (bucket << 16) | selection.locate(low, residual)[0]
        out.thresholds = thresholds

    # ---- the keep rule --------------------------------------------------------------------

    def keep(
        self, e: int, delta: torch.Tensor, p: Params, ctx: ShardContext, reduced: TaskVectorReductions | None,
    ) -> tuple[torch.Tensor, Divisor]:
        ranks = self.trim(p, numel(ctx.shape))
        assert reduced is not None or not ranks.ranks
        thresholds = reduced.thresholds.get(e, {}) if reduced is not None else {}
        return magnitude_mask(delta, ranks, thresholds), p["density"]

    def kernel_keep(
        self, e: int, x: torch.Tensor, base: torch.Tensor, p: Params, ctx: ShardContext,
        reduced: TaskVectorReductions | None,
    ) -> tuple[KernelTerms, Divisor]:
        ranks = self.trim(p, numel(ctx.shape))
        thresholds = reduced.thresholds.get(e, {}) if reduced is not None else {}
        terms = KernelTerms()
        if ranks.nothing:
            terms.low = kernels.KEEP_NOTHING
        else:
            terms.low = thresholds[Bound.LOW] if ranks.low is not None else kernels.NO_LOW
            terms.high = thresholds[Bound.HIGH] if ranks.high is not None else kernels.NO_HIGH
        return terms, p["density"]


class BreadcrumbsTrim(MagnitudeTrim):
    """Breadcrumbs: drop the ``int(gamma * numel)`` largest magnitudes, keep the next
    ``int(density * numel)``."""

    name = "breadcrumbs"

    def model_parameters(self) -> dict[str, ParamSpec]:
        return super().model_parameters() | {
            "gamma": ParamSpec(0.01, float, lambda v: 0.0 <= v <= 1.0, "0 <= gamma <= 1"),
        }

    def trim(self, p: Params, numel: int) -> TrimRanks:
        return breadcrumbs_ranks(p["density"], p["gamma"], numel)
