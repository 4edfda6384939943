"""SLERP's and model stock's passes as fused loops: their statistics, then their blends.

Why: both methods read the rows twice (a reduction round, then the merge), and wrote each
pass as several torch/numpy ops with a float64 copy of every row (the dot products) or a
compute-dtype temporary per op (the blend): per core they cost 2.4x a linear merge. Here each
pass is one loop that reads the rows where they are, in their compute dtype; bfloat16 rows
are read as their bits (``uint16``) and widened in the loop, without a cast pass first.

Exactness: every value is the one the torch/numpy formulation computes, added in the same
order. The statistics are float64 sums of the products of float64 values (exact for float32
and bfloat16 rows, rounded as numpy rounds them for float64) or of compute-dtype products,
summed in numpy's or torch's order (:mod:`.sum_orders`); the blends are the same IEEE operations in the same order, each
rounded to the compute dtype where torch rounds (bfloat16: ``_r``), with no fused
multiply-add (numba does not contract unless asked).
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.rounding import _jit, _r, _value
from distmerge.methods.kernels.sum_orders import (
    CASCADE_LEVELS,
    PW_BLOCK,
    cascade_carry,
    cascade_finish,
    cascade_plan,
    cascade_rows,
    cascade_short,
    pairwise_combine,
    pairwise_spans,
    pw_block,
)

BLOCK = 2048  # elements per block of the blends: the running average stays in L1


# ---- SLERP -----------------------------------------------------------------------------------

@_jit
def slerp_sums(v0, v1, out):  # noqa: ANN001, ANN202
    """``out = [<v0, v1>, <v0, v0>, <v1, v1>]``: ``reductions.dot``'s float64 sums (products
    of the float64 values, numpy's pairwise order), all three in one pass."""
    n = v0.size
    starts, sizes = pairwise_spans(n)
    leaf = np.empty((3, starts.size), dtype=np.float64)
    p01 = np.empty(PW_BLOCK, dtype=np.float64)
    p00 = np.empty(PW_BLOCK, dtype=np.float64)
    p11 = np.empty(PW_BLOCK, dtype=np.float64)
    for j in range(starts.size):
        s = starts[j]
        z = sizes[j]
        a = v0[s:s + z]
        b = v1[s:s + z]
        for i in range(z):
            x = np.float64(_value(a, i))
            y = np.float64(_value(b, i))
            p01[i] = x * y
            p00[i] = x * x
            p11[i] = y * y
        leaf[0, j] = pw_block(p01, z)
        leaf[1, j] = pw_block(p00, z)
        leaf[2, j] = pw_block(p11, z)
    for k in range(3):
        out[k] = pairwise_combine(n, leaf[k])


@_jit
def slerp_blend(v0, v1, s0, s1, out):  # noqa: ANN001, ANN202
    """``out = s0 * v0 + s1 * v1`` in ``out``'s dtype (float32 or float64): two rounded
    products and a rounded sum, as ``base.to(acc) * s0`` then ``add_(x.to(acc) * s1)``."""
    acc = out.dtype.type
    for i in range(out.size):
        out[i] = acc(_value(v0, i)) * s0 + acc(_value(v1, i)) * s1


# ---- model stock ---------------------------------------------------------------------------

@_jit
def _squares(b, xs, mode, lo, hi, out):  # noqa: ANN001, ANN202
    """``out[e] = <o_e, o_e>`` over elements ``lo .. hi``: float64 sums of the exact squares of
    the task vectors ``o_e = xs[e] - b`` (``reductions.dot``, numpy's order), all in one pass."""
    n = hi - lo
    k = len(xs)
    starts, sizes = pairwise_spans(n)
    leaf = np.empty((k, starts.size), dtype=np.float64)
    sq = np.empty(PW_BLOCK, dtype=np.float64)
    for j in range(starts.size):
        s = lo + starts[j]
        z = sizes[j]
        bs = b[s:s + z]
        for e in range(k):
            xe = xs[e][s:s + z]
            for i in range(z):
                o = np.float64(_r(_value(xe, i) - _value(bs, i), mode))
                sq[i] = o * o
            leaf[e, j] = pw_block(sq, z)
    for e in range(k):
        out[e] = pairwise_combine(n, leaf[e])


@_jit
def _products(b, xa, xb, mode, lo, hi, buf):  # noqa: ANN001, ANN202
    """``buf[:hi - lo]`` = float64 of ``o_a * o_b`` rounded to the compute dtype."""
    bs = b[lo:hi]
    ys = xa[lo:hi]
    zs = xb[lo:hi]
    for i in range(hi - lo):
        base = _value(bs, i)
        buf[i] = np.float64(_r(_r(_value(ys, i) - base, mode) * _r(_value(zs, i) - base, mode), mode))


@_jit
def _cross(b, xa, xb, mode, lanes, lo, hi):  # noqa: ANN001, ANN202
    """``(o_a * o_b).double().sum()`` over elements ``lo .. hi``: the compute-dtype products,
    summed in torch's order a window at a time."""
    n = hi - lo
    if n < lanes:
        buf = np.empty(n, dtype=np.float64)
        _products(b, xa, xb, mode, lo, hi, buf)
        return cascade_short(buf)
    width, rows, step, power = cascade_plan(n, lanes)
    acc = np.zeros((CASCADE_LEVELS, width), dtype=np.float64)
    buf = np.empty(step * width, dtype=np.float64)
    i = 0
    while i + step <= rows:
        _products(b, xa, xb, mode, lo + i * width, lo + (i + step) * width, buf)
        cascade_rows(acc, buf, step, width)
        i += step
        cascade_carry(acc, i, power)
    _products(b, xa, xb, mode, lo + i * width, lo + rows * width, buf)
    cascade_rows(acc, buf, rows - i, width)
    rest = n - rows * width  # < width: leftover vectors and scalars
    _products(b, xa, xb, mode, lo + rows * width, hi, buf)
    return cascade_finish(acc, buf[:rest], lanes)


@_jit
def stock_grams(b, xs, mode, lanes, row_len, out):  # noqa: ANN001, ANN202
    """Gram matrices of the task vectors, one per row of ``row_len`` elements (the whole
    tensor: one row) into ``out[r]``: on the diagonal ``reductions.dot`` of the offsets, off
    it the float64 sum of their compute-dtype products in torch's order (``lanes``)."""
    k = len(xs)
    diag = np.empty(k, dtype=np.float64)
    for r in range(out.shape[0]):
        lo = r * row_len
        hi = lo + row_len
        _squares(b, xs, mode, lo, hi, diag)
        for i in range(k):
            out[r, i, i] = diag[i]
            for j in range(i + 1, k):
                v = _cross(b, xs[i], xs[j], mode, lanes, lo, hi)
                out[r, i, j] = v
                out[r, j, i] = v


@_jit
def stock_blend(b, xs, mode, t, omt, n, out):  # noqa: ANN001, ANN202
    """``out = t * avg + (1 - t) * base`` with ``avg = (x_0 + 0 + x_1 + ...) / n``, each op
    rounded to the compute dtype; ``t`` and ``omt`` (= ``1 - t``) hold one value per row of
    ``out.size // t.size`` elements (the whole tensor: one)."""
    k = len(xs)
    zero = out.dtype.type(0.0)
    avg = np.empty(BLOCK, dtype=out.dtype)
    row_len = out.size // t.size if t.size else 0
    for r in range(t.size):
        tt = t[r]
        oo = omt[r]
        for c in range(0, row_len, BLOCK):
            s = r * row_len + c
            m = min(BLOCK, row_len - c)
            a = avg[:m]
            x0 = xs[0][s:s + m]
            for i in range(m):
                a[i] = _r(_value(x0, i) + zero, mode)
            for e in range(1, k):
                xe = xs[e][s:s + m]
                for i in range(m):
                    a[i] = _r(a[i] + _value(xe, i), mode)
            bs = b[s:s + m]
            o = out[s:s + m]
            for i in range(m):
                o[i] = _r(_r(tt * _r(a[i] / n, mode), mode) + _r(oo * _value(bs, i), mode), mode)
