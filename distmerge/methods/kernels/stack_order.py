"""torch's stacked-sum order for one element, inside fused loops (see :mod:`..stack_sums`).

The loops sum over the models left to right, which is torch's order for all but a few
elements: those from :func:`distmerge.methods.stack_sums.tail_start` on (fewer than one
group of vectors per tensor) when there are five models or more, and every element from 18
models on. :func:`reordered_from` says where a block's first such element is, and the loops
recompute those elements with :func:`stack_column`, which is compiled on its own (not
inlined): it runs for a few elements per tensor, and inlining it would add its code to every
loop's compilation.
"""

from __future__ import annotations

from distmerge.methods.kernels.rounding import _inline, _jit
from distmerge.methods.kernels.sum_orders import ceil_log2

LEFT_TO_RIGHT_MAX = 17  # models: multi_row_sum carries every 16, and x + S equals S + x
QUAD = 4


@_inline
def reordered_from(n, tail, s, m):  # noqa: ANN001, ANN202 - numba infers the types
    """The first element of the block ``[s, s + m)`` (as an index into the block) whose sum
    over ``n`` models is not left to right, ``m`` for none; the tensor's tail starts at the
    shard-relative index ``tail``."""
    if n <= QUAD:
        return m
    if n > LEFT_TO_RIGHT_MAX:
        return 0
    return min(max(tail - s, 0), m)


@_jit
def _cascade(v, start, step, count):  # noqa: ANN001, ANN202
    """``multi_row_sum`` for one element: ``v[start + i * step]`` for ``i < count``, from +0.0."""
    zero = v.dtype.type(0.0)
    power = max(4, ceil_log2(count) // 4)
    width = 1 << power
    mask = width - 1
    a0 = zero
    a1 = zero
    a2 = zero
    a3 = zero
    i = 0
    while i + width <= count:
        for _ in range(width):
            a0 += v[start + i * step]
            i += 1
        a1 += a0
        a0 = zero
        if (i & (mask << power)) == 0:
            a2 += a1
            a1 = zero
            if (i & (mask << (2 * power))) == 0:
                a3 += a2
                a2 = zero
    while i < count:
        a0 += v[start + i * step]
        i += 1
    a0 += a1
    a0 += a2
    a0 += a3
    return a0


@_jit
def stack_column(v, n, tail):  # noqa: ANN001, ANN202
    """torch's sum of one element's ``n`` terms ``v[:n]``, from +0.0 and unrounded, in ``v``'s
    dtype: ``multi_row_sum``'s order, or in the tensor's tail ``row_sum``'s."""
    zero = v.dtype.type(0.0)
    if not tail:
        return zero + _cascade(v, 0, 1, n)
    quads = n // QUAD
    p0 = _cascade(v, 0, QUAD, quads)
    p1 = _cascade(v, 1, QUAD, quads)
    p2 = _cascade(v, 2, QUAD, quads)
    p3 = _cascade(v, 3, QUAD, quads)
    for i in range(QUAD * quads, n):
        p0 += v[i]
    p0 += p1
    p0 += p2
    p0 += p3
    return zero + p0
