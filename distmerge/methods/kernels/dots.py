"""``np.add.reduce(a * b)`` in float64, fused: the products summed where they are made.

Why: the spherical methods (multislerp, karcher, nuslerp) and SLERP-like statistics take whole-
tensor dot products in float64 (``reductions.dot``) in every reduction round: numpy needs each
operand cast to a float64 copy and the product as a third array, three passes over memory and
16 bytes of temporaries per element, before its pairwise sum.

Why it is exact: a product of two float32 (or narrower) values is exact in float64, and for
float64 operands it rounds as numpy's multiply does; the products are then added in the order of
numpy's pairwise sum (:mod:`.sum_orders`: the same leaves, each summed with eight accumulators,
combined by the same tree), so the result is the same float.
"""

from __future__ import annotations

import numpy as np
import torch

from distmerge.methods.kernels.rounding import _jit, _value, value_arrays
from distmerge.methods.kernels.sum_orders import (
    PW_BLOCK,
    pairwise_combine,
    pairwise_spans,
    pw_block,
)


@_jit
def _dot(a, b):  # noqa: ANN001, ANN202 - numba infers the types
    n = a.size
    starts, sizes = pairwise_spans(n)
    leaf = np.empty(starts.size, dtype=np.float64)
    buf = np.empty(PW_BLOCK, dtype=np.float64)
    for j in range(starts.size):
        s = starts[j]
        z = sizes[j]
        x = a[s:s + z]  # slices, not a[s + i]: the index arithmetic kept this loop scalar (3x slower)
        y = b[s:s + z]
        for i in range(z):
            buf[i] = np.float64(_value(x, i)) * np.float64(_value(y, i))
        leaf[j] = pw_block(buf, z)
    return pairwise_combine(n, leaf)


def float64_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``float(np.add.reduce(a.double() * b.double()))`` over the flattened tensors."""
    if a.numel() != b.numel():
        raise ValueError(f"dot of {a.numel()} and {b.numel()} elements")
    # Arrays that widen to float64 exactly: float64 as is; bfloat16 as its bits (read through
    # ``_value``, no copy); anything else as float32 (numba reads no float16).
    wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    x, y = value_arrays([a, b], wide)
    return float(_dot(x, y))
