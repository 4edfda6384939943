"""Model Stock (Jang et al. 2024): interpolate the experts' average towards the base by the
angle between their task vectors.

    o_i = x_i - base;  cos = mean over pairs i<j of <o_i, o_j> / max(|o_i| |o_j|, 1e-6), clamped to [-1, 1]
    t = N cos / (1 + (N - 1) cos);  out = t * mean_i(x_i) + (1 - t) * base

Over the whole flattened tensor by default: one reduction round of float64 partial Gram
matrices over the canonical chunks, reduced in chunk order. With ``filter_wise`` every
last-dim vector gets its own t (mergekit's ``dim=-1``); rows are whole in every shard, so
that is shard-local except for 1-D tensors, which mergekit treats as one vector (a round).

As mergekit 0.1.5, everything after the sums runs in the compute dtype, each op rounded: the
products of the task vectors are rounded to it before they are summed (``(a * b).sum()``),
the norms, cosines, their mean and t are compute-dtype values, and the blend is
``t * (sum_i x_i / N) + (1 - t) * base``. mergekit sums in float32 in torch's order; here the
sums are float64 over canonical chunks, rounded to the compute dtype, which can move t by an
ulp, so model stock agrees with mergekit to within 1 ulp rather than bit for bit.

The Gram matrices and the blend are fused loops (:mod:`distmerge.methods.kernels.blend_loops`)
that read the rows in their compute dtype and give the floats of the torch formulation
(:func:`gram_reference`, :func:`blend_reference`); every Gram sum adds in the lane order
(``sum_orders.lane_sum``), which a loop keeps in SIMD registers. float16 compute has no kernel
mode and runs the torch formulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from distmerge.methods import kernels, stack_sums
from distmerge.methods.base import (
    MergeMethod,
    ParamSpec,
    Partials,
    Reductions,
    ShardContext,
    TensorParams,
    compute_dtype,
    rows_in_compute,
    sums_prove_finite,
)
from distmerge.methods.kernels.blend_loops import stock_blend, stock_grams
from distmerge.methods.kernels.rounding import stored_array
from distmerge.methods.kernels.sum_orders import lane_sum

NORM_FLOOR = 1e-6


def stock_t(gram: torch.Tensor, dtype: torch.dtype = torch.float64,
            place: tuple[int, int] | None = None) -> torch.Tensor:
    """t from float64 Gram matrices ``[..., N, N]`` of the task vectors (off the diagonal: sums
    of products rounded to ``dtype``; on it: sums of exact squares), in ``dtype`` as mergekit
    computes it. ``place``: for one matrix per last-dim vector of a shard, where its first
    vector sits among the tensor's and how many the tensor has: mergekit's mean of the pairs'
    cosines is a stacked mean over the whole tensor's vectors, whose order depends on the
    position (``stack_sums``)."""
    n = gram.shape[-1]
    norms = torch.sqrt(torch.diagonal(gram, dim1=-2, dim2=-1)).to(dtype)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            product = norms[..., i] * norms[..., j]
            c = gram[..., i, j].to(dtype) / torch.clamp(product, min=NORM_FLOOR)
            cosines.append(c.clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0) if place is None else stack_sums.stack_mean(cosines, *place)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # mergekit keeps the base there
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)


def gram_reference(base: torch.Tensor, experts: Sequence[torch.Tensor], rows: bool) -> torch.Tensor:
    """Gram matrix of the task vectors as torch ops: of the whole rows (``[n, n]``), or of each
    last-dim vector (``rows``: ``[..., n, n]``). The kernels' formulation: float64 sums in the
    lane order of the float64 squares on the diagonal (``torch.norm`` upcasts; exact but for
    float64 offsets), of the compute dtype's rounded products off it (``(a * b).sum()``)."""
    offsets = [(x - base).reshape(-1) if not rows else x - base for x in experts]
    n = len(offsets)
    gram = torch.empty(offsets[0].shape[:-1] + (n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            products = offsets[i].double() ** 2 if i == j else (offsets[i] * offsets[j]).double()
            gram[..., i, j] = gram[..., j, i] = lane_sum(products)
    return gram


def blend_reference(base: torch.Tensor, experts: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """mergekit's ``t * average + (1 - t) * w_0`` as torch ops, ``average = sum(ws) / count``
    (Python's sum starts at 0). The kernels' formulation."""
    avg = experts[0] + 0
    for x in experts[1:]:
        avg = avg + x
    avg = avg / len(experts)
    return t * avg + (1 - t) * base


def _gram(base: torch.Tensor, experts: Sequence[torch.Tensor], rows: bool, ctx: ShardContext) -> torch.Tensor:
    """:func:`gram_reference`'s matrices, by the fused kernel where the compute dtype has one."""
    mode = kernels.kernel_mode(compute_dtype(base, ctx))
    if mode is None or base.numel() == 0:
        return gram_reference(*rows_in_compute(base, experts, ctx), rows)
    n = len(experts)
    row_len = base.shape[-1] if rows else base.numel()
    out = np.empty((base.numel() // row_len, n, n), dtype=np.float64)
    stock_grams(stored_array(base), tuple(stored_array(x) for x in experts), kernels.mode_tag(mode), row_len, out)
    return torch.from_numpy(out).reshape((base.shape[:-1] if rows else ()) + (n, n))


def _blend(base: torch.Tensor, experts: Sequence[torch.Tensor], t: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """:func:`blend_reference` (``t``: one value, or one per last-dim vector), by the fused
    kernel where the compute dtype has one."""
    dtype = compute_dtype(base, ctx)
    mode = kernels.kernel_mode(dtype)
    if mode is None:
        return blend_reference(*rows_in_compute(base, experts, ctx),
                               t.reshape(t.shape + (1,) * (t.dim() > 0)))
    kd = kernels.kernel_dtype(dtype)
    omt = 1 - t  # in the compute dtype, as torch rounds it
    out = np.empty(base.numel(), dtype=np.float64 if kd == torch.float64 else np.float32)
    stock_blend(stored_array(base), tuple(stored_array(x) for x in experts), kernels.mode_tag(mode),
                kernels.as_array(t, kd), kernels.as_array(omt, kd), kernels.scalar(len(experts), dtype)[()],
                out)
    return torch.from_numpy(out).reshape(base.shape).to(dtype)


@dataclass
class GramPartials(Partials):
    """One chunk's float64 Gram matrix of the task vectors (None: filter-wise, nothing to collect)."""

    gram: torch.Tensor | None


@dataclass(kw_only=True)
class ModelStockReductions(Reductions):
    """The whole tensor's Gram matrix of the task vectors (None: filter-wise, each row computes its own)."""

    gram: torch.Tensor | None = None


class ModelStock(MergeMethod):
    name = "model_stock"
    uses_base = True
    reads_stored_rows = True
    min_experts = 2
    global_parameters = {"filter_wise": ParamSpec(False, bool)}
    model_parameters = {}

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        if params.global_["filter_wise"] and shape is not None and len(shape) >= 2:
            return 0
        return 1

    @staticmethod
    def _whole(params: TensorParams, shape: tuple[int, ...]) -> bool:
        return not params.global_["filter_wise"] or len(shape) < 2

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> GramPartials:
        assert base is not None
        if not self._whole(params, ctx.shape):
            return GramPartials(None)  # filter_wise on >= 2-D: shard-local, nothing to collect
        gram = _gram(base, experts, rows=False, ctx=ctx)
        # the diagonal sums the exact squares of every delta x - base: finite, so are the rows
        return GramPartials(gram, inputs_finite=sums_prove_finite([gram.diagonal()]))

    def reduce(self, partials: Sequence[Partials], params: TensorParams, shape: tuple[int, ...],
               round_: int, previous: Reductions | None) -> ModelStockReductions:
        if not self._whole(params, shape):
            return ModelStockReductions()
        grams = [cast(GramPartials, c).gram for c in partials]
        assert all(g is not None for g in grams)
        gram = grams[0].clone()
        for g in grams[1:]:
            gram += g
        return ModelStockReductions(gram=gram)

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        assert base is not None
        if self._whole(params, ctx.shape):
            assert isinstance(reduced, ModelStockReductions) and reduced.gram is not None
            dtype, gram = compute_dtype(base, ctx), reduced.gram
            t = reduced.derive(("t", dtype), lambda: stock_t(gram, dtype))  # once per tensor
        else:  # one t per last-dim vector
            vector = ctx.shape[-1]
            t = stock_t(_gram(base, experts, rows=True, ctx=ctx), compute_dtype(base, ctx),
                        (ctx.element_start // vector, ctx.tensor_numel // vector))
        return _blend(base, experts, t, ctx)
