"""Multi-SLERP's four reduction rounds and its blend as fused loops, one pass over the rows each.

Why: each round of :class:`~distmerge.methods.multislerp.MultiSlerp` needs the elementwise steps
before it (the unit vectors, their weighted mean, the tangent), which the torch formulation
replays as whole-chunk tensors: a stacked copy of the experts and five or six temporaries per
round, four rounds and a merge. Here every element's steps run where the element is read, and
each round's float64 sums are added in numpy's pairwise order (:mod:`.sum_orders`), so the
floats are the same as ``reductions.dot`` / ``scalars.total`` of the torch tensors.

The steps, per element ``j`` (``_r``: rounding to the compute dtype, every op as torch's):

    v_e = _r(x_e - b)  (or x_e without a base);   u_e = _r(v_e / den_e)
    mean = _r(0 + _r(u_0 w_0) + _r(u_1 w_1) + ...)   (torch's sum over the experts: one rounding,
                                                 in :mod:`.stack_order`'s order)
    m = _r(mean / mean_norm);   t_e = _r(u_e - _r(dot_e m))
    g = _r(0 + _r(t_0 w_0) + ...)
    out = _r(_r(_r(m cos) + _r(g sin_over)) * scale)  (+ b, rounded)

``stage`` picks what a call computes: 0 ``sums[e] = <v_e, v_e>``, 1 ``sums[0] = <mean, mean>``,
2 ``sums[e] = sum _r(u_e m)``, 3 ``sums[0] = <g, g>``, 4 the blended rows into ``out``.
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.rounding import _jit, _r, _value
from distmerge.methods.kernels.stack_order import reordered_from, stack_column
from distmerge.methods.kernels.sum_orders import PW_BLOCK, leaves_into, pairwise_spans, square_into


@_jit
def _block(b, xs, s, z, has_base, mode, stage, den, w, mean_norm, dots, units, mean, tangent, tail, terms):  # noqa: ANN001, ANN202
    """Elements ``s .. s + z``: the units (into ``units[e, :z]``), the mean (stage 1: before its
    normalization; later: after) and, from stage 3, the weighted tangent sum. Simple loops over
    the elements, one step at a time, so LLVM vectorizes each (the divisions above all); then
    the elements whose sums torch takes in another order (``tail``, :mod:`.stack_order`)."""
    zero = den.dtype.type(0.0)
    for i in range(z):
        mean[i] = zero
    for e in range(len(xs)):
        x = xs[e][s:s + z]
        u = units[e]
        d = den[e]
        we = w[e]
        if has_base:
            bs = b[s:s + z]
            for i in range(z):
                u[i] = _r(_r(_value(x, i) - _value(bs, i), mode) / d, mode)
        else:
            for i in range(z):
                u[i] = _r(_value(x, i) / d, mode)
        for i in range(z):
            mean[i] += _r(u[i] * we, mode)
    k = len(xs)
    first_reordered = reordered_from(k, tail, s, z)
    for i in range(first_reordered, z):
        for e in range(k):
            terms[e] = _r(units[e, i] * w[e], mode)
        mean[i] = stack_column(terms, k, s + i >= tail)
    if stage == 1:
        for i in range(z):
            mean[i] = _r(mean[i], mode)
        return
    for i in range(z):
        mean[i] = _r(_r(mean[i], mode) / mean_norm, mode)
    if stage == 2:
        return
    for i in range(z):
        tangent[i] = zero
    for e in range(len(xs)):
        u = units[e]
        de = dots[e]
        we = w[e]
        for i in range(z):
            tangent[i] += _r(_r(u[i] - _r(de * mean[i], mode), mode) * we, mode)
    for i in range(first_reordered, z):
        for e in range(k):
            terms[e] = _r(_r(units[e, i] - _r(dots[e] * mean[i], mode), mode) * w[e], mode)
        tangent[i] = stack_column(terms, k, s + i >= tail)
    for i in range(z):
        tangent[i] = _r(tangent[i], mode)


@_jit
def multislerp_pass(b, xs, has_base, mode, stage, den, w, mean_norm, dots, blend, tail, sums, out):  # noqa: ANN001, ANN202
    """One round's float64 sums (``stage`` 0-3) or the blended rows (``stage`` 4) of ``xs``.

    ``den``: each expert's ``norm + eps`` (zero raised to the smallest normal), ``w`` the weights,
    ``mean_norm`` and ``dots`` the reduced values so far, all in the kernels' array dtype;
    ``blend`` = ``(cos, sin / tn, scale)``. ``b`` is read only with ``has_base``. ``tail``: where
    the tensor's tail starts, relative to the rows' first element (:mod:`.stack_order`).
    """
    n = xs[0].size
    k = len(xs)
    units = np.empty((k, PW_BLOCK), dtype=den.dtype)
    mean = np.empty(PW_BLOCK, dtype=den.dtype)
    tangent = np.empty(PW_BLOCK, dtype=den.dtype)
    terms = np.empty(k, dtype=den.dtype)
    if stage == 4:
        c0, c1, c2 = blend[0], blend[1], blend[2]
        for s in range(0, n, PW_BLOCK):
            z = min(PW_BLOCK, n - s)
            _block(b, xs, s, z, has_base, mode, 3, den, w, mean_norm, dots, units, mean, tangent, tail, terms)
            o = out[s:s + z]
            for i in range(z):
                o[i] = _r(_r(_r(mean[i] * c0, mode) + _r(tangent[i] * c1, mode), mode) * c2, mode)
            if has_base:
                bs = b[s:s + z]
                for i in range(z):
                    o[i] = _r(o[i] + _value(bs, i), mode)
        return
    starts, sizes = pairwise_spans(n)
    lanes = k if stage in (0, 2) else 1
    leaf = np.empty((lanes, starts.size), dtype=np.float64)
    buf = np.empty((lanes, PW_BLOCK), dtype=np.float64)
    for j in range(starts.size):
        s = starts[j]
        z = sizes[j]
        if stage == 0:
            for e in range(k):
                x = xs[e][s:s + z]
                q = buf[e]
                if has_base:
                    bs = b[s:s + z]
                    for i in range(z):
                        v = np.float64(_r(_value(x, i) - _value(bs, i), mode))
                        q[i] = v * v
                else:
                    for i in range(z):
                        v = np.float64(_value(x, i))
                        q[i] = v * v
        else:
            _block(b, xs, s, z, has_base, mode, stage, den, w, mean_norm, dots, units, mean, tangent, tail, terms)
            if stage == 2:
                for e in range(k):
                    u = units[e]
                    q = buf[e]
                    for i in range(z):
                        q[i] = np.float64(_r(u[i] * mean[i], mode))
            else:
                square_into(buf[0], mean if stage == 1 else tangent, z)
        leaves_into(leaf, j, buf, z, sums, n, j == starts.size - 1)
