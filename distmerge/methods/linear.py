"""Linear (weighted average) merge: ``sum_i w_i x_i`` (divided by ``sum_i w_i`` if normalize).

Like mergekit, the average runs over the models listed under ``models``; ``base_model`` is not
part of it unless it is listed there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distmerge.errors import ConfigError
from distmerge.methods.base import MergeMethod, ParamSpec, ShardContext, TensorParams, weighted_sum


class Linear(MergeMethod):
    name = "linear"
    uses_base = False
    min_experts = 1
    global_parameters = {"normalize": ParamSpec(True, bool)}
    model_parameters = {"weight": ParamSpec(None)}

    def validate(self, params: TensorParams, where: str) -> None:
        if params.global_["normalize"] and sum(p["weight"] for p in params.experts) == 0:
            raise ConfigError(f"{where}: weights sum to 0, so normalize=true would divide by zero")

    def merge(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        stats: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        weights = [p["weight"] for p in params.experts]
        out = weighted_sum(experts, weights)
        if params.global_["normalize"]:
            # Divide the weighted sum by the weights' sum in the compute dtype, in mergekit's
            # order of operations, so its outputs are reproduced bit for bit.
            out.div_(torch.tensor(weights, dtype=out.dtype).sum())
        return out
