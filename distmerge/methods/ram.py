"""RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572), mergekit 0.1.5's tensor-local form.

    tv_i = x_i - base;  nz_i = |tv_i| > epsilon;  c = sum_i nz_i       (per element)
    ram:        out = base + sum_i (tv_i nz_i [c == 1] + tv_i nz_i [c > 1] / max(c, 1))
    ramplus_tl: shared_i = #{nz_i and c > 1},  unique_i = #{nz_i and c == 1}   (whole tensor)
                rho_i = shared_i / max(unique_i, epsilon);  lambda_i = 1 + r * clamp(rho_i, 0, alpha)
                out = base + sum_i (tv_i nz_i [c == 1] lambda_i + tv_i nz_i [c > 1] / max(c, 1))

``ram`` is elementwise (shard-local). ``ramplus_tl``'s two counts per model cover the whole
tensor: one reduction round of exact integer counts. Every elementwise step is mergekit's torch
expression on the rows, so both are bit-identical to mergekit 0.1.5. As there, ``lambda_i`` is
a float32 tensor, so ramplus_tl's sum runs in float32 whatever the compute dtype (float64 for
float64) and the result stays in that dtype: mergekit writes it so unless ``out_dtype`` is set
(``result_dtype``).
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
    promoted_to_float32,
    rows_in_compute,
)
from distmerge.methods.kernels.ram_loops import ram_counts, ram_merge
from distmerge.methods.kernels.rounding import stored_array


def _masks(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float):
    tv = torch.stack([x - base for x in experts], dim=0).reshape(len(experts), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


def reference_merge(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float,
                    lambda_: torch.Tensor | None, start: int = 0, numel: int | None = None) -> torch.Tensor:
    """mergekit's torch expressions: ram, or ramplus_tl with its per-model ``lambda_``; the
    rows hold the elements from flat index ``start`` of a ``numel``-element tensor (default:
    the whole tensor), which decides the order of the sum over the models (``stack_sums``)."""
    tv, nonzero, counts, overlap, unique = _masks(base, experts, epsilon)
    tv_z = tv * nonzero
    kept = tv_z * unique if lambda_ is None else tv_z * unique * lambda_.unsqueeze(-1)
    merged = stack_sums.stack_sum(list(kept + (tv_z * overlap / counts.clamp(min=1))), start,
                                  base.numel() if numel is None else numel)
    return base + merged.reshape_as(base)


def reference_counts(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float) -> CountPartials:
    """ramplus_tl's round by torch: each model's shared and unique nonzero elements."""
    _, nonzero, _, overlap, unique = _masks(base, experts, epsilon)
    return CountPartials((nonzero & overlap).sum(dim=1).tolist(), (nonzero & unique).sum(dim=1).tolist())


def fused_counts(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float,
                 compute: torch.dtype | None = None) -> CountPartials:
    """:func:`reference_counts` by :func:`ram_counts` (exact integers either way); ``compute``:
    the compute dtype of rows that come as stored (default: their own). The loop also counts
    the task vectors' NaN/Inf elements: none proves every row finite (``Partials.inputs_finite``;
    ``x - base`` is finite only where both are), which saves the engine a scan of each source."""
    shared, unique = np.zeros(len(experts), dtype=np.int64), np.zeros(len(experts), dtype=np.int64)
    nonfinite = ram_counts(*_loop_arrays(base, experts, epsilon, compute or base.dtype), shared, unique)
    return CountPartials(shared.tolist(), unique.tolist(), inputs_finite=nonfinite == 0)


def _loop_arrays(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float,  # noqa: ANN202
                 compute: torch.dtype):
    """The fused loops' inputs: stored rows, the rounding mode, ``epsilon`` rounded to the compute dtype."""
    mode = kernels.mode_tag(cast(int, kernels.kernel_mode(compute)))
    eps = kernels.rounded([epsilon], compute)
    return stored_array(base), tuple(stored_array(x) for x in experts), mode, eps


def fused_merge(base: torch.Tensor, experts: Sequence[torch.Tensor], epsilon: float,
                lambda_: torch.Tensor | None, compute: torch.dtype | None = None, start: int = 0,
                numel: int | None = None) -> torch.Tensor:
    """The merged rows by :func:`ram_merge`, bit for bit the torch expressions (``lambda_``:
    ramplus_tl's float32 factors, whose product promotes the sum to float32, or float64;
    ``start`` and ``numel`` as :func:`reference_merge` takes them)."""
    compute = compute or base.dtype
    b, xs, mode, eps = _loop_arrays(base, experts, epsilon, compute)
    promoted = lambda_ is not None
    dtype = promoted_to_float32(compute) if promoted else compute
    kd = kernels.kernel_dtype(dtype)
    lambdas = kernels.as_array(lambda_ if promoted else torch.ones(len(experts)), kd)
    out = np.empty(b.size, dtype=np.float64 if kd == torch.float64 else np.float32)
    tail = stack_sums.tail_offset(base.numel() if numel is None else numel, start, dtype)
    ram_merge(b, xs, mode, eps.astype(out.dtype), lambdas, promoted, tail, out)
    return torch.from_numpy(out).to(dtype).reshape(base.shape)


def _fused(base: torch.Tensor, experts: Sequence[torch.Tensor], ctx: ShardContext) -> bool:
    """Whether the merge runs the fused loop: a compute dtype it has, where it follows torch's
    stacked sums (``stack_sums.loops_follow``)."""
    return (kernels.kernel_mode(compute_dtype(base, ctx)) is not None
            and stack_sums.loops_follow(ctx.tensor_numel, len(experts)))


@dataclass
class CountPartials(Partials):
    """One chunk's exact per-model counts of shared and unique nonzero task-vector elements."""

    shared: list[int]
    unique: list[int]


@dataclass(kw_only=True)
class RamPlusReductions(Reductions):
    shared: list[int]
    unique: list[int]


def _lambdas(reduced: RamPlusReductions, g: dict) -> torch.Tensor:
    """mergekit's float32 ``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)``."""
    shared_counts = torch.tensor(reduced.shared, dtype=torch.int64)
    unique_counts = torch.tensor(reduced.unique, dtype=torch.int64)
    rho = shared_counts / unique_counts.clamp(min=g["epsilon"])
    return 1 + g["r"] * rho.clamp(min=0, max=g["alpha"])


class Ram(MergeMethod):
    name = "ram"
    uses_base = True
    reads_stored_rows = True
    min_experts = 1
    global_parameters = {"epsilon": ParamSpec(1e-5, check=lambda v: v >= 0, allowed="epsilon >= 0")}
    model_parameters = {}

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        assert base is not None
        if _fused(base, experts, ctx):
            return fused_merge(base, experts, params.global_["epsilon"], None, ctx.compute, ctx.element_start,
                               ctx.tensor_numel)
        return reference_merge(*rows_in_compute(base, experts, ctx), params.global_["epsilon"], None,
                               ctx.element_start, ctx.tensor_numel)


class RamPlusTl(MergeMethod):
    name = "ramplus_tl"
    uses_base = True
    reads_stored_rows = True
    min_experts = 1
    global_parameters = {
        "r": ParamSpec(0.1),
        "alpha": ParamSpec(0.2),
        # 0 would divide 0 unique elements by 0 (a NaN lambda that poisons the whole tensor)
        "epsilon": ParamSpec(1e-5, check=lambda v: v > 0, allowed="epsilon > 0"),
    }
    model_parameters = {}

    def result_dtype(self, compute: torch.dtype) -> torch.dtype:
        """float32 (float64 for float64 compute): ``lambda`` is a float32 tensor, and mergekit
        returns (and writes) the promoted sum."""
        return promoted_to_float32(compute)

    def reduction_rounds(self, params: TensorParams, shape: tuple[int, ...] | None = None) -> int:
        return 1

    def partial_reductions(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
                           ctx: ShardContext, round_: int, previous: Reductions | None) -> CountPartials:
        assert base is not None
        if kernels.kernel_mode(compute_dtype(base, ctx)) is not None:
            return fused_counts(base, experts, params.global_["epsilon"], ctx.compute)
        return reference_counts(*rows_in_compute(base, experts, ctx), params.global_["epsilon"])

    def reduce(self, partials: Sequence[Partials], params: TensorParams, shape: tuple[int, ...],
               round_: int, previous: Reductions | None) -> RamPlusReductions:
        chunks = cast(Sequence[CountPartials], partials)
        n = len(chunks[0].shared)
        return RamPlusReductions(shared=[sum(c.shared[i] for c in chunks) for i in range(n)],
                                 unique=[sum(c.unique[i] for c in chunks) for i in range(n)])

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        assert base is not None and isinstance(reduced, RamPlusReductions)
        g = params.global_
        lambda_ = reduced.derive("lambda", lambda: _lambdas(reduced, g))  # once per tensor
        if _fused(base, experts, ctx):
            return fused_merge(base, experts, g["epsilon"], lambda_, ctx.compute, ctx.element_start, ctx.tensor_numel)
        return reference_merge(*rows_in_compute(base, experts, ctx), g["epsilon"], lambda_, ctx.element_start,
                               ctx.tensor_numel)
