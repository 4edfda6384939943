"""SLERP between the base model and one other: one angle for the whole flattened tensor.

    cos = <v0, v1> / (|v0| |v1|)     (a norm <= 1e-8 is left unnormalised, as mergekit)
    |cos| > 0.9995:  out = (1 - t) v0 + t v1
    else:            theta = acos(cos); out = sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1

The dot product and norms are whole-tensor sums: one reduction round of float64 partial
sums over the canonical chunks, reduced in chunk order, so every row shard uses the same two
coefficients. As mergekit 0.1.5, the angle and the coefficients are then computed in float32
(float64 for float64 inputs) and the blend ``s0 * v0 + s1 * v1`` runs in float32 and is
rounded to the compute dtype once. mergekit sums the norms and the dot product in float32;
here they are float64 sums rounded to float32, which can move a coefficient by an ulp, so
SLERP agrees with mergekit to within 1 ulp of the output rather than bit for bit.

Both passes are fused loops (:mod:`distmerge.methods.kernels.blend_loops`) that read the rows
in their compute dtype: the three sums in one pass, in numpy's order (the same floats as
``reductions.dot``), and the blend as the same two rounded products and rounded sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from distmerge.methods import reductions
from distmerge.methods.base import (
    MergeMethod,
    ParamSpec,
    Partials,
    Reductions,
    ShardContext,
    TensorParams,
    compute_dtype,
    sums_prove_finite,
)
from distmerge.methods.kernels.blend_loops import slerp_blend, slerp_sums
from distmerge.methods.kernels.rounding import stored_array

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def blend_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where mergekit computes SLERP for ``dtype`` inputs: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slerp_coefficients(t: float, dot: float, norm0: float, norm1: float,
                       dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """``(s0, s1)`` with ``out = s0 * v0 + s1 * v1`` (the linear fallback included), computed
    as mergekit 0.1.5's ``slerp`` does in ``dtype`` (float32, or float64 for float64 inputs)."""
    def f(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64).to(dtype)

    n0 = norm0 if norm0 > NORM_EPS else 1.0
    n1 = norm1 if norm1 > NORM_EPS else 1.0
    cos = f(max(-1.0, min(1.0, dot / n0 / n1)))
    tt = f(t)
    if bool(cos.abs() > DOT_THRESHOLD):
        return float(1 - tt), float(tt)
    theta = torch.acos(cos)
    sin_theta = torch.sin(theta)
    return float(torch.sin((1 - tt) * theta) / sin_theta), float(torch.sin(tt * theta) / sin_theta)


@dataclass
class SlerpPartials(Partials):
    """One chunk's float64 sums: ``<v0, v1>``, ``<v0, v0>``, ``<v1, v1>``."""

    dot: float
    sq0: float
    sq1: float


@dataclass(kw_only=True)
class SlerpReductions(Reductions):
    """The whole-tensor float64 dot product and norms every shard derives its coefficients from."""

    dot: float
    norm0: float
    norm1: float


class Slerp(MergeMethod):
    name = "slerp"
    uses_base = True
    reads_stored_rows = True
    min_experts = 1
    max_experts = 1
    global_parameters = {"t": ParamSpec(None)}
    model_parameters = {}

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        return 1

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> SlerpPartials:
        assert base is not None
        sums = np.empty(3, dtype=np.float64)  # reductions.dot's three sums, in one pass
        slerp_sums(stored_array(base), stored_array(experts[0]), sums)
        # the sums of squares hold a term of every element of both rows (slerp takes one model)
        return SlerpPartials(float(sums[0]), float(sums[1]), float(sums[2]),
                             inputs_finite=sums_prove_finite([float(sums[1]), float(sums[2])]))

    def reduce(self, partials: Sequence[Partials], params: TensorParams, shape: tuple[int, ...],
               round_: int, previous: Reductions | None) -> SlerpReductions:
        chunks = cast(Sequence[SlerpPartials], partials)
        dot = reductions.ordered_sum([c.dot for c in chunks])
        sq0 = reductions.ordered_sum([c.sq0 for c in chunks])
        sq1 = reductions.ordered_sum([c.sq1 for c in chunks])
        return SlerpReductions(dot=dot, norm0=math.sqrt(sq0), norm1=math.sqrt(sq1))

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        assert base is not None and isinstance(reduced, SlerpReductions)
        dtype = compute_dtype(base, ctx)
        acc = blend_dtype(dtype)
        s0, s1 = slerp_coefficients(params.global_["t"], reduced.dot, reduced.norm0, reduced.norm1, acc)
        kind = np.float64 if acc == torch.float64 else np.float32
        out = np.empty(base.numel(), dtype=kind)
        slerp_blend(stored_array(base), stored_array(experts[0]), kind(s0), kind(s1), out)
        return torch.from_numpy(out).reshape(base.shape).to(dtype)
