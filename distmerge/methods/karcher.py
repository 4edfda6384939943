"""Karcher mean: the weighted Riemannian mean of the models' directions on the unit sphere,
scaled by their mean norm (mergekit 0.1.5's ``karcher``; every input weighs 1/N, and a
configured base model is one more input, as in mergekit, whose plan appends it last).

    n_i = |x_i| (float32), u_i = x_i / n_i;  valid: n_i > tol  (none: out = 0)
    m = sum_valid a_i u_i (a = 1/N renormalized over the valid),  m /= |m|  (|m| < tol: m = u_first)
    repeat max_iter times:
        d_i = clamp(<m, u_i>, -1, 1);  th_i = acos(d_i);  g = sum_{th_i >= tol} a_i th_i / sin(th_i) (u_i - d_i m)
        stop if |g| < tol;  m = cos|g| m + sin|g| g / |g|;  m /= |m| (if |m| > tol)
    out = (sum_i n_i / N) m

Each quantity is a whole-tensor sum: round 0 the norms, round 1 |m|, then THREE rounds per
iteration, at most ``3 * max_iter``: the dots <m, u_i>; |g| of the tangent as mergekit
materializes it (each elementwise step rounded to the compute dtype); the updated |m| likewise.
The norms must be those of the rounded vectors: in bf16 the rounding moves |g| and |m| by far
more than their last float32 bit (|m| comes out 1 +- 2e-3), so a closed form from Gram sums of
the exact vectors gave outputs many bf16 ulps from mergekit's. A converged tensor's
reduction says ``complete`` and its later rounds are skipped. The iterate m is never stored: every round (and the merge) replays the elementwise
updates on its rows from the reduced scalars, with mergekit's torch expressions in the compute
dtype, so the same m arises in every shard: by one fused loop per round
(:func:`fused_pass`, :mod:`distmerge.methods.kernels.karcher_loops`) in bf16, float32 and
float64, as torch ops (:meth:`Karcher.replay_partials`, which the loop equals bit for bit) in
float16. Sums are float64 over canonical chunks, rounded once to the dtype mergekit's reduction
returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import torch

from distmerge.methods import kernels, reductions, scalars
from distmerge.methods.base import (
    MergeMethod,
    ParamSpec,
    Partials,
    Reductions,
    ShardContext,
    TensorParams,
    compute_dtype,
    in_compute,
    sums_prove_finite,
)
from distmerge.methods.kernels.karcher_loops import karcher_pass
from distmerge.methods.kernels.rounding import stored_array

ROUNDS_PER_ITERATION = 3  # the dots, |g|, the updated |m|
DOTS, TANGENT, UNIT = range(ROUNDS_PER_ITERATION)


@dataclass
class KarcherPartials(Partials):
    sums: list[float]  # round 0: |x_i|^2; round 1: |m|^2; iterations: <m,u_i>, <u_i,u_j> (i<=j), <m,m>
    dtype: torch.dtype


@dataclass
class Step:
    """One iteration's scalars: per valid input its dot (compute dtype) and tangent coefficient
    (None: skipped, theta < tol), then |g| (None until its round) and the updated |m| (None:
    not divided, |m| <= tol; set in the iteration's last round)."""

    dots: list[torch.Tensor]
    coefs: list[torch.Tensor | None]
    tangent_norm: torch.Tensor | None = None
    unit_norm: torch.Tensor | None = None


@dataclass(kw_only=True)
class KarcherReductions(Reductions):
    norms: list[torch.Tensor] = field(default_factory=list)  # float32 (float64 for float64 inputs)
    valid: list[int] = field(default_factory=list)
    mean_norm: torch.Tensor | None = None
    steps: list[Step] = field(default_factory=list)  # finished iterations
    pending: Step | None = None  # the iteration whose |g| or updated |m| is being summed


class Karcher(MergeMethod):
    name = "karcher"
    uses_base = False
    base_optional = True
    reads_stored_rows = True
    min_experts = 1
    global_parameters = {
        "max_iter": ParamSpec(10, int, check=lambda v: 0 <= v <= 1000, allowed="0 <= max_iter <= 1000"),
        "tol": ParamSpec(1e-5, check=lambda v: v >= 0, allowed="tol >= 0"),
    }
    model_parameters = {}

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        # whether a base is configured shows only in the rows (None or not): a lone input ends in round 0
        return 2 + ROUNDS_PER_ITERATION * params.global_["max_iter"]

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

    def _mean(self, units, red: KarcherReductions, tol: float) -> torch.Tensor:
        """The iterate after the finished iterations of ``red``, replayed elementwise (before
        round 1 reduces |m|: the unnormalized initial mean)."""
        valid = [units[i] for i in red.valid]
        alphas = self._alphas(red, len(units))
        mean = torch.zeros_like(valid[0])
        for alpha, unit in zip(alphas, valid, strict=True):
            mean += alpha * unit
        if red.mean_norm is None:
            return mean
        mean = valid[0].clone() if float(red.mean_norm) < tol else (mean / red.mean_norm).to(mean.dtype)
        for step in red.steps:
            mean = self._normalized(self._updated(mean, self._tangent(mean, valid, step), step), step)
        return mean

    @staticmethod
    def _tangent(mean: torch.Tensor, valid: list[torch.Tensor], step: Step) -> torch.Tensor:
        """mergekit's tangent ``sum_i c_i (u_i - d_i m)``, accumulated in the compute dtype."""
        tangent = torch.zeros_like(mean)
        for unit, dot, coef in zip(valid, step.dots, step.coefs, strict=True):
            if coef is not None:
                tangent += coef * (unit - dot * mean)
        return tangent

    @staticmethod
    def _updated(mean: torch.Tensor, tangent: torch.Tensor, step: Step) -> torch.Tensor:
        """The exponential-map step ``cos|g| m + sin|g| g / |g|`` (not yet renormalized)."""
        tn = step.tangent_norm
        assert tn is not None
        return (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)

    @staticmethod
    def _normalized(mean: torch.Tensor, step: Step) -> torch.Tensor:
        return mean if step.unit_norm is None else (mean / step.unit_norm).to(mean.dtype)

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> KarcherPartials:
        tensors = self._inputs(base, experts)
        red = cast(KarcherReductions | None, previous)
        dtype = compute_dtype(tensors[0], ctx)
        sums = fused_pass(tensors, red, round_, params.global_["tol"], dtype)
        if sums is None:
            sums = self.replay_partials([in_compute(t, ctx) for t in tensors], params, round_, red)
        sums = cast(list[float], sums)
        # round 0 sums the squares of every input (the base too): they prove the rows finite
        return KarcherPartials(sums, dtype, inputs_finite=round_ == 0 and sums_prove_finite(sums))

    def replay_partials(self, tensors: list[torch.Tensor], params: TensorParams, round_: int,
                        red: KarcherReductions | None) -> list[float]:
        """Round ``round_``'s sums by mergekit's torch expressions on the rows: the float16 path,
        and what the fused loops (:mod:`distmerge.methods.kernels.karcher_loops`) equal."""
        if round_ == 0:
            return [reductions.dot(t, t) for t in tensors]
        assert red is not None
        units = self._units(tensors, red)
        mean = self._mean(units, red, params.global_["tol"])
        if round_ == 1:
            return [reductions.dot(mean, mean)]
        valid = [units[i] for i in red.valid]
        phase = (round_ - 2) % ROUNDS_PER_ITERATION
        if phase == DOTS:
            return [reductions.dot(mean, u) for u in valid]
        assert red.pending is not None
        tangent = self._tangent(mean, valid, red.pending)
        if phase == TANGENT:
            return [reductions.dot(tangent, tangent)]
        updated = self._updated(mean, tangent, red.pending)
        return [reductions.dot(updated, updated)]

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
        prev = cast(KarcherReductions, previous)
        out = replace(prev, steps=list(prev.steps), pending=None if prev.pending is None else replace(prev.pending))
        if round_ == 1:
            out.mean_norm = scalars.sqrt_as(sums[0], norm_dtype)
            out.complete = params.global_["max_iter"] == 0
            return out
        phase = (round_ - 2) % ROUNDS_PER_ITERATION
        if phase == DOTS:
            out.pending = self._dots(sums, self._alphas(out, len(out.norms)), dtype, tol)
        elif phase == TANGENT:
            assert out.pending is not None
            out.pending.tangent_norm = scalars.sqrt_as(sums[0], norm_dtype)
            if float(out.pending.tangent_norm) < tol:  # mergekit breaks before updating
                out.pending, out.complete = None, True
        else:
            assert out.pending is not None
            unit_norm = scalars.sqrt_as(sums[0], norm_dtype)
            out.pending.unit_norm = unit_norm if float(unit_norm) > tol else None
            out.steps.append(out.pending)
            out.pending = None
        return out

    @staticmethod
    def _dots(sums: list[float], alphas: list[float], dtype: torch.dtype, tol: float) -> Step:
        """An iteration's dots (rounded to the compute dtype, as torch.dot returns them) and the
        tangent coefficients ``a_i theta_i / sin(theta_i)`` (None where theta_i < tol)."""
        dots, coefs = [], []
        for alpha, d in zip(alphas, sums, strict=True):
            dot = torch.clamp(scalars.as_dtype(d, dtype), -1.0, 1.0)
            theta = torch.arccos(dot)
            dots.append(dot)
            coefs.append(None if theta.item() < tol else alpha * (theta / torch.sin(theta)))
        return Step(dots, coefs)

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        tensors = self._inputs(base, experts)
        dtype = compute_dtype(tensors[0], ctx)
        if len(tensors) == 1:
            return tensors[0].to(dtype, copy=True)
        red = cast(KarcherReductions, reduced)
        if not red.valid:
            return sum(in_compute(t, ctx) * 0 for t in tensors)
        fused = fused_pass(tensors, red, MERGE, params.global_["tol"], dtype)
        if isinstance(fused, torch.Tensor):
            return fused
        return self.replay_merge([in_compute(t, ctx) for t in tensors], params, red)

    def replay_merge(self, tensors: list[torch.Tensor], params: TensorParams, red: KarcherReductions) -> torch.Tensor:
        """The merged rows by mergekit's torch expressions (see :meth:`replay_partials`)."""
        mean = self._mean(self._units(tensors, red), red, params.global_["tol"])
        return merge_scale(red, len(tensors)) * mean


def merge_scale(red: KarcherReductions, n: int) -> torch.Tensor:
    """mergekit's ``sum_i a_i |x_i|`` (a float32 0-dim tensor; float64 for float64 inputs)."""
    return sum(alpha * norm for alpha, norm in zip([1.0 / n] * n, red.norms, strict=True))  # type: ignore[return-value]


MERGE = -1  # fused_pass's round number for the merge


def fused_pass(tensors: list[torch.Tensor], red: KarcherReductions | None, round_: int,
               tol: float, dtype: torch.dtype | None = None) -> list[float] | torch.Tensor | None:
    """Round ``round_``'s sums (or, for :data:`MERGE`, the merged rows) by one fused pass of
    :func:`karcher_pass`; None where there is no loop for the dtype (float16)."""
    dtype = dtype or tensors[0].dtype  # the compute dtype (the rows may come as stored)
    mode = kernels.kernel_mode(dtype)
    if mode is None:
        return None
    kd = kernels.kernel_dtype(dtype)
    np_kd = np.float64 if kd == torch.float64 else np.float32  # the loop's arithmetic type
    stage = 0 if round_ == 0 else 1 if round_ == 1 else 5 if round_ == MERGE else 2 + (round_ - 2) % ROUNDS_PER_ITERATION
    xs = tuple(stored_array(t) for t in tensors)
    steps = [] if red is None else list(red.steps) + ([red.pending] if red.pending is not None else [])
    k = 0 if red is None else len(red.valid)
    shape = (max(1, len(steps)), max(1, k))
    dots, coefs = np.zeros(shape, np_kd), np.zeros(shape, np_kd)
    live = np.zeros(shape, np.bool_)
    cos_s, sin_s, tns, uns = (np.ones(shape[0], np_kd) for _ in range(4))
    divides = np.zeros(shape[0], np.bool_)
    for s, step in enumerate(steps):
        for v, (dot, coef) in enumerate(zip(step.dots, step.coefs, strict=True)):
            dots[s, v] = float(dot)
            live[s, v] = coef is not None
            coefs[s, v] = float(coef) if coef is not None else 0.0
        if step.tangent_norm is not None:  # a left operand is cast to the compute dtype first
            tn = step.tangent_norm
            cos_s[s], sin_s[s], tns[s] = float(torch.cos(tn).to(dtype)), float(torch.sin(tn).to(dtype)), float(tn)
        if step.unit_norm is not None:
            uns[s], divides[s] = float(step.unit_norm), True
    norms = np.array([float(n) for n in red.norms] if red is not None else [1.0] * len(xs), np_kd)
    valid = np.array(red.valid if red is not None else [], np.int64)
    alphas = np.array(Karcher._alphas(red, len(xs)) if red is not None else [], np_kd)
    mean_norm = np_kd(float(red.mean_norm)) if red is not None and red.mean_norm is not None else np_kd(1.0)
    use_first = red is not None and red.mean_norm is not None and float(red.mean_norm) < tol
    scale = np_kd(float(merge_scale(red, len(xs)).to(dtype))) if stage == 5 and red is not None else np_kd(1.0)
    lanes = len(xs) if stage == 0 else (k if stage == 2 else 1)
    sums = np.zeros(max(lanes, 1), np.float64)
    out = np.empty(xs[0].size if stage == 5 else 0, np_kd)
    karcher_pass(xs, valid, norms, alphas, kernels.mode_tag(mode), stage, mean_norm, use_first, dots, coefs, live,
                 cos_s, sin_s, tns, uns, divides, len(red.steps) if red is not None else 0, scale, sums, out)
    if stage == 5:
        return torch.from_numpy(out).to(dtype).reshape(tensors[0].shape)
    return [float(v) for v in sums[:lanes]]
