"""DELLA's rank-dependent sampling: keep probability grows with the magnitude rank in a row.

As mergekit's ``della_magprune``: ranks run along dim 1 (for a matrix: within each row), so for
tensors of two or more dimensions the keep rule is shard-local and needs no reduction round
unless the L1 rescale does. A 1-D tensor is one row: its ``DELLA`` round ships each chunk's
deltas and uniform draws, and the reduce ranks the whole vector once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distmerge.errors import ConfigError
from distmerge.methods import kernels, reductions
from distmerge.methods.base import Params, ParamSpec, ShardContext, TensorParams, delta_in_compute
from distmerge.methods.random_stream import keep_uniform_tensor, keep_uniforms, stream_key
from distmerge.methods.sparsification.base import (
    Divisor,
    KernelTerms,
    Rescale,
    Sparsifier,
    stream_model,
)
from distmerge.methods.sparsification.rounds import (
    ChunkPartials,
    Round,
    TaskVectorReductions,
    VectorPartial,
)


def rank_table(n: int, density: float, epsilon: float) -> torch.Tensor:
    """The keep probability of each 0-based rank ``0 .. n-1`` in a row of ``n`` (float32).

    As mergekit: ranks are normalised to [0, 1] and mapped linearly onto ``[density - epsilon,
    density + epsilon]``; a row of one element gets the middle probability ``density`` (mergekit
    divides 0 by 0). The same torch ops as the per-element formulation, on the ranks themselves,
    so each entry is the float that element's probability would be.
    """
    if n < 2:
        rank_norm = torch.full((1,), 0.5, dtype=torch.float32)
    else:
        # ranks are 0..n-1 here, i.e. mergekit's (rank - min_rank); / (max_rank - min_rank)
        rank_norm = (torch.arange(n, dtype=torch.float32) / float(n - 1)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities from magnitude ranks along dim 1 (mergekit's ``della_magprune``).

    As mergekit: tensors with fewer than 2 dims are one row; ranks are ascending float32
    magnitudes along dim 1 (for a matrix: within each row), mapped to probabilities by
    :func:`rank_table`. Ties in magnitude are ranked by position (a stable sort, computed by
    :func:`kernels.rank_values`) where mergekit's argsort is arbitrary.
    """
    shape = tuple(delta.shape)
    n = kernels.block_dims(shape)[1]
    values = kernels.as_array(delta, torch.float32)  # magnitudes are taken in the kernel
    probs = kernels.rank_values(values, shape, rank_table(n, density, epsilon).numpy())
    return torch.from_numpy(probs).reshape(shape)


def della_mask(probs: torch.Tensor, seed: int, tensor: str, model: int, start: int) -> torch.Tensor:
    """Keep iff the element's uniform draw is below its keep probability."""
    u = keep_uniform_tensor(seed, tensor, model, start, tuple(probs.shape))
    return u < probs.to(torch.float64)


def della_mask_draws(ctx: ShardContext, e: int, count: int) -> torch.Tensor:
    """The uniform draws of a 1-D DELLA chunk (shipped to the reduce, which ranks the vector)."""
    return torch.from_numpy(keep_uniforms(ctx.seed, ctx.tensor, stream_model(ctx, e), ctx.element_start, count))


class DellaSampling(Sparsifier):
    """DELLA (``della``, ``della_linear``): keep probability ``density +- epsilon`` by rank."""

    name = "della"
    holds_masks = True  # a radix rank of every row and a draw per element

    def held_mask_bytes(self, params: TensorParams, shape: tuple[int, ...]) -> int:
        # a 1-D tensor's round ranks the whole vector in its reduce and keeps no mask
        return super().held_mask_bytes(params, shape) if len(shape) >= 2 else 0

    def model_parameters(self) -> dict[str, ParamSpec]:
        return super().model_parameters() | {"epsilon": ParamSpec(0.15, float, lambda v: v >= 0.0, "epsilon >= 0")}

    def kind_rounds(self, l1: bool, shape: tuple[int, ...] | None) -> list[Round]:
        # shard-local for >= 2-D tensors unless the L1 rescale needs whole-tensor sums
        return [] if (shape is not None and len(shape) >= 2 and not l1) else [Round.DELLA]

    def validate(self, params: TensorParams, where: str, inputs: Sequence[str] = ()) -> None:
        for i, p in enumerate(params.experts):
            d, eps = p["density"], p["epsilon"]
            if d < 1.0 and not (d - eps > 0.0 and d + eps < 1.0):
                model = f"{inputs[i]}.parameters" if i < len(inputs) else f"model {i + 1} besides the base"
                raise ConfigError(
                    f"{model} ({where}): density {d} and epsilon {eps} give keep "
                    f"probabilities in [{d - eps:g}, {d + eps:g}]; density - epsilon and density + epsilon "
                    "must both lie strictly between 0 and 1 (lower epsilon)"
                )

    # ---- the DELLA round: the whole vector (1-D), or the L1 norms ----------------------------

    def partial(
        self, round_: Round, e: int, base: torch.Tensor, x: torch.Tensor, p: Params, ctx: ShardContext,
        previous: TaskVectorReductions | None,
    ) -> Any:
        assert round_ is Round.DELLA, round_
        if len(ctx.shape) >= 2:
            return self.l1_partial(e, base, x, p, ctx, previous)
        # 1-D: the only "row" is the whole vector; ship the chunk's deltas and draws
        delta = delta_in_compute(x, base, ctx)
        return VectorPartial(delta.reshape(-1).clone(), della_mask_draws(ctx, e, delta.numel()))

    def reduce_into(
        self, out: TaskVectorReductions, round_: Round, partials: Sequence[ChunkPartials[Any]],
        params: TensorParams, shape: tuple[int, ...],
    ) -> None:
        assert round_ is Round.DELLA, round_
        if len(shape) >= 2:
            self.reduce_l1(out, partials, params)
            return
        probs: dict[int, torch.Tensor] = {}
        norms: dict[int, tuple[float, float]] = {}
        for e, p in enumerate(params.experts):
            if not self.active(p):
                continue
            delta = torch.cat([c.experts[e].delta for c in partials])
            u = torch.cat([c.experts[e].draws for c in partials])
            probs[e] = della_probabilities(delta, p["density"], p["epsilon"])
            kept = delta * (u < probs[e].to(torch.float64))
            norms[e] = (reductions.sum_abs(delta), reductions.sum_abs(kept))
        out.probs = probs
        if Rescale.of(params.global_) is Rescale.L1:
            out.l1_norms = norms

    # ---- the keep rule --------------------------------------------------------------------

    def keep(
        self, e: int, delta: torch.Tensor, p: Params, ctx: ShardContext, reduced: TaskVectorReductions | None,
    ) -> tuple[torch.Tensor, Divisor]:
        if len(ctx.shape) < 2:
            assert reduced is not None and e in reduced.probs, "1-D DELLA needs its reduction round"
            lo = ctx.element_start
            probs = reduced.probs[e][lo:lo + delta.numel()].reshape(delta.shape)
        else:
            probs = della_probabilities(delta, p["density"], p["epsilon"])
        return della_mask(probs, ctx.seed, ctx.tensor, stream_model(ctx, e), ctx.element_start), probs

    def kernel_keep(
        self, e: int, x: torch.Tensor, base: torch.Tensor, p: Params, ctx: ShardContext,
        reduced: TaskVectorReductions | None,
    ) -> tuple[KernelTerms, Divisor]:
        if len(ctx.shape) < 2:
            mask, divide_by = self.keep(e, delta_in_compute(x, base, ctx), p, ctx, reduced)
            return KernelTerms(mask=mask.reshape(-1).numpy()), divide_by
        # one pass of kernels.della_keep: the keep rule of ``keep`` with no rank or draw tensor
        shape = tuple(x.shape)
        table = rank_table(kernels.block_dims(shape)[1], p["density"], p["epsilon"])
        key = stream_key(ctx.seed, ctx.tensor, stream_model(ctx, e))
        mask, probs = kernels.della_keep(*kernels.delta_arrays(base, x, ctx.compute), shape, table.numpy(), key, ctx.element_start)
        return KernelTerms(mask=mask), torch.from_numpy(probs).reshape(shape)
