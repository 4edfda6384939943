"""float64 sums in fixed orders for fused kernels: numpy's pairwise order, and a lane order.

Why: the statistics of SLERP, nuslerp, multislerp, Karcher and model stock are whole-tensor
float64 sums. A fused kernel computes each product where it reads the rows; to give the same
floats every time (and the floats of a torch/numpy formulation) it must add them in a fixed
order, which is what this module defines.

* numpy (``np.add.reduce`` of a contiguous float64 vector, one call of the inner loop for the
  whole vector): ``0.0 + pairwise(v)``, where ``pairwise`` splits a vector longer than 128
  into ``n2 = n // 2 - (n // 2) % 8`` and the rest, recursively, and sums a vector of at
  most 128 with eight accumulators (``_pw_block``; fewer than 8 elements: left to right
  from -0.0). The kernels compute the leaves' sums themselves (:func:`pairwise_spans` gives
  the leaves in order) and combine them with :func:`pairwise_combine`. ``reductions.dot``
  and the methods whose sums it defines add in this order.
* lanes (:data:`LANES` accumulators, element ``i`` into lane ``i % LANES``, :func:`lane_sum`):
  an order a loop keeps in SIMD registers. Model stock's Gram matrices add in it: three sums of
  two task vectors cost 0.43 ns per element that way against 1.23 ns in numpy's order with
  torch's for the cross terms (bfloat16 rows, float32 compute, 2^24 elements).
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from distmerge.methods.kernels.rounding import _inline, _jit

PW_BLOCK = 128  # numpy's PW_BLOCKSIZE
_STACK = 128  # pairwise tree depth bound: log2(n / 64), so any n below 2**70


# ---- numpy: pairwise ----------------------------------------------------------------------

@intrinsic
def _eight_accumulators(typingctx, v, n):  # noqa: ANN001, ANN202 - numba typing signature
    """numpy's eight accumulators over ``v[:n - n % 8]`` (``n >= 8``, ``v`` contiguous float64):
    ``r_j = ((v[j] + v[8 + j]) + v[16 + j]) + ...``, as one ``<8 x double>`` vector.

    Why LLVM IR: written as eight scalar chains, LLVM left them scalar (an inner trip count of
    8 is below its vectorizer's threshold, and its SLP pass did not pack them), 0.30 ns per
    element of a dot in cache; the vector adds are lane by lane the same IEEE additions in the
    same order, 0.21 ns."""
    if not (isinstance(v, types.Array) and v.dtype == types.float64 and v.ndim == 1 and v.layout == "C"
            and isinstance(n, types.Integer)):
        return None
    result = types.UniTuple(types.float64, 8)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        vector = ir.VectorType(ir.DoubleType(), 8)
        groups = builder.bitcast(data, vector.as_pointer())
        count = builder.sdiv(args[1], ir.Constant(args[1].type, 8))
        acc = cgutils.alloca_once(builder, vector)  # promoted to a register by LLVM
        builder.store(builder.load(groups, align=8), acc)
        one = ir.Constant(count.type, 1)
        with cgutils.for_range_slice(builder, one, count, one) as (g, _):
            builder.store(builder.fadd(builder.load(acc), builder.load(builder.gep(groups, [g]), align=8)), acc)
        total = builder.load(acc)
        lanes = [builder.extract_element(total, ir.Constant(ir.IntType(32), j)) for j in range(8)]
        return context.make_tuple(builder, result, lanes)

    return result(v, n), codegen


@_inline
def pw_block(v, n):  # noqa: ANN001, ANN202 - numba infers the types
    """numpy's pairwise sum of ``v[:n]`` for ``n <= 128`` (``v`` contiguous)."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += v[i]
        return res
    r0, r1, r2, r3, r4, r5, r6, r7 = _eight_accumulators(v, n)
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(n - n % 8, n):
        res += v[i]
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


@_inline
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


# ---- lanes: a float64 sum that vectorizes -----------------------------------------------------

LANES = 16  # a lane sum's accumulators: four AVX2 (two AVX-512) float64 vectors


def lane_sum(v: torch.Tensor) -> torch.Tensor:
    """The lane order's float64 sums of ``v``'s last-dim vectors, as torch ops (the reference
    of the loops that add in it, and their path where no loop runs): element ``i < n - n % LANES``
    goes to lane ``i % LANES``, added in order from +0.0 (torch's ``cumsum`` adds one after
    another); the lanes are added in order from +0.0, then the last ``n % LANES`` elements."""
    v = v.to(torch.float64)
    n = v.shape[-1]
    whole = n - n % LANES
    total = torch.zeros(v.shape[:-1], dtype=torch.float64)
    if whole:
        lanes = 0.0 + v[..., :whole].reshape(*v.shape[:-1], whole // LANES, LANES).cumsum(-2)[..., -1, :]
        for lane in range(LANES):
            total = total + lanes[..., lane]
    for i in range(whole, n):
        total = total + v[..., i]
    return total


# ---- ATen's helpers ----------------------------------------------------------------------------

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
