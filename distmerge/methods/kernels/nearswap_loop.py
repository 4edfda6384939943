"""NearSwap's blend as one fused loop over the rows as stored.

Why: written as torch ops, NearSwap makes eight passes over memory per element (the cast of
bfloat16 rows to float32, the difference, its absolute value, the clamp, the reciprocal, the
product with ``t``, the clamp to [0, 1], the two products and their sum), each with a fresh
temporary of the shard: per core it cost 2.2x a linear merge that reads one model more. Here it
is one pass that reads both rows where they are (bfloat16 as its bits, widened as read).

Exactness: the same IEEE operations in mergekit's order, each rounded to float32 (float64 for
float64 rows) as torch rounds them:

- ``t / absdiff.clamp(min=1e-6)`` is ``Tensor.__rtruediv__``, which torch writes as
  ``absdiff.reciprocal() * t``: a rounded reciprocal, then a rounded product with ``t`` cast to
  the rows' dtype;
- both clamps let NaN through and keep ``-0.0`` (torch's ``clamp`` compares, it does not take
  ``max``), so the selects below compare the same way;
- ``weight * x + (1 - weight) * base``: two rounded products and a rounded sum, no fused
  multiply-add (numba does not contract unless asked to).
"""

from __future__ import annotations

from distmerge.methods.kernels.rounding import _jit, _value


@_jit
def nearswap_blend(base, x, t, out):  # noqa: ANN001, ANN202 - numba infers the types
    """``out = w * x + (1 - w) * base`` with ``w = clamp(t / clamp(|base - x|, 1e-6), 0, 1)``,
    in ``out``'s dtype (float32, or float64); ``t`` is in that dtype already."""
    acc = out.dtype.type
    eps = acc(1e-6)
    zero = acc(0.0)
    one = acc(1.0)
    for i in range(out.size):
        b = acc(_value(base, i))
        v = acc(_value(x, i))
        d = abs(b - v)
        c = eps if d < eps else d  # NaN is not below eps: it goes through, as torch's clamp
        w = (one / c) * t
        w = zero if w < zero else w
        w = one if w > one else w
        out[i] = w * v + (one - w) * b
