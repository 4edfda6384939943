"""Population variance across models, element by element, as ``torch.var(dim=0, unbiased=False)``.

Why a kernel: SCE selects elements by the variance of the models' task vectors at each
position, and evaluates it in every reduction round and again in the merge. torch computes a
variance along dim 0 with a scalar Welford loop through its generic reduction machinery, which
measured 0.2-3 us per element on one core (most of an SCE merge's time).

Why it is exact: it is torch's CPU algorithm (``WelfordOps`` with double accumulation): for each
model in order, ``delta = x - mean; mean += delta / count; m2 += delta * (x - mean)``, all in
float64, then ``m2 / n``, rounded to the input dtype by the caller as torch rounds its result.
Every input dtype is widened exactly (float16 and bfloat16 to float32, float32 to float64).
"""

from __future__ import annotations

import numpy as np
import torch

from distmerge.methods.kernels.rounding import _inline, _jit


@_inline
def exact_reciprocal(count):  # noqa: ANN001, ANN202 - numba infers the types
    """``1 / count`` where ``count`` is a power of two, else 0.0 (see :func:`over_count`)."""
    c = np.int64(count)
    return 1.0 / np.float64(c) if c & (c - 1) == 0 else 0.0


@_inline
def over_count(v, count, reciprocal):  # noqa: ANN001, ANN202
    """``v / count`` in float64. Where ``count`` is a power of two (``reciprocal`` from
    :func:`exact_reciprocal` not 0) it multiplies instead: ``v * 2^-k`` rounds the same real
    number as ``v / 2^k``, so it is the same float, and a vector multiply costs a fraction of
    a division (the first two models' Welford steps and a two-model ``m2 / n`` measured 10-20%
    of SCE's fused loops). In the fused loops over a block the test is loop-invariant, so each
    loop keeps one form; the per-element loop here tests it once per model."""
    return v * reciprocal if reciprocal != 0.0 else v / count


@_jit
def _welford(stack, out):  # noqa: ANN001, ANN202 - numba infers the types
    """``out[j]`` = population variance of ``stack[:, j]`` (float64 accumulation)."""
    n, m = stack.shape
    for j in range(m):
        mean = 0.0
        m2 = 0.0
        for i in range(n):
            x = np.float64(stack[i, j])
            delta = x - mean
            mean = mean + over_count(delta, np.float64(i + 1), exact_reciprocal(i + 1))
            m2 = m2 + delta * (x - mean)
        out[j] = over_count(m2, np.float64(n), exact_reciprocal(n))


def variance_across(stacked: torch.Tensor) -> torch.Tensor:
    """``torch.var(stacked, dim=0, unbiased=False)``, bit for bit, for a float tensor whose dim 0
    indexes the models."""
    n = stacked.shape[0]
    wide = torch.float64 if stacked.dtype == torch.float64 else torch.float32
    rows = stacked.detach().reshape(n, -1).to(wide).contiguous().numpy()
    out = np.empty(rows.shape[1], dtype=np.float64)
    _welford(rows, out)
    return torch.from_numpy(out).reshape(stacked.shape[1:]).to(stacked.dtype)
