"""NearSwap: take the other model's value where it is near the base, keep the base elsewhere.

    weight = clamp(t / max(|base - x|, 1e-6), 0, 1);   out = weight * x + (1 - weight) * base

Elementwise in the compute dtype, the same torch operations in mergekit 0.1.5's order, so the
output is bit-identical to mergekit's and shard-local (no reduction round).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distmerge.methods.base import MergeMethod, ParamSpec, Reductions, ShardContext, TensorParams


class NearSwap(MergeMethod):
    name = "nearswap"
    uses_base = True
    min_experts = 1
    max_experts = 1
    global_parameters = {"t": ParamSpec(None)}
    model_parameters = {}

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        assert base is not None
        b = experts[0]
        absdiff = torch.abs(base - b)
        weight = (params.global_["t"] / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
        return weight * b + (1 - weight) * base
