"""Karcher mean: the weighted Riemannian mean of the models' directions on the unit sphere,
scaled by their mean norm (mergekit 0.1.5's ``karcher``; every input weighs 1/N, and a
configured base model is one more input, as in mergekit, whose plan appends it last).

    n_i = |x_i| (float32), u_i = x_i / n_i;  valid: n_i > tol  (none: out = 0)
    m = sum_valid a_i u_i (a = 1/N renormalized over the valid),  m /= |m|  (|m| < tol: m = u_first)
    repeat max_iter times:
        d_i = clamp(<m, u_i>, -1, 1);  th_i = acos(d_i);  g = sum_{th_i >= tol} a_i th_i / sin(th_i) (u_i - d_i m)
        stop if |g| < tol;  m = cos|g| m + sin|g| g / |g|;  m /= |m| (if |m| > tol)
    out = (sum_i n_i / N) m

Each quantity is a whole-tensor sum: round 0 the norms, round 1 |m|, then ONE round per
iteration, at most ``max_iter``: the dots <m, u_i>, plus the Gram sums <u_i, u_j> and <m, m>
from which |g| and the updated |m| follow without another read (g and the update are linear
in m and the u_i). A converged tensor's reduction says ``complete`` and its later rounds are
skipped. The iterate m is never stored: every round (and the merge) replays the elementwise
updates on its rows from the reduced scalars, with mergekit's torch expressions in the compute
dtype, so the same m arises in every shard. Sums are float64 over canonical chunks, rounded
once to the dtype mergekit's reduction returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import torch

from distmerge.methods import reductions, scalars
from distmerge.methods.base import (
    MergeMethod,
    ParamSpec,
    Partials,
    Reductions,
    ShardContext,
    TensorParams,
)


@dataclass
class KarcherPartials(Partials):
    sums: list[float]  # round 0: |x_i|^2; round 1: |m|^2; iterations: <m,u_i>, <u_i,u_j> (i<=j), <m,m>
    dtype: torch.dtype


@dataclass
class Step:
    """One iteration's scalars: per valid input its dot (compute dtype) and tangent coefficient
    (None: skipped, theta < tol), then the update's cos, sin, |g| and the new |m|."""

    dots: list[torch.Tensor]
    coefs: list[torch.Tensor | None]
    tangent_norm: torch.Tensor
    unit_norm: torch.Tensor | None


@dataclass(kw_only=True)
class KarcherReductions(Reductions):
    norms: list[torch.Tensor] = field(default_factory=list)  # float32 (float64 for float64 inputs)
    valid: list[int] = field(default_factory=list)
    mean_norm: torch.Tensor | None = None
    steps: list[Step] = field(default_factory=list)


class Karcher(MergeMethod):
    name = "karcher"
    uses_base = False
    base_optional = True
    min_experts = 1
    global_parameters = {
        "max_iter": ParamSpec(10, int, check=lambda v: 0 <= v <= 1000, allowed="0 <= max_iter <= 1000"),
        "tol": ParamSpec(1e-5, check=lambda v: v >= 0, allowed="tol >= 0"),
    }
    model_parameters = {}

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        # whether a base is configured shows only in the rows (None or not): a lone input ends in round 0
        return 2 + params.global_["max_iter"]

    @staticmethod
    def _inputs(base, experts):
        return list(experts) + ([] if base is None else [base])

    @staticmethod
    def _units(tensors, red: KarcherReductions):
        return [torch.zeros_like(t) if float(n) == 0.0 else (t / n).to(t.dtype)
                for t, n in zip(tensors, red.norms, strict=True)]

    @staticmethod
    def _alphas(red: KarcherReductions, n: int) -> list[float]:
        valid = [1.0 / n] * len(red.valid)
        total = sum(valid)
        return [a / total for a in valid]

    def _mean(self, units, red: KarcherReductions, upto: int, tol: float) -> torch.Tensor:
        """The iterate after ``upto`` iterations (``upto`` <= len(red.steps)), replayed elementwise."""
        valid = [units[i] for i in red.valid]
        alphas = self._alphas(red, len(units))
        mean = torch.zeros_like(valid[0])
        for alpha, unit in zip(alphas, valid, strict=True):
            mean += alpha * unit
        if red.mean_norm is None:
            return mean
        mean = valid[0].clone() if float(red.mean_norm) < tol else (mean / red.mean_norm).to(mean.dtype)
        for step in red.steps[:upto]:
            tangent = torch.zeros_like(mean)
            for unit, dot, coef in zip(valid, step.dots, step.coefs, strict=True):
                if coef is not None:
                    tangent += coef * (unit - dot * mean)
            tn = step.tangent_norm
            mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
            if step.unit_norm is not None:
                mean = (mean / step.unit_norm).to(mean.dtype)
        return mean

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> KarcherPartials:
        tensors = self._inputs(base, experts)
        dtype = tensors[0].dtype
        if round_ == 0:
            return KarcherPartials([reductions.dot(t, t) for t in tensors], dtype)
        red = cast(KarcherReductions, previous)
        units = self._units(tensors, red)
        mean = self._mean(units, red, len(red.steps), params.global_["tol"])
        if round_ == 1:
            return KarcherPartials([reductions.dot(mean, mean)], dtype)
        valid = [units[i] for i in red.valid]
        sums = [reductions.dot(mean, u) for u in valid]
        sums += [reductions.dot(valid[i], valid[j]) for i in range(len(valid)) for j in range(i, len(valid))]
        return KarcherPartials(sums + [reductions.dot(mean, mean)], dtype)

    def reduce(self, partials: Sequence[Partials], params: TensorParams, shape: tuple[int, ...],
               round_: int, previous: Reductions | None) -> KarcherReductions:
        chunks = cast(Sequence[KarcherPartials], partials)
        dtype = chunks[0].dtype
        tol = params.global_["tol"]
        norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        sums = [reductions.ordered_sum([c.sums[i] for c in chunks]) for i in range(len(chunks[0].sums))]
        if round_ == 0:
            norms = [scalars.sqrt_as(s, norm_dtype) for s in sums]
            valid = [i for i, n in enumerate(norms) if float(n) > tol]
            return KarcherReductions(norms=norms, valid=valid, complete=not valid or len(norms) == 1)
        out = replace(cast(KarcherReductions, previous), steps=list(cast(KarcherReductions, previous).steps))
        if round_ == 1:
            out.mean_norm = scalars.sqrt_as(sums[0], norm_dtype)
            out.complete = params.global_["max_iter"] == 0
            return out
        out.steps.append(self._step(sums, len(out.valid), self._alphas(out, len(out.norms)), dtype, norm_dtype, tol))
        out.complete = out.steps[-1].unit_norm is None and float(out.steps[-1].tangent_norm) < tol
        if out.complete:
            out.steps.pop()  # mergekit breaks before updating: the last step only said "converged"
        return out

    @staticmethod
    def _step(sums, n, alphas, dtype, norm_dtype, tol) -> Step:
        raw = sums[:n]
        gram = torch.zeros(n, n, dtype=torch.float64)
        pairs = iter(sums[n:-1])
        for i in range(n):
            for j in range(i, n):
                gram[i, j] = gram[j, i] = next(pairs)
        mm = sums[-1]
        dots, coefs = [], []
        for alpha, d in zip(alphas, raw, strict=True):
            dot = torch.clamp(scalars.as_dtype(d, dtype), -1.0, 1.0)
            theta = torch.arccos(dot)
            dots.append(dot)
            coefs.append(None if theta.item() < tol else alpha * (theta / torch.sin(theta)))
        # |g|^2 and <m, g> from the Gram sums (g = sum_i c_i (u_i - d_i m))
        c = torch.tensor([0.0 if k is None else float(k) for k in coefs], dtype=torch.float64)
        d = torch.tensor([float(x) for x in dots], dtype=torch.float64)
        mu = torch.tensor(raw, dtype=torch.float64)
        gg = float(c @ gram @ c - 2 * (c @ mu) * (c @ d) + (c @ d) ** 2 * mm)
        mg = float(c @ mu - (c @ d) * mm)
        tn = scalars.sqrt_as(max(gg, 0.0), norm_dtype)
        if float(tn) < tol:
            return Step(dots, coefs, tn, None)
        a, b = float(torch.cos(tn)), float(torch.sin(tn)) / float(tn)
        unit = math.sqrt(max(a * a * mm + 2 * a * b * mg + b * b * gg, 0.0))
        unit_norm = scalars.as_dtype(unit, norm_dtype)
        return Step(dots, coefs, tn, unit_norm if float(unit_norm) > tol else None)

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        tensors = self._inputs(base, experts)
        if len(tensors) == 1:
            return tensors[0].clone()
        red = cast(KarcherReductions, reduced)
        if not red.valid:
            return sum(t * 0 for t in tensors)
        mean = self._mean(self._units(tensors, red), red, len(red.steps), params.global_["tol"])
        scale = sum(alpha * norm for alpha, norm in zip([1.0 / len(tensors)] * len(tensors), red.norms, strict=True))
        return scale * mean
