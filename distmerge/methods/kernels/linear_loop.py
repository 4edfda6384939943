"""The linear merge's weighted sum in one fused loop (each product and sum rounded)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distmerge.methods.kernels.rounding import _jit, _r, mode_tag


@_jit
def _weighted_sum(xs, weights, mode, out):  # noqa: ANN001, ANN202
    n = len(xs)
    for i in range(out.size):
        v = _r(xs[0][i] * weights[0], mode)
        for e in range(1, n):
            v = _r(v + _r(xs[e][i] * weights[e], mode), mode)
        out[i] = v


@_jit
def _divide(out, divisor, mode):  # noqa: ANN001, ANN202
    for i in range(out.size):
        out[i] = _r(out[i] / divisor, mode)


def weighted_sum(xs: Sequence[np.ndarray], weights: np.ndarray, mode: int, divisor: np.ndarray | None) -> np.ndarray:
    """``sum_e weights[e] * xs[e]`` (each product and sum rounded), then ``/ divisor`` if given."""
    out = np.empty_like(xs[0])
    _weighted_sum(tuple(xs), weights, mode_tag(mode), out)
    if divisor is not None:
        _divide(out, divisor[()], mode_tag(mode))
    return out

