"""Which elements a magnitude trim keeps, given its exact whole-tensor thresholds and tie cuts.

The ranks TIES and breadcrumbs keep (``TrimRanks``), and the keep rule a shard applies: a
comparison of each element's selection key with a threshold key, except in the one row of a
bound where the cut through its ties falls, where the ties are counted by position
(:func:`explicit_in_top`). The rounds that find the thresholds and cuts are
:mod:`distmerge.methods.sparsification.magnitude`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distmerge.methods.base import ShardContext
from distmerge.methods.selection import magnitude_keys
from distmerge.methods.sparsification.rounds import Bound

TieCut = tuple[int, int] | None  # (row, ties in that row) of a bound; None: every tie is in


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


def bound_rule(key: int, cut: TieCut, ctx: ShardContext) -> tuple[int, bool]:
    """How a shard tells its elements inside a bound's top r: ``keys >= t`` for the returned
    ``t`` (all ties in: the threshold key; none: the next key), or ``explicit`` when the cut
    row lies in the shard (then :func:`explicit_in_top`)."""
    if cut is None or ctx.row_end <= cut[0]:
        return key, False
    if ctx.row_start > cut[0]:
        return key + 1, False
    return key, True


def explicit_in_top(keys: torch.Tensor, ctx: ShardContext, key: int, cut: tuple[int, int]) -> torch.Tensor:
    """Flat mask of the shard's elements inside the top r: keys above ``key``, and the ties at
    it in rows before the cut row and the first ``cut[1]`` (by position) in the cut row."""
    rows = ctx.row_end - ctx.row_start
    k2 = keys.reshape(rows, -1)
    eq = k2 == key
    row = torch.arange(ctx.row_start, ctx.row_end).unsqueeze(1)
    ordinal = eq.to(torch.int64).cumsum(1) - 1
    tie_in = eq & ((row < cut[0]) | ((row == cut[0]) & (ordinal < cut[1])))
    return ((k2 > key) | tie_in).reshape(-1)


def in_top(keys: torch.Tensor, ctx: ShardContext, key: int, cut: TieCut) -> torch.Tensor:
    t, explicit = bound_rule(key, cut, ctx)
    if explicit:
        assert cut is not None
        return explicit_in_top(keys, ctx, key, cut)
    return keys >= t


def magnitude_mask(delta: torch.Tensor, ranks: TrimRanks, thresholds: dict[Bound, int],
                   cuts: dict[Bound, tuple[int, int]], ctx: ShardContext) -> torch.Tensor:
    """Keep-mask from exact whole-tensor threshold keys and tie cuts (the torch formulation):
    inside the top ``low`` and outside the top ``high`` of the (magnitude, position) order."""
    if ranks.nothing:
        return torch.zeros(delta.shape, dtype=torch.bool)
    keys = magnitude_keys(delta)
    mask = torch.ones(keys.shape, dtype=torch.bool)
    if ranks.low is not None:
        mask &= in_top(keys, ctx, thresholds[Bound.LOW], cuts.get(Bound.LOW))
    if ranks.high is not None:
        mask &= ~in_top(keys, ctx, thresholds[Bound.HIGH], cuts.get(Bound.HIGH))
    return mask.reshape(delta.shape)
