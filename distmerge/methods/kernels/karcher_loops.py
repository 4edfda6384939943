"""The Karcher mean's reduction rounds and merge as fused loops, one pass over the rows each.

Why: every round of :class:`~distmerge.methods.karcher.Karcher` replays, on its rows, the
iterate's elementwise updates of all the finished iterations (mergekit's torch expressions in
the compute dtype), as whole-chunk tensors: a dozen temporaries per iteration, in each of up to
``2 + 3 * max_iter`` rounds. Here every element's updates run where the element is read, in
blocks of at most 128 elements, and the float64 sums are added in numpy's pairwise order
(:mod:`.sum_orders`), so the floats equal ``reductions.dot`` of the torch tensors.

Rounding follows torch's CPU binary ops with a 0-dim operand (``_r``: to the compute dtype):
a scalar on the right keeps its float32 value (``u * alpha``, ``t / norm``, ``g / |g|``); one
on the left is first cast to the compute dtype (``cos|g| * m``, ``sin|g| * ...``, the final
``scale * m``), so the caller passes those already rounded. Per element, over the valid inputs v:

    u_v = _r(x_v / n_v);   m = _r(... _r(0 + _r(u_0 a_0)) + _r(u_1 a_1) ...)
    m = u_0 if |m| < tol else _r(m / |m|)
    per finished step s:  g = _r(... + _r(c_sv _r(u_v - _r(d_sv m))))   (inputs with a coefficient)
                          m' = _r(_r(cos_s m) + _r(sin_s _r(g / |g|_s)));  m = m' or _r(m' / |m'|_s)

``stage``: 0 ``sums[i] = <x_i, x_i>`` over all inputs; 1 ``sums[0] = <m, m>`` of the first
mean; 2 ``sums[v] = <m, u_v>``; 3 ``sums[0] = <g, g>`` of the pending step; 4 ``sums[0] = <m',
m'>`` of the pending step; 5 ``out = _r(scale m)``.
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.rounding import _jit, _r, _value
from distmerge.methods.kernels.sum_orders import PW_BLOCK, leaves_into, pairwise_spans, square_into


@_jit
def _tangent(units, mean, z, dots, coefs, live, s, mode, out):  # noqa: ANN001, ANN202
    """Step ``s``'s tangent of elements ``:z`` into ``out``."""
    zero = out.dtype.type(0.0)
    for i in range(z):
        out[i] = zero
    for v in range(units.shape[0]):
        if not live[s, v]:
            continue
        u = units[v]
        d = dots[s, v]
        c = coefs[s, v]
        for i in range(z):
            out[i] = _r(out[i] + _r(c * _r(u[i] - _r(d * mean[i], mode), mode), mode), mode)


@_jit
def _step(mean, tangent, z, cos_s, sin_s, tn, un, divide, mode):  # noqa: ANN001, ANN202
    """The exponential-map update of ``mean[:z]`` in place (renormalized when ``divide``)."""
    for i in range(z):
        mean[i] = _r(_r(cos_s * mean[i], mode) + _r(sin_s * _r(tangent[i] / tn, mode), mode), mode)
    if divide:
        for i in range(z):
            mean[i] = _r(mean[i] / un, mode)


@_jit
def _block(xs, valid, norms, alphas, s0, z, mode, stage, mean_norm, use_first, dots, coefs, live,
           cos_s, sin_s, tns, uns, divides, steps, units, mean, tangent):  # noqa: ANN001, ANN202
    """Elements ``s0 .. s0 + z``: the valid units, and the mean after ``steps`` finished steps
    (stage 1: the first mean before its normalization)."""
    zero = mean.dtype.type(0.0)
    for i in range(z):
        mean[i] = zero
    for v in range(valid.size):
        x = xs[valid[v]][s0:s0 + z]
        n = norms[valid[v]]
        a = alphas[v]
        u = units[v]
        for i in range(z):
            u[i] = _r(_value(x, i) / n, mode)
        for i in range(z):
            mean[i] = _r(mean[i] + _r(u[i] * a, mode), mode)
    if stage == 1:
        return
    if use_first:
        for i in range(z):
            mean[i] = units[0, i]
    else:
        for i in range(z):
            mean[i] = _r(mean[i] / mean_norm, mode)
    for s in range(steps):
        _tangent(units, mean, z, dots, coefs, live, s, mode, tangent)
        _step(mean, tangent, z, cos_s[s], sin_s[s], tns[s], uns[s], divides[s], mode)


@_jit
def karcher_pass(xs, valid, norms, alphas, mode, stage, mean_norm, use_first, dots, coefs, live, cos_s, sin_s,
                 tns, uns, divides, steps, scale, sums, out):  # noqa: ANN001, ANN202
    """One round's float64 sums (``stage`` 0-4) or the merged rows (``stage`` 5); ``steps``
    finished iterations, and for stages 3-4 the pending one at index ``steps`` of the arrays
    (its ``tns``/``uns`` entries as far as reduced). ``valid``: indices of the valid inputs."""
    n = xs[0].size
    k = valid.size
    units = np.empty((max(k, 1), PW_BLOCK), dtype=norms.dtype)
    mean = np.empty(PW_BLOCK, dtype=norms.dtype)
    tangent = np.empty(PW_BLOCK, dtype=norms.dtype)
    if stage == 5:
        for s0 in range(0, n, PW_BLOCK):
            z = min(PW_BLOCK, n - s0)
            _block(xs, valid, norms, alphas, s0, z, mode, stage, mean_norm, use_first, dots, coefs, live,
                   cos_s, sin_s, tns, uns, divides, steps, units, mean, tangent)
            o = out[s0:s0 + z]
            for i in range(z):
                o[i] = _r(scale * mean[i], mode)
        return
    starts, sizes = pairwise_spans(n)
    lanes = len(xs) if stage == 0 else (k if stage == 2 else 1)
    leaf = np.empty((lanes, starts.size), dtype=np.float64)
    buf = np.empty((lanes, PW_BLOCK), dtype=np.float64)
    for j in range(starts.size):
        s0 = starts[j]
        z = sizes[j]
        if stage == 0:
            for e in range(len(xs)):
                x = xs[e][s0:s0 + z]
                q = buf[e]
                for i in range(z):
                    w = np.float64(_value(x, i))
                    q[i] = w * w
        else:
            _block(xs, valid, norms, alphas, s0, z, mode, stage, mean_norm, use_first, dots, coefs,
                   live, cos_s, sin_s, tns, uns, divides, steps, units, mean, tangent)
            if stage == 2:
                for v in range(k):
                    u = units[v]
                    q = buf[v]
                    for i in range(z):
                        q[i] = np.float64(mean[i]) * np.float64(u[i])
            elif stage == 1:
                square_into(buf[0], mean, z)
            else:
                _tangent(units, mean, z, dots, coefs, live, steps, mode, tangent)
                if stage == 4:
                    _step(mean, tangent, z, cos_s[steps], sin_s[steps], tns[steps], uns[steps], False, mode)
                square_into(buf[0], mean if stage == 4 else tangent, z)
        leaves_into(leaf, j, buf, z, sums, n, j == starts.size - 1)
