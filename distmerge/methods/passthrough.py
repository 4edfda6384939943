"""Passthrough: the one listed model's tensor, optionally multiplied by ``scale``.

mergekit uses it for layer-stacking ("frankenmerges") through ``slices``; distmerge's config
has no slices, so here it copies (and scales) one model. ``scale`` defaults to 1 (unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distmerge.methods.base import MergeMethod, ParamSpec, ShardContext, TensorParams


class Passthrough(MergeMethod):
    name = "passthrough"
    uses_base = False
    min_experts = 1
    max_experts = 1
    nonfinite_reaches_output = True  # a copy, or ``x * scale``: NaN and Inf stay NaN or Inf (0 * Inf is NaN)
    global_parameters = {}
    model_parameters = {"scale": ParamSpec(1.0)}

    def merge(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], params: TensorParams,
              ctx: ShardContext, stats: dict[str, Any] | None = None) -> torch.Tensor:
        scale = params.experts[0]["scale"]
        return experts[0].clone() if scale == 1.0 else experts[0] * scale
