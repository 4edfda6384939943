"""NearSwap: take the other model's value where it is near the base, keep the base elsewhere.

    weight = clamp(t / max(|base - x|, 1e-6), 0, 1);   out = weight * x + (1 - weight) * base

Elementwise in the compute dtype, the same operations in mergekit 0.1.5's order, so the output
is bit-identical to mergekit's and shard-local (no reduction round). float32 and float64
compute run as one fused loop over the rows as stored (:mod:`.kernels.nearswap_loop`);
bfloat16 and float16 compute, whose every step torch rounds to that dtype, run the torch
expression itself (:func:`nearswap_reference`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from distmerge.methods.base import (
    MergeMethod,
    ParamSpec,
    Reductions,
    ShardContext,
    TensorParams,
    compute_dtype,
    rows_in_compute,
)
from distmerge.methods.kernels.nearswap_loop import nearswap_blend
from distmerge.methods.kernels.rounding import stored_array

_FUSED = {torch.float32: np.float32, torch.float64: np.float64}  # compute dtype -> the loop's


def nearswap_reference(t: float, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's expression on rows in the compute dtype: what the fused loop reproduces."""
    absdiff = torch.abs(base - x)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * x + (1 - weight) * base


class NearSwap(MergeMethod):
    name = "nearswap"
    uses_base = True
    reads_stored_rows = True
    min_experts = 1
    max_experts = 1
    global_parameters = {"t": ParamSpec(None)}
    model_parameters = {}

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, reduced: Reductions | None = None) -> torch.Tensor:
        assert base is not None
        t = params.global_["t"]
        dtype = compute_dtype(base, ctx)
        kind = _FUSED.get(dtype)
        if kind is None or experts[0].dtype != base.dtype:
            rows, (x,) = rows_in_compute(base, experts, ctx)
            assert rows is not None
            return nearswap_reference(t, rows, x)
        out = np.empty(base.numel(), dtype=kind)
        nearswap_blend(stored_array(base), stored_array(experts[0]), kind(t), out)
        return torch.from_numpy(out).reshape(base.shape)
