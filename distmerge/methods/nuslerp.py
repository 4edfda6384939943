"""NuSLERP: SLERP between two models (or their task vectors), mergekit 0.1.5's ``nuslerp``.

    t = w_2 / (w_1 + w_2)  (0.5 when |w_1 + w_2| < 1e-6);   v_i = x_i, or x_i - base with a base
    u_i = v_i / max(|v_i|, 1e-7);  cos = clamp(<u_1, u_2>, -1, 1);  colinear: 1 - cos^2 <= 1e-16
    out = (sin((1 - t) theta) v_1 + sin(t theta) v_2) / sin(theta), theta = acos(cos)
          or (1 - t) v_1 + t v_2 where colinear;   (+ base)

The vectors: the whole flattened tensor (``nuslerp_flatten``, default), else each last-dim
vector, or with ``nuslerp_row_wise`` each vector along dim 0 (a column of a matrix). A whole
tensor (and a 1-D one) or a column spans all rows, so its two norms come from reduction
round 0 and its cosine (of the dtype-rounded unit vectors, as mergekit) from round 1, float64
sums over canonical chunks rounded once to the compute dtype; last-dim vectors are whole in
every shard. Everything elementwise is mergekit's torch expression in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    rows_in_compute,
    sums_prove_finite,
)
from distmerge.methods.kernels.nuslerp_loops import (
    nuslerp_blend,
    nuslerp_cosine_sum,
    nuslerp_square_sums,
)
from distmerge.methods.kernels.rounding import stored_array

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8


def interpolation_t(params: TensorParams) -> float:
    w = [p["weight"] for p in params.experts]
    total = sum(w)
    return 0.5 if abs(total) < 1e-6 else w[1] / total


def nuslerp_apply(t: float, v0: torch.Tensor, v1: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """mergekit's elementwise step, given the (dtype) cosine of each vector pair, broadcastable."""
    cos_theta = cos.clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, result)


@dataclass
class NuSlerpPartials(Partials):
    """float64 sums of one chunk: round 0 the two sums of squares, round 1 the unit vectors' dot
    (floats for a whole tensor, shape[1:] tensors for columns)."""

    sums: tuple[float | torch.Tensor, ...]
    dtype: torch.dtype = torch.float32  # the compute dtype, which the reduced scalars round to


@dataclass(kw_only=True)
class NuSlerpReductions(Reductions):
    norms: tuple[torch.Tensor, torch.Tensor]  # in the compute dtype, clamped as mergekit
    cos: torch.Tensor | None = None


class NuSlerp(MergeMethod):
    name = "nuslerp"
    uses_base = False
    base_optional = True
    reads_stored_rows = True
    min_experts = 2
    max_experts = 2
    global_parameters = {"nuslerp_row_wise": ParamSpec(False, bool), "nuslerp_flatten": ParamSpec(True, bool)}
    model_parameters = {"weight": ParamSpec(None)}

    @staticmethod
    def _mode(params: TensorParams, shape: tuple[int, ...]) -> str:
        if params.global_["nuslerp_flatten"] or len(shape) < 2:
            return "whole"
        return "columns" if params.global_["nuslerp_row_wise"] else "last"

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        return 0 if shape is not None and self._mode(params, shape) == "last" else 2

    @staticmethod
    def _vectors(base, experts):
        if base is None:
            return experts[0], experts[1]
        return experts[0] - base, experts[1] - base

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> NuSlerpPartials:
        mode = self._mode(params, ctx.shape)
        dtype = compute_dtype(experts[0], ctx)
        if mode == "last":
            return NuSlerpPartials((), dtype)
        if mode == "whole" and kernels.kernel_mode(dtype) is not None:
            if round_ == 0:  # the two sums of squares: a term of every element of v0 and v1 (so of the base)
                sums = self._fused_squares(base, experts, dtype)
                return NuSlerpPartials(sums, dtype, inputs_finite=sums_prove_finite(sums))
            assert isinstance(previous, NuSlerpReductions)
            return NuSlerpPartials((self._fused_cosine(base, experts, previous, dtype),), dtype)
        # Anything else is computed by torch.
        v0, v1 = self._vectors(*rows_in_compute(base, experts, ctx))
        if round_ == 0:
            if mode == "whole":  # float16 compute: no kernel mode
                sums = (reductions.dot(v0, v0), reductions.dot(v1, v1))
                return NuSlerpPartials(sums, dtype, inputs_finite=sums_prove_finite(sums))
            sums = (scalars.column_dot(v0, v0), scalars.column_dot(v1, v1))
            return NuSlerpPartials(sums, v0.dtype, inputs_finite=sums_prove_finite(sums))
        assert isinstance(previous, NuSlerpReductions)
        prod = (v0 / previous.norms[0]) * (v1 / previous.norms[1])
        return NuSlerpPartials((scalars.total(prod) if mode == "whole" else scalars.column_sum(prod),), v0.dtype)

    def reduce(self, partials: Sequence[Partials], params: TensorParams, shape: tuple[int, ...],
               round_: int, previous: Reductions | None) -> NuSlerpReductions:
        chunks = cast(Sequence[NuSlerpPartials], partials)
        if self._mode(params, shape) == "last":
            return NuSlerpReductions(norms=(torch.ones(()), torch.ones(())), complete=True)
        dtype = chunks[0].dtype
        sums = [_ordered([c.sums[i] for c in chunks]) for i in range(len(chunks[0].sums))]
        if round_ == 0:
            norms = tuple(scalars.sqrt_as(s, dtype).clamp(min=NORM_EPS) for s in sums)
            return NuSlerpReductions(norms=(norms[0], norms[1]))
        assert isinstance(previous, NuSlerpReductions)
        return NuSlerpReductions(norms=previous.norms, cos=scalars.as_dtype(sums[0], dtype))

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        t = interpolation_t(params)
        dtype = compute_dtype(experts[0], ctx)
        if self._mode(params, ctx.shape) == "whole" and kernels.kernel_mode(dtype) is not None:
            assert isinstance(reduced, NuSlerpReductions) and reduced.cos is not None
            cos = reduced.cos
            colinear, coefficients = reduced.derive(("blend", dtype), lambda: _blend_coefficients(t, cos, dtype))
            return self._fused_blend(base, experts, colinear, coefficients, dtype)
        base, experts = rows_in_compute(base, experts, ctx)
        v0, v1 = self._vectors(base, experts)
        if self._mode(params, ctx.shape) == "last":
            n0 = scalars.sqrt_as(reductions.rowwise_dot(v0, v0), v0.dtype).unsqueeze(-1).clamp(min=NORM_EPS)
            n1 = scalars.sqrt_as(reductions.rowwise_dot(v1, v1), v1.dtype).unsqueeze(-1).clamp(min=NORM_EPS)
            cos = scalars.row_sum((v0 / n0) * (v1 / n1)).to(v0.dtype).unsqueeze(-1)
        else:
            assert isinstance(reduced, NuSlerpReductions) and reduced.cos is not None
            cos = reduced.cos.to(v0.dtype)
        out = nuslerp_apply(t, v0, v1, cos)
        return out if base is None else base + out


    # ---- the fused loops (:mod:`kernels.nuslerp_loops`), bit for bit the torch steps above ----

    @staticmethod
    def _fused_squares(base: torch.Tensor | None, experts: Sequence[torch.Tensor], dtype: torch.dtype,
                       ) -> tuple[float, float]:
        """Round 0 of a whole tensor on these rows (computing in ``dtype``): ``reductions.dot``
        of each vector with itself, both from one pass."""
        kd = kernels.kernel_dtype(dtype)
        sums = np.zeros(2, dtype=np.float64)
        nuslerp_square_sums(*_loop_rows(base, experts, dtype), torch.empty(0, dtype=kd).numpy(), sums)
        return float(sums[0]), float(sums[1])

    @staticmethod
    def _fused_cosine(base: torch.Tensor | None, experts: Sequence[torch.Tensor], red: NuSlerpReductions,
                      dtype: torch.dtype) -> float:
        """Round 1 of a whole tensor on these rows (computing in ``dtype``): ``scalars.total`` of
        the unit vectors' product."""
        kd = kernels.kernel_dtype(dtype)
        return float(nuslerp_cosine_sum(*_loop_rows(base, experts, dtype), kernels.as_array(red.norms[0], kd),
                                        kernels.as_array(red.norms[1], kd)))

    @staticmethod
    def _fused_blend(base: torch.Tensor | None, experts: Sequence[torch.Tensor], colinear: bool,
                     coefficients: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """:func:`nuslerp_apply` (and ``+ base``) of a whole tensor's rows computing in ``dtype``:
        its scalars by torch, as there (:func:`_blend_coefficients`), the elementwise steps in one loop."""
        out = np.empty(experts[0].numel(), dtype=coefficients.dtype)  # the loop's arithmetic type
        nuslerp_blend(*_loop_rows(base, experts, dtype), colinear, coefficients, out)
        return torch.from_numpy(out).to(dtype).reshape(experts[0].shape)


def _loop_rows(base: torch.Tensor | None, experts: Sequence[torch.Tensor], dtype: torch.dtype,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, int]:
    """The loops' first arguments: ``(b, x0, x1, has_base, mode)``, the rows as stored (``b`` is
    ``x0``, unread, without a base) and the compute dtype's mode tag."""
    x0, x1 = stored_array(experts[0]), stored_array(experts[1])
    b = stored_array(base) if base is not None else x0
    return b, x0, x1, base is not None, kernels.mode_tag(cast(int, kernels.kernel_mode(dtype)))


def _blend_coefficients(t: float, cos: torch.Tensor, dtype: torch.dtype) -> tuple[bool, np.ndarray]:
    """:func:`nuslerp_apply`'s scalars, as torch computes them in ``dtype``, for the blend loop:
    whether the vectors are colinear, and the coefficients (``1 - t``, ``t``, 1 then; else
    ``sin((1 - t) theta)``, ``sin(t theta)``, ``sin(theta)``) in the loop's arithmetic type."""
    kd = kernels.kernel_dtype(dtype)
    np_kd = np.float64 if kd == torch.float64 else np.float32
    cos_theta = cos.to(dtype).clamp(-1, 1)
    colinear = bool((1 - cos_theta.square()) <= COLINEAR_EPS**2)
    if colinear:  # torch multiplies by the Python numbers 1 - t and t
        return True, np.array([kernels.scalar(1 - t, dtype), kernels.scalar(t, dtype), 1.0], dtype=np_kd)
    theta = torch.acos(cos_theta)
    scalars_ = torch.stack([torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta)])
    return False, kernels.as_array(scalars_, kd)


def _ordered(values: list) -> float | torch.Tensor:
    if isinstance(values[0], torch.Tensor):
        out = values[0].clone()
        for v in values[1:]:
            out += v
        return out
    return reductions.ordered_sum(values)
