"""SLERP's and model stock's passes as fused loops: their statistics, then their blends.

Why: both methods read the rows twice (a reduction round, then the merge), and wrote each
pass as several torch/numpy ops with a float64 copy of every row (the dot products) or a
compute-dtype temporary per op (the blend): per core they cost 2.4x a linear merge. Here each
pass is one loop that reads the rows where they are, in their compute dtype; bfloat16 rows
are read as their bits (``uint16``) and widened in the loop, without a cast pass first.

Exactness: every value is the one the torch/numpy formulation computes, added in the same
order. The statistics are float64 sums of the products of float64 values (exact for float32
and bfloat16 rows, rounded as numpy rounds them for float64) or of compute-dtype products,
summed in numpy's order (SLERP) or the lane order (model stock, :mod:`.sum_orders`); the blends
are the same IEEE operations in the same order, each rounded to the compute dtype where torch
rounds (bfloat16: ``_r``), with no fused multiply-add (numba does not contract unless asked).
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.rounding import _jit, _r, _value
from distmerge.methods.kernels.sum_orders import (
    LANES,
    PW_BLOCK,
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
def _pair_sums(b, xa, xb, mode, lo, hi, out):  # noqa: ANN001, ANN202
    """``out = [<o_a, o_a>, <o_a, o_b>, <o_b, o_b>]`` over elements ``lo .. hi`` of the task
    vectors ``o = x - b`` (rounded to the compute dtype): the float64 squares (exact for
    float32 and bfloat16 offsets, rounded for float64), and the compute dtype's products
    widened, in the lane order (``sum_orders.lane_sum``), one pass.
    The arrays are sliced first: a loop from a run-time start did not vectorize (1.56 against
    0.40 ns per element, measured)."""
    bs = b[lo:hi]
    ys = xa[lo:hi]
    zs = xb[lo:hi]
    n = hi - lo
    whole = n - n % LANES
    aa = np.zeros(LANES, dtype=np.float64)
    ab = np.zeros(LANES, dtype=np.float64)
    bb = np.zeros(LANES, dtype=np.float64)
    for s in range(0, whole, LANES):
        for lane in range(LANES):
            w = _value(bs, s + lane)
            u = _r(_value(ys, s + lane) - w, mode)
            v = _r(_value(zs, s + lane) - w, mode)
            aa[lane] += np.float64(u) * np.float64(u)
            ab[lane] += np.float64(_r(u * v, mode))
            bb[lane] += np.float64(v) * np.float64(v)
    taa = 0.0
    tab = 0.0
    tbb = 0.0
    for lane in range(LANES):
        taa += aa[lane]
        tab += ab[lane]
        tbb += bb[lane]
    for i in range(whole, n):
        w = _value(bs, i)
        u = _r(_value(ys, i) - w, mode)
        v = _r(_value(zs, i) - w, mode)
        taa += np.float64(u) * np.float64(u)
        tab += np.float64(_r(u * v, mode))
        tbb += np.float64(v) * np.float64(v)
    out[0] = taa
    out[1] = tab
    out[2] = tbb


@_jit
def stock_grams(b, xs, mode, row_len, out):  # noqa: ANN001, ANN202
    """Gram matrices of the task vectors, one per row of ``row_len`` elements (the whole
    tensor: one row) into ``out[r]``, by :func:`_pair_sums` pair by pair (a loop over every
    model at once did not vectorize: 2.4 against 1.3 ns per element for three models); square
    ``i`` is taken from the pair ``(i, i + 1)``, the last from ``(k - 2, k - 1)``: every pair
    that has it gives the same float."""
    k = len(xs)
    sums = np.empty(3, dtype=np.float64)
    for r in range(out.shape[0]):
        lo = r * row_len
        for i in range(k - 1):
            for j in range(i + 1, k):
                _pair_sums(b, xs[i], xs[j], mode, lo, lo + row_len, sums)
                out[r, i, j] = sums[1]
                out[r, j, i] = sums[1]
                if j == i + 1:
                    out[r, i, i] = sums[0]
                if i == k - 2:
                    out[r, j, j] = sums[2]


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
