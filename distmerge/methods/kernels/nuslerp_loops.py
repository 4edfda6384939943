"""NuSLERP's two reduction rounds and its blend over a whole tensor as fused loops, one pass each.

Why: for a whole flattened tensor (mergekit's default ``nuslerp_flatten``) the torch
formulation makes the unit vectors, their product and a float64 copy of it for the cosine's
sum, then six elementwise temporaries for the blend. Here each element's steps run where the
element is read, and the cosine's float64 sum is added in numpy's pairwise order
(:mod:`.sum_orders`), so the floats are those of ``scalars.total`` of the torch product.

The steps, per element (``_r``: rounding to the compute dtype, every op as torch's; the
scalars are 0-dim tensors of the compute dtype, computed by torch before the loop):

    v_e = _r(x_e - b)  (or x_e without a base)
    norms round: sum of float64(v_0)**2 and of float64(v_1)**2, both in one pass
    cosine round: sum of float64(_r(_r(v_0 / n_0) * _r(v_1 / n_1)))
    blend: _r(_r(_r(a_0 v_0) + _r(a_1 v_1)) / s), or colinear _r(_r(c_0 v_0) + _r(c_1 v_1));
           then _r(b + that) with a base
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.rounding import _jit, _r, _value
from distmerge.methods.kernels.sum_orders import (
    PW_BLOCK,
    leaves_into,
    pairwise_combine,
    pairwise_spans,
    pw_block,
    square_into,
)


@_jit
def _vectors(b, x0, x1, s, z, has_base, mode, v0, v1):  # noqa: ANN001, ANN202
    """Elements ``s .. s + z`` of both vectors into ``v0`` and ``v1``."""
    a0, a1 = x0[s:s + z], x1[s:s + z]
    if has_base:
        bs = b[s:s + z]
        for i in range(z):
            v0[i] = _r(_value(a0, i) - _value(bs, i), mode)
        for i in range(z):
            v1[i] = _r(_value(a1, i) - _value(bs, i), mode)
    else:
        for i in range(z):
            v0[i] = _value(a0, i)
        for i in range(z):
            v1[i] = _value(a1, i)


@_jit
def nuslerp_square_sums(b, x0, x1, has_base, mode, like, sums):  # noqa: ANN001, ANN202
    """``reductions.dot(v_e, v_e)`` of both vectors over these rows into ``sums[0]`` and
    ``sums[1]``: the same float64 squares (exact for float32 and bfloat16 values, rounded as
    numpy rounds them for float64) with the same leaves and tree as two separate dots, from one
    read of the rows instead of two. ``like``: an array of the kernel dtype (the vectors'
    buffers take it)."""
    n = x0.size
    starts, sizes = pairwise_spans(n)
    leaf = np.empty((2, starts.size), dtype=np.float64)
    buf = np.empty((2, PW_BLOCK), dtype=np.float64)
    v0 = np.empty(PW_BLOCK, dtype=like.dtype)
    v1 = np.empty(PW_BLOCK, dtype=like.dtype)
    for j in range(starts.size):
        s = starts[j]
        z = sizes[j]
        _vectors(b, x0, x1, s, z, has_base, mode, v0, v1)
        square_into(buf[0], v0, z)
        square_into(buf[1], v1, z)
        leaves_into(leaf, j, buf, z, sums, n, j == starts.size - 1)


@_jit
def nuslerp_cosine_sum(b, x0, x1, has_base, mode, n0, n1):  # noqa: ANN001, ANN202
    """``scalars.total(_r(v_0 / n_0) * _r(v_1 / n_1))``: the unit vectors' float64 dot over
    these rows, in numpy's pairwise order; ``n_e`` are the clamped norms (array dtype)."""
    n = x0.size
    starts, sizes = pairwise_spans(n)
    leaf = np.empty(starts.size, dtype=np.float64)
    buf = np.empty(PW_BLOCK, dtype=np.float64)
    v0 = np.empty(PW_BLOCK, dtype=n0.dtype)
    v1 = np.empty(PW_BLOCK, dtype=n0.dtype)
    d0, d1 = n0[0], n1[0]
    for j in range(starts.size):
        s = starts[j]
        z = sizes[j]
        _vectors(b, x0, x1, s, z, has_base, mode, v0, v1)
        for i in range(z):
            buf[i] = np.float64(_r(_r(v0[i] / d0, mode) * _r(v1[i] / d1, mode), mode))
        leaf[j] = pw_block(buf, z)
    return pairwise_combine(n, leaf)


@_jit
def nuslerp_blend(b, x0, x1, has_base, mode, colinear, coefficients, out):  # noqa: ANN001, ANN202
    """The blended rows into ``out``: ``coefficients`` = ``(a_0, a_1, s)`` (the sines), or with
    ``colinear`` ``(1 - t, t, 1)`` as torch multiplies those Python numbers (array dtype)."""
    n = x0.size
    c0, c1, c2 = coefficients[0], coefficients[1], coefficients[2]
    v0 = np.empty(PW_BLOCK, dtype=out.dtype)
    v1 = np.empty(PW_BLOCK, dtype=out.dtype)
    for s in range(0, n, PW_BLOCK):
        z = min(PW_BLOCK, n - s)
        _vectors(b, x0, x1, s, z, has_base, mode, v0, v1)
        o = out[s:s + z]
        if colinear:
            for i in range(z):
                o[i] = _r(_r(c0 * v0[i], mode) + _r(c1 * v1[i], mode), mode)
        else:
            for i in range(z):
                o[i] = _r(_r(_r(c0 * v0[i], mode) + _r(c1 * v1[i], mode), mode) / c2, mode)
        if has_base:
            bs = b[s:s + z]
            for i in range(z):
                o[i] = _r(_value(bs, i) + o[i], mode)
