"""Whole-tensor sums that do not depend on how the tensor was cut or how many threads ran.

Partial sums are taken over the canonical chunks of a reduction round in float64 with numpy's pairwise
summation (single-threaded, a fixed order for a given array), and the engine reduces them in
chunk order. torch's CPU reductions split work by thread count, so their last bits may
change with the machine; these do not.
"""

from __future__ import annotations

import numpy as np
import torch

from distmerge.methods.kernels.dots import float64_dot


def _f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().reshape(-1).to(torch.float64).numpy()


def sum_abs(x: torch.Tensor) -> float:
    """``sum |x|`` in float64."""
    return float(np.add.reduce(np.abs(_f64(x))))


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum a * b`` in float64 (elementwise products, then numpy's pairwise sum: no BLAS), by a
    fused kernel that gives numpy's float (:mod:`distmerge.methods.kernels.dots`)."""
    return float64_dot(a, b)


def rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b, dim=-1)`` in float64, one pairwise sum per last-dim vector.

    numpy reduces each contiguous last-dim vector on its own, so a vector's result does not
    depend on how many other vectors share the block.
    """
    x = a.detach().to(torch.float64).contiguous().numpy()
    y = b.detach().to(torch.float64).contiguous().numpy()
    return torch.from_numpy(np.add.reduce(x * y, axis=-1))


def ordered_sum(values: list[float]) -> float:
    """Left-to-right float64 sum of per-chunk partials (the chunk order is canonical)."""
    total = 0.0
    for v in values:
        total += float(v)
    return total
