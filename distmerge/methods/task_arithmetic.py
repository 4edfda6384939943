"""Task arithmetic (Ilharco et al. 2023): ``base + lambda * sum_i w_i (x_i - base)``.

With ``normalize`` the weighted delta sum is divided by ``sum_i w_i`` (mergekit's default for
task_arithmetic is normalize=false). This is the plain member of the task-vector family; the
methods issue generalises it into one pipeline (sparsify, consensus, normalize, lambda).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distmerge.methods.base import MergeMethod, ParamSpec, ShardContext, TensorParams, weighted_sum


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    uses_base = True
    min_experts = 1
    global_parameters = {
        "normalize": ParamSpec(False, bool),
        "lambda": ParamSpec(1.0),
    }
    model_parameters = {"weight": ParamSpec(None)}

    def merge(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        params: TensorParams,
        ctx: ShardContext,
        stats: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        assert base is not None
        weights = [p["weight"] for p in params.experts]
        mixed = weighted_sum([x - base for x in experts], weights)
        if params.global_["normalize"] and abs(sum(weights)) >= 1e-8:
            mixed /= sum(weights)
        return base + params.global_["lambda"] * mixed
