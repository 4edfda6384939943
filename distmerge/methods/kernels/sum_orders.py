"""float64 sums in the exact orders of numpy's and torch's CPU reductions, for fused kernels.

Why: SLERP's and model stock's statistics are whole-tensor float64 sums, taken until now with
numpy (``reductions.dot``: ``np.add.reduce`` of the products) and torch (``.double().sum()``)
after casting every row to float64: three or four passes over memory and two temporaries
per sum. A fused kernel computes each product where it reads the rows; to give the same
floats it must add them in the same order, which is what this module reproduces.

* numpy (``np.add.reduce`` of a contiguous float64 vector, one call of the inner loop for the
  whole vector): ``0.0 + pairwise(v)``, where ``pairwise`` splits a vector longer than 128
  into ``n2 = n // 2 - (n // 2) % 8`` and the rest, recursively, and sums a vector of at
  most 128 with eight accumulators (``_pw_block``; fewer than 8 elements: left to right
  from -0.0). The kernels compute the leaves' sums themselves (:func:`pairwise_spans` gives
  the leaves in order) and combine them with :func:`pairwise_combine`.
* torch (``sum`` of a contiguous float64 tensor, or of each contiguous last-dim row, on one
  intra-op thread: ``cascade_sum`` in aten/src/ATen/native/cpu/SumKernel.cpp):
  :func:`cascade_sum`, in steps (:func:`cascade_plan`, :func:`cascade_rows`, ...) that a
  kernel can feed with values it computes a window at a time. Its order depends on the width of torch's ``Vectorized<double>``
  (4 or 8 lanes) in the kernel torch dispatches to, which :func:`torch_sum_lanes` finds by
  probing torch once; where neither width reproduces torch, callers keep torch's own sum.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from distmerge.methods.kernels.rounding import _inline, _jit

PW_BLOCK = 128  # numpy's PW_BLOCKSIZE
_STACK = 128  # pairwise tree depth bound: log2(n / 64), so any n below 2**70
CASCADE_LEVELS = _LEVELS = 4  # torch's multi_row_sum: num_levels
_ROWS = 4  # torch's row_sum: ilp_factor


# ---- numpy: pairwise ----------------------------------------------------------------------

@_inline
def pw_block(v, n):  # noqa: ANN001, ANN202 - numba infers the types
    """numpy's pairwise sum of ``v[:n]`` for ``n <= 128``."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += v[i]
        return res
    r0, r1, r2, r3, r4, r5, r6, r7 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
    i = 8
    end = n - n % 8
    while i < end:
        r0 += v[i]
        r1 += v[i + 1]
        r2 += v[i + 2]
        r3 += v[i + 3]
        r4 += v[i + 4]
        r5 += v[i + 5]
        r6 += v[i + 6]
        r7 += v[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += v[i]
        i += 1
    return res


@_jit
def _split(n):  # noqa: ANN001, ANN202
    """Where numpy splits a vector longer than ``PW_BLOCK``: half, rounded down to 8."""
    n2 = n // 2
    return n2 - n2 % 8


@_jit
def pairwise_spans(n):  # noqa: ANN001, ANN202
    """``(starts, sizes)`` of the leaves of numpy's pairwise sum of ``n`` elements, in order
    (at least one leaf, of size 0 when ``n == 0``). Iterative: numba's cache cannot link a
    recursive function called from another cached one."""
    starts = np.empty(n // 56 + 2, dtype=np.int64)  # leaves of a longer vector hold >= 57
    sizes = np.empty(n // 56 + 2, dtype=np.int64)
    stack = np.empty((_STACK, 2), dtype=np.int64)  # (start, size), the left child on top
    stack[0, 0] = 0
    stack[0, 1] = n
    top = 1
    count = 0
    while top > 0:
        top -= 1
        lo = stack[top, 0]
        m = stack[top, 1]
        if m <= PW_BLOCK:
            starts[count] = lo
            sizes[count] = m
            count += 1
            continue
        n2 = _split(m)
        stack[top, 0] = lo + n2
        stack[top, 1] = m - n2
        stack[top + 1, 0] = lo
        stack[top + 1, 1] = n2
        top += 2
    return starts[:count], sizes[:count]


@_inline
def square_into(q, v, z):  # noqa: ANN001, ANN202
    """``q[:z]`` = the exact float64 squares of ``v[:z]`` (a leaf of a norm's pairwise sum)."""
    for i in range(z):
        q[i] = np.float64(v[i]) * np.float64(v[i])


@_jit
def leaves_into(leaf, j, buf, z, sums, n, last):  # noqa: ANN001, ANN202
    """Leaf ``j`` of each lane's pairwise sum from ``buf[lane, :z]``; after the ``last`` leaf,
    each lane's whole sum of ``n`` elements into ``sums``."""
    for e in range(leaf.shape[0]):
        leaf[e, j] = pw_block(buf[e], z)
    if last:
        for e in range(leaf.shape[0]):
            sums[e] = pairwise_combine(n, leaf[e])


@_jit
def pairwise_combine(n, leaf):  # noqa: ANN001, ANN202
    """``np.add.reduce`` of ``n`` elements whose leaves (:func:`pairwise_spans`) summed to
    ``leaf``: the tree's additions, left + right, evaluated with an explicit stack."""
    if n == 0:
        return 0.0
    sizes = np.empty(_STACK, dtype=np.int64)  # frames: a node's size and how far it got
    states = np.empty(_STACK, dtype=np.int64)
    values = np.empty(_STACK, dtype=np.float64)
    sizes[0] = n
    states[0] = 0
    frames = 1
    held = 0
    next_leaf = 0
    while frames > 0:
        m = sizes[frames - 1]
        if m <= PW_BLOCK:
            values[held] = leaf[next_leaf]
            held += 1
            next_leaf += 1
            frames -= 1
            continue
        state = states[frames - 1]
        states[frames - 1] = state + 1
        if state < 2:  # expand the left child, then the right one
            sizes[frames] = _split(m) if state == 0 else m - _split(m)
            states[frames] = 0
            frames += 1
        else:
            held -= 1
            values[held - 1] = values[held - 1] + values[held]
            frames -= 1
    return 0.0 + values[0]


# ---- torch: cascade_sum ---------------------------------------------------------------------

@_inline
def ceil_log2(x):  # noqa: ANN001, ANN202
    """ATen's ``utils::CeilLog2``: 1 for ``x <= 2``, else ``ceil(log2(x))`` (inlined into the loops;
    callable from Python too, where :mod:`distmerge.methods.stack_sums` uses it)."""
    if x <= 2:
        return 1
    v = x - 1
    bits = 0
    while v > 0:
        v >>= 1
        bits += 1
    return bits


@_jit
def cascade_short(v):  # noqa: ANN001, ANN202
    """torch's scalar ``row_sum`` (a vector shorter than one SIMD vector): four accumulators
    over quads, the tail into the first, then the other three into it."""
    n = v.size
    a = np.zeros(_ROWS, dtype=np.float64)
    quads = n // _ROWS
    for i in range(quads):
        for k in range(_ROWS):
            a[k] += v[i * _ROWS + k]
    for p in range(quads * _ROWS, n):
        a[0] += v[p]
    for k in range(1, _ROWS):
        a[0] += a[k]
    return 0.0 + a[0]


@_jit
def cascade_plan(n, lanes):  # noqa: ANN001, ANN202
    """``(width, rows, step, power)`` of torch's ``multi_row_sum`` over ``n >= lanes`` values:
    rows of ``width = 4 * lanes`` values, carried up a level every ``step = 2**power`` rows."""
    width = _ROWS * lanes
    rows = (n // lanes) // _ROWS
    power = max(4, ceil_log2(rows) // _LEVELS)
    return width, rows, 1 << power, power


@_jit
def cascade_rows(acc, values, count, width):  # noqa: ANN001, ANN202
    """Add ``count`` rows of ``values`` to level 0, row after row (one chain per column)."""
    a0 = acc[0]
    for j in range(count):
        row = values[j * width:(j + 1) * width]
        for c in range(width):
            a0[c] += row[c]


@_jit
def cascade_carry(acc, i, power):  # noqa: ANN001, ANN202
    """After ``i`` rows (a multiple of the step): carry each level into the next, up to the
    first level whose block is not complete yet."""
    mask = (1 << power) - 1
    for level in range(1, _LEVELS):
        for c in range(acc.shape[1]):
            acc[level, c] += acc[level - 1, c]
            acc[level - 1, c] = 0.0
        if (i & (mask << (level * power))) != 0:
            break


@_jit
def cascade_finish(acc, rest, lanes):  # noqa: ANN001, ANN202
    """The sum, from the levels and ``rest``: the values after the last whole row (fewer
    than three vectors, then fewer than ``lanes`` scalars)."""
    for level in range(1, _LEVELS):
        for c in range(acc.shape[1]):
            acc[0, c] += acc[level, c]
    vectors = rest.size // lanes
    for vec in range(vectors):  # row_sum's leftover vectors, into the first
        for lane in range(lanes):
            acc[0, lane] += rest[vec * lanes + lane]
    for k in range(1, _ROWS):
        for lane in range(lanes):
            acc[0, lane] += acc[0, k * lanes + lane]
    final = 0.0
    for p in range(vectors * lanes, rest.size):
        final += rest[p]
    for lane in range(lanes):
        final += acc[0, lane]
    return 0.0 + final


@_jit
def cascade_sum(v, lanes):  # noqa: ANN001, ANN202
    """torch's single-thread ``sum`` of the contiguous float64 vector ``v`` with ``lanes``-wide
    vectors (``vectorized_inner_sum``; shorter than one vector: :func:`cascade_short`).
    Fused kernels run the same steps on values they compute a window at a time."""
    n = v.size
    if n < lanes:
        return cascade_short(v)
    width, rows, step, power = cascade_plan(n, lanes)
    acc = np.zeros((_LEVELS, width), dtype=np.float64)
    i = 0
    while i + step <= rows:
        cascade_rows(acc, v[i * width:(i + step) * width], step, width)
        i += step
        cascade_carry(acc, i, power)
    cascade_rows(acc, v[i * width:rows * width], rows - i, width)
    return cascade_finish(acc, v[rows * width:], lanes)


@cache
def torch_sum_lanes() -> int:
    """The vector width (4 or 8) with which :func:`cascade_sum` equals torch's float64 ``sum``
    on this machine and torch build, or 0 when neither does (then use torch's own sum)."""
    g = torch.Generator().manual_seed(0)
    probes = [torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(4 * torch.randn(n, generator=g,
              dtype=torch.float64)) for n in (9, 37, 100, 1000, 5000)]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wanted = [float(p.sum()) for p in probes]
    finally:
        torch.set_num_threads(saved)
    for lanes in (4, 8):
        if all(cascade_sum(p.numpy(), lanes) == w for p, w in zip(probes, wanted, strict=True)):
            return lanes
    return 0
