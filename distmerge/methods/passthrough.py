"""Passthrough: the one listed model's tensor, optionally multiplied by ``scale``.

mergekit uses it for layer-stacking ("frankenmerges") through ``slices``; distmerge's config
has no slices, so here it copies (and scales) one model. ``scale`` defaults to 1 (unchanged).

At scale 1 the rows are returned as read, with no cast and no copy: widening bfloat16 to the
float32 compute dtype is exact, so the output cast gives the bytes the cast rows give. Not where
they hold a NaN or Inf: a NaN's payload does not survive torch's casts, so those rows take the
cast path and their bytes stay those of the cast rows (and mergekit's) too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distmerge.methods.base import MergeMethod, ParamSpec, ShardContext, TensorParams, in_compute


class Passthrough(MergeMethod):
    name = "passthrough"
    uses_base = False
    min_experts = 1
    max_experts = 1
    reads_stored_rows = True  # scale 1: the rows as read are the merge (see the module docstring)
    nonfinite_reaches_output = True  # a copy, or ``x * scale``: NaN and Inf stay NaN or Inf (0 * Inf is NaN)
    global_parameters = {}
    model_parameters = {"scale": ParamSpec(1.0)}

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, stats: dict[str, Any] | None = None) -> torch.Tensor:
        """The model's rows times ``scale``: in the compute dtype, or, at scale 1, the rows as
        read where the compute dtype holds them exactly (``ctx.compute`` set) and they are finite
        (one sum, a tenth of a cast's cost). The engine writes them as they are where the output
        dtype is theirs (``out_dtype: bfloat16``), else casts them once to it."""
        x, scale = experts[0], params.experts[0]["scale"]
        if scale != 1.0:
            return in_compute(x, ctx) * scale
        if ctx.compute is None or bool(torch.isfinite(x.sum())):
            return x
        return in_compute(x, ctx)
