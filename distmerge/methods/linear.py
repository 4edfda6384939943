"""Linear (weighted average) merge: ``sum_i w_i x_i`` (divided by ``sum_i w_i`` if normalize).

Like mergekit, the average runs over the models listed under ``models``; ``base_model`` is not
part of it unless it is listed there too. The arithmetic is mergekit 0.1.5's, so outputs are
bit-identical to its: the weights in float32 (float64 for float64 inputs), a fused
multiply-add per model into a float32 (float64) accumulator starting at +0.0, one division by
the float32 sum of the weights, and one rounding to the compute dtype at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distmerge.errors import ConfigError
from distmerge.methods import kernels
from distmerge.methods.base import MergeMethod, ParamSpec, ShardContext, TensorParams, compute_dtype


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where mergekit accumulates a weighted sum of ``dtype`` tensors: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Linear(MergeMethod):
    name = "linear"
    uses_base = False
    min_experts = 1
    reads_stored_rows = True
    nonfinite_reaches_output = True  # every model's rows enter every output element, by an fma
    global_parameters = {"normalize": ParamSpec(True, bool)}
    model_parameters = {"weight": ParamSpec(None)}

    def validate(self, params: TensorParams, where: str, inputs: Sequence[str] = ()) -> None:
        if params.global_["normalize"] and sum(p["weight"] for p in params.experts) == 0:
            raise ConfigError(f"{where}: the models' weights (models[*].parameters.weight) sum to 0, so "
                              "parameters.normalize=true would divide by zero; change a weight or set normalize: false")

    def merge(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        stats: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """One fused pass (:func:`kernels.weighted_sum`) that widens stored bfloat16 rows as it
        reads them; equal bit for bit to :meth:`merge_reference` of the compute-dtype rows."""
        dtype = compute_dtype(experts[0], ctx)
        acc = accumulation_dtype(dtype)
        weights = torch.tensor([p["weight"] for p in params.experts], dtype=acc)
        divisor = weights.sum().numpy() if params.global_["normalize"] else None
        out = kernels.weighted_sum(kernels.value_arrays(experts, acc), weights.numpy(), divisor)
        return torch.from_numpy(out).reshape(experts[0].shape).to(dtype)

    def merge_reference(self, experts: Sequence[torch.Tensor], params: TensorParams) -> torch.Tensor:
        """mergekit 0.1.5's loop as torch ops: ``addcmul_`` into a zero accumulator (a fused
        multiply-add per element on CPU), ``div_`` by the weights' sum, one cast."""
        dtype = experts[0].dtype
        acc = accumulation_dtype(dtype)
        weights = torch.tensor([p["weight"] for p in params.experts], dtype=acc)
        out = torch.zeros(experts[0].shape, dtype=acc)
        for x, w in zip(experts, weights.unbind(0), strict=True):
            out.addcmul_(x, w)
        if params.global_["normalize"]:
            out.div_(weights.sum())
        return out.to(dtype)
