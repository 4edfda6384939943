"""Which delta elements survive sparsification, one row block at a time.

Three families, as in mergekit: magnitude trimming (TIES: keep the k largest |delta| of the
whole tensor; breadcrumbs: drop the largest ``gamma`` fraction, keep the next ``density``),
random dropping (DARE: keep with probability ``density``), and DELLA's rank-dependent
sampling (keep probability grows with the magnitude rank within a row). Whole-tensor
quantities come in as statistics (thresholds, keep probabilities of 1-D tensors), so every
function here is exact for any row block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distmerge.methods.random_stream import bernoulli_mask, uniform_tensor
from distmerge.methods.selection import magnitude_keys


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
    def ranks(self) -> dict[str, int]:
        return {n: r for n, r in (("low", self.low), ("high", self.high)) if r is not None}


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


def magnitude_mask(delta: torch.Tensor, ranks: TrimRanks, thresholds: dict[str, int]) -> torch.Tensor:
    """Keep-mask from exact whole-tensor threshold keys (see :mod:`selection`).

    Ties at a threshold are all treated alike (kept at the low one, dropped at the high one),
    so the mask does not depend on element order or sharding; mergekit's argsort breaks such
    ties arbitrarily. On continuous data the two agree exactly.
    """
    if ranks.nothing:
        return torch.zeros(delta.shape, dtype=torch.bool)
    keys = magnitude_keys(delta).reshape(delta.shape)
    mask: torch.Tensor | None = None
    if ranks.low is not None:
        mask = keys >= thresholds["low"]
    if ranks.high is not None:
        below = keys < thresholds["high"]
        mask = below if mask is None else mask & below
    return torch.ones(delta.shape, dtype=torch.bool) if mask is None else mask


def dare_mask(delta: torch.Tensor, density: float, seed: int, tensor: str, model: int, start: int) -> torch.Tensor:
    """DARE: keep each element with probability ``density``, drawn from its position's stream."""
    return bernoulli_mask(seed, tensor, model, start, tuple(delta.shape), density)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities from magnitude ranks along dim 1 (mergekit's ``della_magprune``).

    As mergekit: tensors with fewer than 2 dims are one row; ranks are 1-based ascending
    magnitudes along dim 1 (for a matrix: within each row), normalised to [0, 1] and mapped
    linearly onto ``[density - epsilon, density + epsilon]``, in float32. Ties in magnitude
    are ranked by position (a stable sort) where mergekit's argsort is arbitrary; a
    dimension of length 1 gets the middle probability ``density`` (mergekit divides 0 by 0).
    """
    shape = delta.shape
    x = delta.reshape(1, -1) if delta.dim() < 2 else delta
    mags = x.abs().to(torch.float32)
    n = x.shape[1]
    if n < 2:
        rank_norm = torch.full(mags.shape, 0.5, dtype=torch.float32)
    else:
        order = torch.argsort(mags, dim=1, stable=True)
        steps = torch.arange(n, dtype=torch.float32).reshape((1, n) + (1,) * (x.dim() - 2)).expand(order.shape)
        ranks = torch.empty(mags.shape, dtype=torch.float32).scatter_(1, order, steps.contiguous())
        # ranks are 0..n-1 here, i.e. mergekit's (rank - min_rank); / (max_rank - min_rank)
        rank_norm = (ranks / float(n - 1)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs.reshape(shape)


def della_mask(probs: torch.Tensor, seed: int, tensor: str, model: int, start: int) -> torch.Tensor:
    """Keep iff the element's uniform draw is below its keep probability."""
    u = uniform_tensor(seed, tensor, model, start, tuple(probs.shape))
    return u < probs.to(torch.float64)
