"""The linear merge's weighted sum in one fused loop, as mergekit 0.1.5 computes it.

mergekit accumulates ``result.addcmul_(x_i, w_i)`` into a zero float32 buffer (float64 for
float64 inputs) and divides by the weights' sum at the end; torch's CPU ``addcmul_`` is a fused
multiply-add for every element (its vectorized loop and its scalar tail alike). Here each
element gets exactly that: ``acc = fma(x_i, w_i, acc)`` from ``+0.0``, then ``acc / divisor``,
through LLVM's ``llvm.fma`` (correctly rounded on any CPU), so the result does not depend on
where a shard boundary falls. The caller rounds the float32/float64 result to the compute
dtype once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distmerge.methods.kernels.rounding import _fma, _jit, _value


@_jit
def _weighted_sum(xs, weights, out):  # noqa: ANN001, ANN202
    zero = out.dtype.type(0.0)
    n = len(xs)
    for i in range(out.size):
        v = _fma(_value(xs[0], i), weights[0], zero)
        for e in range(1, n):
            v = _fma(_value(xs[e], i), weights[e], v)
        out[i] = v


@_jit
def _divide(out, divisor):  # noqa: ANN001, ANN202
    for i in range(out.size):
        out[i] = out[i] / divisor


def weighted_sum(xs: Sequence[np.ndarray], weights: np.ndarray, divisor: np.ndarray | None) -> np.ndarray:
    """``fma``-accumulated ``sum_e xs[e] * weights[e]`` from +0.0, then ``/ divisor`` if given;
    the weights and the divisor in one accumulation dtype (float32 or float64), which the result
    takes; ``xs`` read through ``_value`` (in that dtype, or float32's as bfloat16 bits)."""
    out = np.empty(xs[0].size, dtype=weights.dtype)
    _weighted_sum(tuple(xs), weights, out)
    if divisor is not None:
        _divide(out, divisor[()])
    return out
