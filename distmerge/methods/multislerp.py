"""Multi-SLERP: barycentric interpolation of several models on the hypersphere (mergekit 0.1.5).

    v_i = x_i (or x_i - base);  w = weights (/ sum w if normalize_weights), in the compute dtype
    u_i = v_i / (|v_i| + eps);  m = sum_i w_i u_i;  |m| < eps: linear blend for 2 models, else an error
    m = m / |m|;  d_i = <u_i, m>;  g = sum_i w_i (u_i - d_i m);  n = |g| + eps
    out = (m cos(n) + g sin(n) / n) * sum_i w_i |v_i|   (+ base);   one model: out = x_1

Four whole-tensor quantities, each needing the previous one: reduction round 0 the norms |v_i|,
round 1 |m|, round 2 the dots d_i, round 3 |g|. Each is a float64 sum over canonical chunks
rounded once to the compute dtype (mergekit's torch reductions return the compute dtype);
every elementwise step is mergekit's torch expression, replayed on the rows in each round: by a
fused loop per round (:mod:`distmerge.methods.kernels.multislerp_loops`) in bfloat16, float32
and float64, and as torch ops (:meth:`MultiSlerp.replay`, which the loop equals bit for bit) in
float16 and for the two-model linear fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch

from distmerge.errors import ConfigError, DistmergeError
from distmerge.methods import kernels, reductions, scalars, stack_sums
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
from distmerge.methods.kernels.multislerp_loops import multislerp_pass
from distmerge.methods.kernels.rounding import stored_array

ROUNDS = 4


def _positive(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zeros raised to the dtype's smallest normal number. ``norm + eps`` is zero only
    when the norm is zero and eps (1e-8) underflows, as it does in float16: mergekit then divides
    0 by 0 and writes NaN (and its ``mean_norm < eps`` compares 0 < 0); here a zero vector stays
    zero and takes the linear fallback, as in bf16 and float32 (docs/methods.md, difference 12)."""
    return torch.where(x == 0, torch.finfo(x.dtype).tiny, x)


class MultiSlerpError(DistmergeError):
    """The weighted mean of the unit vectors is zero (antipodal inputs with balancing weights)."""


@dataclass
class SumPartials(Partials):
    sums: list[float]
    dtype: torch.dtype


@dataclass(kw_only=True)
class MultiSlerpReductions(Reductions):
    norms: torch.Tensor | None = None  # [N, 1], compute dtype
    mean_norm: torch.Tensor | None = None
    linear: bool = False  # |m| < eps with two models: mergekit's linear fallback
    dots: torch.Tensor | None = None  # [N, 1]
    tangent_norm: torch.Tensor | None = None


class MultiSlerp(MergeMethod):
    name = "multislerp"
    uses_base = False
    base_optional = True
    reads_stored_rows = True
    min_experts = 1
    global_parameters = {
        "normalize_weights": ParamSpec(True, bool),
        "eps": ParamSpec(1e-8, check=lambda v: v >= 0, allowed="eps >= 0"),
    }
    model_parameters = {"weight": ParamSpec(None)}

    def validate(self, params: TensorParams, where: str, inputs: Sequence[str] = ()) -> None:
        if params.global_["normalize_weights"] and len(params.experts) > 1 \
                and sum(p["weight"] for p in params.experts) == 0:
            raise ConfigError(f"{where}: the models' weights (models[*].parameters.weight) sum to 0, so "
                              "parameters.normalize_weights=true would divide by zero; change a weight")

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        return 0 if len(params.experts) == 1 else ROUNDS

    @staticmethod
    def _weights(params: TensorParams, dtype: torch.dtype) -> torch.Tensor:
        weights = torch.tensor([p["weight"] for p in params.experts], dtype=dtype)
        return weights / weights.sum() if params.global_["normalize_weights"] else weights

    def _fused(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
               red: MultiSlerpReductions | None, upto: int, dtype: torch.dtype, start: int = 0,
               numel: int | None = None) -> list[float] | torch.Tensor | None:
        """What :meth:`replay` returns, by one fused pass (:func:`multislerp_pass`) computing in
        ``dtype``; None where there is no loop for the dtype (float16), the linear fallback runs
        or the loop would not follow torch's stacked sums (``stack_sums.loops_follow``). ``start`` and ``numel`` as :meth:`replay` takes them."""
        mode = kernels.kernel_mode(dtype)
        numel = experts[0].numel() if numel is None else numel
        if mode is None or (red is not None and red.linear) or not stack_sums.loops_follow(numel, len(experts)):
            return None
        kd = kernels.kernel_dtype(dtype)
        np_kd = np.float64 if kd == torch.float64 else np.float32  # the loop's arithmetic type

        def arr(t: torch.Tensor) -> np.ndarray:
            return kernels.as_array(t, kd)

        k = len(experts)
        eps = params.global_["eps"]
        w = self._weights(params, dtype)
        den = arr(_positive(red.norms + eps)) if red is not None and red.norms is not None else np.ones(k, np_kd)
        mean_norm = arr(red.mean_norm)[0] if red is not None and red.mean_norm is not None else np_kd(1.0)
        dots = arr(red.dots) if red is not None and red.dots is not None else np.zeros(k, np_kd)
        blend = np.zeros(3, np_kd)
        if upto == ROUNDS:
            assert red is not None and red.norms is not None
            tn = _positive(red.tangent_norm)
            blend = arr(torch.stack([torch.cos(tn), torch.sin(tn) / tn, (red.norms.squeeze(-1) * w).sum()]))
        xs = tuple(stored_array(x) for x in experts)
        b = stored_array(base) if base is not None else xs[0]
        sums = np.zeros(k, dtype=np.float64)
        out = np.empty(xs[0].size if upto == ROUNDS else 0, dtype=np_kd)
        multislerp_pass(b, xs, base is not None, kernels.mode_tag(mode), upto, den, arr(w), mean_norm, dots,
                        blend, stack_sums.tail_offset(numel, start, dtype), sums, out)
        if upto == ROUNDS:
            return torch.from_numpy(out).to(dtype).reshape(experts[0].shape)
        return [float(v) for v in sums[:k if upto in (0, 2) else 1]]

    def replay(self, base, experts, params, red: MultiSlerpReductions | None, upto: int,  # noqa: ANN001, ANN201
               start: int = 0, numel: int | None = None):
        """mergekit's elementwise steps on these rows, as far as the rounds so far allow:
        what round ``upto`` sums (``upto`` = ROUNDS: the merged rows). The rows hold the
        elements from flat index ``start`` of ``numel`` (default: all of them), which decides
        the order of the sums over the models (``stack_sums``)."""
        numel = experts[0].numel() if numel is None else numel
        eps = params.global_["eps"]
        tensors = torch.stack(list(experts), dim=0)
        if base is not None:
            tensors -= base
        flat = tensors.reshape(tensors.shape[0], -1)
        if upto == 0:
            return [reductions.dot(v, v) for v in flat]
        assert red is not None and red.norms is not None
        w = self._weights(params, flat.dtype)
        units = flat / _positive(red.norms + eps)
        mean = stack_sums.stack_sum(list(units * w.view(-1, 1)), start, numel)
        if upto == 1:
            return [reductions.dot(mean, mean)]
        if red.linear:
            res = (tensors[0] * w[0] + tensors[1] * w[1]).reshape(tensors.shape[1:])
            return res if base is None else res + base
        mean = mean / red.mean_norm
        if upto == 2:
            return [scalars.total(u * mean) for u in units]
        tangent = units - red.dots * mean
        tangent_result = stack_sums.stack_sum(list(tangent * w.view(-1, 1)), start, numel)
        if upto == 3:
            return [reductions.dot(tangent_result, tangent_result)]
        tn = _positive(red.tangent_norm)
        result = mean * torch.cos(tn) + tangent_result * (torch.sin(tn) / tn)
        result = result * (red.norms.squeeze(-1) * w).sum()
        result = result.view(tensors.shape[1:])
        return result if base is None else result + base

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> SumPartials:
        red = cast(MultiSlerpReductions | None, previous)
        dtype = compute_dtype(experts[0], ctx)
        if red is not None and red.linear:
            return SumPartials([], dtype)
        sums = self._fused(base, experts, params, red, round_, dtype, ctx.element_start, ctx.tensor_numel)
        if sums is None:
            sums = self.replay(*rows_in_compute(base, experts, ctx), params, red, round_, ctx.element_start,
                               ctx.tensor_numel)
        # round 0 sums the squares of every model's vector (x, or x - base): they prove the rows finite
        return SumPartials(sums, dtype, inputs_finite=round_ == 0 and sums_prove_finite(sums))

    def reduce(self, partials: Sequence[Partials], params: TensorParams, shape: tuple[int, ...],
               round_: int, previous: Reductions | None) -> MultiSlerpReductions:
        chunks = cast(Sequence[SumPartials], partials)
        dtype = chunks[0].dtype
        out = MultiSlerpReductions() if previous is None else replace(cast(MultiSlerpReductions, previous))
        if out.linear:
            return out
        sums = [reductions.ordered_sum([c.sums[i] for c in chunks]) for i in range(len(chunks[0].sums))]
        eps = params.global_["eps"]
        if round_ == 0:
            out.norms = torch.stack([scalars.sqrt_as(s, dtype) for s in sums]).view(-1, 1)
        elif round_ == 1:
            out.mean_norm = scalars.sqrt_as(sums[0], dtype)
            if float(out.mean_norm) < eps:  # in float64: float16 rounds eps = 1e-8 to 0 (mergekit: 0 < 0)
                if len(params.experts) != 2:
                    raise MultiSlerpError(
                        "multislerp: the weighted sum of the models' unit vectors is zero (antipodal models whose "
                        "weights balance out); use different weights (models[*].parameters.weight)")
                out.linear = out.complete = True
        elif round_ == 2:
            out.dots = torch.stack([scalars.as_dtype(s, dtype) for s in sums]).view(-1, 1)
        else:
            out.tangent_norm = scalars.sqrt_as(sums[0], dtype) + eps
        return out

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        dtype = compute_dtype(experts[0], ctx)
        if len(experts) == 1:
            return experts[0].to(dtype, copy=True)
        red = cast(MultiSlerpReductions, reduced)
        fused = self._fused(base, experts, params, red, ROUNDS, dtype, ctx.element_start, ctx.tensor_numel)
        if fused is not None:
            return fused
        return self.replay(*rows_in_compute(base, experts, ctx), params, red, ROUNDS, ctx.element_start,
                           ctx.tensor_numel)

