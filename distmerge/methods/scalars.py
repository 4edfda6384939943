"""Whole-tensor scalars that mergekit computes as torch reductions in the compute dtype.

distmerge sums them in float64 over canonical chunks (``methods.reductions``), then rounds the
exact-ish sum once to the dtype mergekit's reduction returns, so the value differs from
mergekit's only where mergekit's own accumulation error crosses a rounding boundary. The
axis-wise helpers sum along dim 0 (a sum over the rows of a chunk) in numpy, whose row-by-row
order does not depend on the thread count.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def as_dtype(value: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (float64) rounded once to ``dtype``, as a tensor."""
    return torch.as_tensor(value, dtype=torch.float64).to(dtype)


def sqrt_as(sum_sq: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 2-norm from its float64 sum of squares, rounded once to ``dtype``."""
    if isinstance(sum_sq, torch.Tensor):
        return torch.sqrt(sum_sq.to(torch.float64)).to(dtype)
    return as_dtype(math.sqrt(sum_sq), dtype)


def column_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b, dim=0)`` in float64 (products of float64 copies), numpy's row order."""
    x = a.detach().to(torch.float64).numpy()
    y = b.detach().to(torch.float64).numpy()
    return torch.from_numpy(np.add.reduce(x * y, axis=0))


def column_sum(a: torch.Tensor) -> torch.Tensor:
    """``sum(a, dim=0)`` in float64, numpy's row order."""
    return torch.from_numpy(np.add.reduce(a.detach().to(torch.float64).numpy(), axis=0))


def total(a: torch.Tensor) -> float:
    """``sum a`` in float64 (numpy's pairwise sum of a flat float64 copy)."""
    return float(np.add.reduce(a.detach().reshape(-1).to(torch.float64).numpy()))


def row_sum(a: torch.Tensor) -> torch.Tensor:
    """``sum(a, dim=-1)`` in float64, one pairwise sum per last-dim vector."""
    return torch.from_numpy(np.add.reduce(a.detach().to(torch.float64).contiguous().numpy(), axis=-1))
