"""DARE's random drop: keep each delta element with probability ``density``.

The draw of an element comes from a counter-based stream keyed by (seed, tensor, model) at the
element's position (:mod:`distmerge.methods.random_stream`), so the mask is the same for any row
block; no reduction round is needed except the L1 rescale's.
"""

from __future__ import annotations

import torch

from distmerge.methods.base import Params, ShardContext
from distmerge.methods.random_stream import bernoulli_mask, keep_stream
from distmerge.methods.sparsification.base import Divisor, KernelTerms, Sparsifier, stream_model
from distmerge.methods.sparsification.rounds import TaskVectorReductions


def dare_mask(delta: torch.Tensor, density: float, seed: int, tensor: str, model: int, start: int) -> torch.Tensor:
    """DARE: keep each element with probability ``density``, drawn from its position's stream."""
    return bernoulli_mask(seed, tensor, model, start, tuple(delta.shape), density)


class RandomDrop(Sparsifier):
    """DARE (``dare_linear``, ``dare_ties``): a Bernoulli(``density``) keep-mask per element."""

    name = "random"
    holds_masks = True  # two Philox4x32 draws per element: 1.5-2x a mask read (benchmarks/kernel_costs.py)

    def keep(
        self, e: int, delta: torch.Tensor, p: Params, ctx: ShardContext, reduced: TaskVectorReductions | None,
    ) -> tuple[torch.Tensor, Divisor]:
        return dare_mask(delta, p["density"], ctx.seed, ctx.tensor, stream_model(ctx, e), ctx.element_start), p["density"]

    def kernel_keep(
        self, e: int, x: torch.Tensor, base: torch.Tensor, p: Params, ctx: ShardContext,
        reduced: TaskVectorReductions | None,
    ) -> tuple[KernelTerms, Divisor]:
        # The kernels draw the mask block by block where they use it: no mask of the shard is made.
        stream = keep_stream(ctx.seed, ctx.tensor, stream_model(ctx, e), ctx.element_start, x.numel(), p["density"])
        return KernelTerms(stream=stream), p["density"]
