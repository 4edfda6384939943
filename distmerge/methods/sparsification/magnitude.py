"""Magnitude trimming: TIES keeps the k largest |delta| of the whole tensor; breadcrumbs drops
the largest ``gamma`` fraction and keeps the next ``density``.

Elements are ranked by magnitude, descending, and equal magnitudes by flat position, lower
index first: a total order, so "the k largest" is exactly k elements and the kept fraction is
exactly the configured one, whatever the sharding (see docs/methods.md on mergekit's argsort).

No worker holds a whole tensor, so the thresholds come from reduction rounds
(:mod:`distmerge.methods.selection`). ``SPECULATE`` first: each chunk counts its keys above,
and the low bits inside, a window where it expects each threshold; when every window holds it,
the thresholds are exact after one read. Otherwise the radix rounds follow: ``SELECT_HIGH``
locates the bucket of each threshold's high 16 bits (and, speculatively, its low bits),
``SELECT_LOW`` the low 16 bits. The selection also says how many elements tied at a threshold
key rank inside its top r; only when that is fewer than all of them are the tied elements
counted per row (exact integers, reduced in row order), which gives the row where the cut falls
and how many ties of that row are in. After ``SPECULATE`` that reads only the chunk where the
cut falls (in ``SELECT_HIGH``'s place, the radix rounds skipped); after the radix rounds it is
``SELECT_LOW``'s or ``TIES``'s work.
The keep rule is then a comparison of each element's key with exact whole-tensor keys, plus a
positional count inside at most one row per bound, so it is exact for any row block.

The keep rule itself (thresholds, tie cuts, ranks) is :mod:`.trim_rules`.

Longer than 300 lines because the speculative round and the radix rounds that back it up find
the same thresholds and tie cuts, and their partials and reduces are kept side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distmerge.methods import kernels, selection
from distmerge.methods.base import Params, ParamSpec, ShardContext, TensorParams, delta_in_compute
from distmerge.methods.selection import magnitude_keys
from distmerge.methods.sparsification.base import Divisor, KernelTerms, Sparsifier, numel
from distmerge.methods.sparsification.rounds import (
    Bound,
    ChunkPartials,
    HighPartial,
    LowPartial,
    Round,
    SpeculativePartial,
    TaskVectorReductions,
    TiePartial,
)
from distmerge.methods.sparsification.trim_rules import (
    TrimRanks,
    bound_rule,
    breadcrumbs_ranks,
    explicit_in_top,
    magnitude_mask,
    magnitude_ranks,
)


def _rows_tied(keys: selection.DeltaKeys, ctx: ShardContext, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's absolute rows holding keys equal to ``key``, and how many each holds."""
    per_row = keys.tie_rows(ctx.row_end - ctx.row_start, key)
    nz = per_row.nonzero().reshape(-1)
    return nz + ctx.row_start, per_row[nz]


class MagnitudeTrim(Sparsifier):
    """TIES: keep the ``max(1, int(density * numel))`` largest magnitudes of the whole tensor."""

    name = "magnitude"

    def trim(self, p: Params, numel: int) -> TrimRanks:
        return magnitude_ranks(p["density"], numel)

    def kind_rounds(self, l1: bool, shape: tuple[int, ...] | None) -> list[Round]:
        return [Round.SPECULATE, Round.SELECT_HIGH, Round.SELECT_LOW, Round.TIES] + ([Round.L1] if l1 else [])

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
        keys = selection.DeltaKeys(base, x, ctx.compute)
        if round_ is Round.SPECULATE:
            return self._speculative_partial(keys, ranks, ctx)
        assert previous is not None
        if previous.speculated:
            # Every threshold is known; what is left is a tie cut, counted in its own chunk only.
            if round_ is not Round.SELECT_HIGH:
                return None
            rows = self._tie_rows(e, keys, ctx, previous)
            return TiePartial(rows) if rows else None
        if round_ is Round.TIES:
            rows = self._tie_rows(e, keys, ctx, previous)
            return TiePartial(rows) if rows else None
        if round_ is Round.SELECT_HIGH:
            return HighPartial(*keys.round_zero(ranks, numel(ctx.shape)))
        assert round_ is Round.SELECT_LOW, round_
        known = previous.thresholds.get(e, {})
        open_ = {b: bucket for b, (bucket, _) in previous.buckets[e].items() if b not in known}
        # Ties whose threshold round 0 resolved are counted now, saving the TIES round's read.
        ties = self._tie_rows(e, keys, ctx, previous)
        if not open_ and not ties:
            return None
        return LowPartial({b: keys.low_histogram(bucket) for b, bucket in open_.items()}, ties)

    @staticmethod
    def _speculative_partial(keys: selection.DeltaKeys, ranks: dict[Bound, int], ctx: ShardContext,
                             ) -> SpeculativePartial:
        """The chunk's windows; a chunk that is the whole tensor knows its thresholds exactly, so
        it counts the ties of those whose ties must be split too (the tensor is then read once)."""
        n = numel(ctx.shape)
        windows = keys.speculate(ranks, n)
        ties = {}
        if keys.numel == n:
            for bound, rank in ranks.items():
                resolved = selection.resolve_windows([windows[bound]], rank)
                if resolved is not None and rank - resolved.above < resolved.tied[0]:
                    ties[bound] = _rows_tied(keys, ctx, resolved.key)
        return SpeculativePartial((ctx.row_start, ctx.row_end), windows, ties, keys.nonfinite)

    @staticmethod
    def _tie_rows(e: int, keys: selection.DeltaKeys, ctx: ShardContext,
                  previous: TaskVectorReductions) -> dict[Bound, tuple[torch.Tensor, torch.Tensor]]:
        """Per-row counts of the chunk's elements tied at each threshold whose ties must be
        split and whose cut is not known yet (absolute rows with ties, their counts); after the
        speculative round, only in the chunk where the cut falls."""
        cut = previous.tie_cuts.get(e, {})
        need = [b for b in previous.tie_need.get(e, {}) if b not in cut]
        if previous.speculated:
            here = (ctx.row_start, ctx.row_end)
            need = [b for b in need if previous.tie_chunks[e][b][:2] == here]
        return {bound: _rows_tied(keys, ctx, previous.thresholds[e][bound]) for bound in need}

    def reduce_into(
        self, out: TaskVectorReductions, round_: Round, partials: Sequence[ChunkPartials[Any]],
        params: TensorParams, shape: tuple[int, ...],
    ) -> None:
        if round_ is Round.L1:
            self.reduce_l1(out, partials, params)
            return
        if round_ is Round.SPECULATE:
            if not self._reduce_speculative(out, partials, params, shape):
                return  # some window missed its threshold: the radix rounds follow, on every chunk
            self._reduce_ties(out, partials)  # a whole-tensor chunk counted its ties already
        elif out.speculated:
            self._reduce_ties(out, partials)
        elif round_ is Round.SELECT_HIGH:
            self._reduce_high(out, partials, params, shape)
        elif round_ is Round.SELECT_LOW:
            self._reduce_ties(out, partials)  # the ties counted alongside (needs known after round 0)
            self._reduce_low(out, partials)
        else:
            self._reduce_ties(out, partials)
        l1 = Round.L1 in self.rounds(params, shape)
        cutting = any(b not in out.tie_cuts.get(e, {}) for e, named in out.tie_need.items() for b in named)
        out.complete = self._selected(out) and not cutting and not l1
        if out.speculated:
            # The radix rounds are skipped; the tie round (SELECT_HIGH's place) reads the cut chunks.
            order = self.rounds(params)
            cut_chunks = sorted({chunk[:2] for e, named in out.tie_chunks.items() for b, chunk in named.items()
                                 if b not in out.tie_cuts.get(e, {})})
            out.round_rows = {order.index(Round.SELECT_HIGH): tuple(cut_chunks),
                              order.index(Round.SELECT_LOW): (), order.index(Round.TIES): ()}

    def _reduce_speculative(self, out: TaskVectorReductions, partials: Sequence[ChunkPartials[SpeculativePartial]],
                            params: TensorParams, shape: tuple[int, ...]) -> bool:
        """Every threshold from the chunks' windows (:func:`selection.resolve_windows`), and for
        each whose ties must be split the chunk where the cut falls; False, with nothing set,
        when some window missed its threshold."""
        n = numel(shape)
        found: dict[int, dict[Bound, tuple[selection.Resolved, int]]] = {}
        for e, p in enumerate(params.experts):
            if not self.active(p) or not self.trim(p, n).ranks:
                continue
            for bound, rank in self.trim(p, n).ranks.items():
                parts = [c.experts[e] for c in partials if e in c.experts]
                resolved = selection.resolve_windows([part.windows[bound] for part in parts], rank)
                if resolved is None:
                    return False
                found.setdefault(e, {})[bound] = (resolved, rank)
        out.speculated = True
        out.buckets, out.thresholds, out.tie_need, out.tie_cuts, out.tie_chunks = {}, {}, {}, {}, {}
        for e, named in found.items():
            rows = [part.rows for c in partials if e in c.experts for part in (c.experts[e],)]
            for bound, (resolved, rank) in named.items():
                out.thresholds.setdefault(e, {})[bound] = resolved.key
                need = rank - resolved.above
                if need == sum(resolved.tied):
                    continue  # every tie is inside
                out.tie_need.setdefault(e, {})[bound] = need
                before = 0
                for (first, end), tied in zip(rows, resolved.tied, strict=True):
                    if before + tied >= need:
                        if before + tied == need:  # the cut is this chunk's end: no read needed
                            out.tie_cuts.setdefault(e, {})[bound] = (end, 0)
                        else:
                            out.tie_chunks.setdefault(e, {})[bound] = (first, end, need - before)
                        break
                    before += tied
        return True

    @staticmethod
    def _selected(out: TaskVectorReductions) -> bool:
        return all(len(out.thresholds.get(e, {})) == len(named) for e, named in out.buckets.items())

    @staticmethod
    def _set_threshold(out: TaskVectorReductions, e: int, bound: Bound, bucket: int, low: torch.Tensor,
                       residual: int) -> None:
        """The exact threshold key from a bucket's low-bits histogram, and how many of the
        elements tied at it rank inside (recorded only when that is fewer than all)."""
        bits, need = selection.locate(low, residual)
        out.thresholds.setdefault(e, {})[bound] = (bucket << 16) | bits
        if need < int(low[bits]):
            out.tie_need.setdefault(e, {})[bound] = need

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
        out.thresholds, out.tie_need, out.tie_cuts = {}, {}, {}
        for e, named in buckets.items():
            for bound, (bucket, residual) in named.items():
                low = selection.speculative_low([c.experts[e].speculated[bound] for c in partials], bucket)
                if low is not None:
                    self._set_threshold(out, e, bound, bucket, low, residual)

    def _reduce_low(self, out: TaskVectorReductions, partials: Sequence[ChunkPartials[LowPartial]]) -> None:
        """Exact thresholds from the low bits inside each located bucket (where round 0's
        speculation did not already give them)."""
        for e, named in out.buckets.items():
            for bound, (bucket, residual) in named.items():
                if bound in out.thresholds.get(e, {}):
                    continue
                low = selection.dense_low([c.experts[e].low[bound] for c in partials if e in c.experts])
                self._set_threshold(out, e, bound, bucket, low, residual)

    @staticmethod
    def _reduce_ties(out: TaskVectorReductions, partials: Sequence[ChunkPartials[Any]]) -> None:
        """The row where each split bound's cut falls, and how many ties of that row are in
        (from TIES partials, or the tie rows of SELECT_LOW or speculative partials)."""
        def rows_of(part: Any) -> dict[Bound, tuple[torch.Tensor, torch.Tensor]]:
            return part.rows if isinstance(part, TiePartial) else part.ties

        for e, named in out.tie_need.items():
            for bound, need in named.items():
                if bound in out.tie_cuts.get(e, {}):
                    continue
                if bound in out.tie_chunks.get(e, {}):
                    need = out.tie_chunks[e][bound][2]  # only the cut chunk was counted
                parts = [rows_of(c.experts[e])[bound] for c in partials
                         if e in c.experts and bound in rows_of(c.experts[e])]
                if not parts:
                    continue  # its need was found in this round: the TIES round counts it
                rows = torch.cat([r for r, _ in parts])
                cum = torch.cat([n for _, n in parts]).cumsum(0)
                i = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype)).item())
                before = int(cum[i - 1]) if i > 0 else 0
                out.tie_cuts.setdefault(e, {})[bound] = (int(rows[i]), need - before)

    # ---- the keep rule --------------------------------------------------------------------

    def cut_rows(self, ctx: ShardContext, reduced: TaskVectorReductions | None) -> list[int]:
        if reduced is None:
            return []
        return [row for named in reduced.tie_cuts.values() for row, _ in named.values()]

    def keep(
        self, e: int, delta: torch.Tensor, p: Params, ctx: ShardContext, reduced: TaskVectorReductions | None,
    ) -> tuple[torch.Tensor, Divisor]:
        ranks = self.trim(p, numel(ctx.shape))
        assert reduced is not None or not ranks.ranks
        thresholds = reduced.thresholds.get(e, {}) if reduced is not None else {}
        cuts = reduced.tie_cuts.get(e, {}) if reduced is not None else {}
        return magnitude_mask(delta, ranks, thresholds, cuts, ctx), p["density"]

    def kernel_keep(
        self, e: int, x: torch.Tensor, base: torch.Tensor, p: Params, ctx: ShardContext,
        reduced: TaskVectorReductions | None,
    ) -> tuple[KernelTerms, Divisor]:
        ranks = self.trim(p, numel(ctx.shape))
        thresholds = reduced.thresholds.get(e, {}) if reduced is not None else {}
        cuts = reduced.tie_cuts.get(e, {}) if reduced is not None else {}
        terms = KernelTerms()
        if ranks.nothing:
            terms.low = kernels.KEEP_NOTHING
            return terms, p["density"]
        explicit: list[torch.Tensor] = []
        keys: torch.Tensor | None = None
        for bound, rank in ((Bound.LOW, ranks.low), (Bound.HIGH, ranks.high)):
            if rank is None:
                continue
            key, cut = thresholds[bound], cuts.get(bound)
            t, split = bound_rule(key, cut, ctx)
            if not split:
                if bound is Bound.LOW:
                    terms.low = t
                else:
                    terms.high = t
                continue
            assert cut is not None
            keys = magnitude_keys(delta_in_compute(x, base, ctx)) if keys is None else keys
            top = explicit_in_top(keys, ctx, key, cut)
            explicit.append(top if bound is Bound.LOW else ~top)
        if explicit:
            mask = explicit[0] if len(explicit) == 1 else explicit[0] & explicit[1]
            terms.mask = mask.numpy()
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
