"""SLERP between the base model and one other: one angle for the whole flattened tensor.

    cos = <v0, v1> / (|v0| |v1|)     (a norm <= 1e-8 is left unnormalised, as mergekit)
    |cos| > 0.9995:  out = (1 - t) v0 + t v1
    else:            theta = acos(cos); out = sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1

The dot product and norms are whole-tensor sums: one reduction round of float64 partial
sums over the canonical chunks, reduced in chunk order, so every row shard uses the same two
coefficients. mergekit computes them in float32 numpy; float64 is at least as exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from distmerge.methods import reductions
from distmerge.methods.base import (
    MergeMethod,
    ParamSpec,
    Partials,
    Reductions,
    ShardContext,
    TensorParams,
)

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_coefficients(t: float, dot: float, norm0: float, norm1: float) -> tuple[float, float]:
    """``(s0, s1)`` with ``out = s0 * v0 + s1 * v1`` (the linear fallback included)."""
    n0 = norm0 if norm0 > NORM_EPS else 1.0
    n1 = norm1 if norm1 > NORM_EPS else 1.0
    cos = dot / n0 / n1
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta


@dataclass
class SlerpPartials(Partials):
    """One chunk's float64 sums: ``<v0, v1>``, ``<v0, v0>``, ``<v1, v1>``."""

    dot: float
    sq0: float
    sq1: float


@dataclass(kw_only=True)
class SlerpReductions(Reductions):
    """The two coefficients every shard uses: ``out = s0 * v0 + s1 * v1``."""

    s0: float
    s1: float


class Slerp(MergeMethod):
    name = "slerp"
    uses_base = True
    min_experts = 1
    max_experts = 1
    global_parameters = {"t": ParamSpec(None)}
    model_parameters = {}

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        return 1

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> SlerpPartials:
        assert base is not None
        v1 = experts[0]
        return SlerpPartials(reductions.dot(base, v1), reductions.dot(base, base), reductions.dot(v1, v1))

    def reduce(self, partials: Sequence[Partials], params: TensorParams, shape: tuple[int, ...],
               round_: int, previous: Reductions | None) -> SlerpReductions:
        chunks = cast(Sequence[SlerpPartials], partials)
        dot = reductions.ordered_sum([c.dot for c in chunks])
        sq0 = reductions.ordered_sum([c.sq0 for c in chunks])
        sq1 = reductions.ordered_sum([c.sq1 for c in chunks])
        s0, s1 = slerp_coefficients(params.global_["t"], dot, math.sqrt(sq0), math.sqrt(sq1))
        return SlerpReductions(s0=s0, s1=s1)

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        assert base is not None and isinstance(reduced, SlerpReductions)
        out = base * reduced.s0
        return out.add_(experts[0] * reduced.s1)
