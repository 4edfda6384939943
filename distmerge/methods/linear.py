"""Linear (weighted average) merge: ``sum_i w_i x_i`` (divided by ``sum_i w_i`` if normalize).

Like mergekit, the average runs over the models listed under ``models``; ``base_model`` is not
part of it unless it is listed there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distmerge.errors import ConfigError
from distmerge.methods import kernels
from distmerge.methods.base import MergeMethod, ParamSpec, ShardContext, TensorParams, weighted_sum


class Linear(MergeMethod):
    name = "linear"
    uses_base = False
    min_experts = 1
    global_parameters = {"normalize": ParamSpec(True, bool)}
    model_parameters = {"weight": ParamSpec(None)}

    def validate(self, params: TensorParams, where: str) -> None:
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
        """One fused pass (:func:`kernels.weighted_sum`) where the compute dtype has a kernel,
        else :meth:`merge_reference`; the two agree bit for bit."""
        dtype = experts[0].dtype
        mode = kernels.kernel_mode(dtype)
        if mode is None:
            return self.merge_reference(experts, params)
        kd = kernels.kernel_dtype(dtype)
        weights = [p["weight"] for p in params.experts]
        divisor = self._divisor(weights, dtype).to(kd).numpy() if params.global_["normalize"] else None
        out = kernels.weighted_sum([kernels.as_array(x, kd) for x in experts],
                                   np.array([kernels.scalar(w, dtype) for w in weights]), mode, divisor)
        return torch.from_numpy(out).reshape(experts[0].shape).to(dtype)

    def merge_reference(self, experts: Sequence[torch.Tensor], params: TensorParams) -> torch.Tensor:
        """The weighted sum as torch ops (the float16 path, and what the kernel reproduces)."""
        weights = [p["weight"] for p in params.experts]
        out = weighted_sum(experts, weights)
        if params.global_["normalize"]:
            out.div_(self._divisor(weights, out.dtype))
        return out

    @staticmethod
    def _divisor(weights: list[float], dtype: torch.dtype) -> torch.Tensor:
        # The weights' sum in the compute dtype, in mergekit's order of operations, so its
        # outputs are reproduced bit for bit.
        return torch.tensor(weights, dtype=dtype).sum()
