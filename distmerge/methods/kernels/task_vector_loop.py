"""The task-vector merge in one fused loop (the L1 norms its rescale needs: :mod:`.l1_norms`).

The pipeline written as torch ops makes some thirty passes over memory per element (delta,
abs, compare, mask, weight, sign, clamp, sums ...); here it is one pass over cache-sized
blocks of the rows. Every operation is the torch formulation's
(``TaskVectorMethod.merge_reference``), in the same order, each rounded separately.

DARE's keep-mask is drawn inside the loop, one cache-sized block at a time, from the element
positions' stream (:mod:`distmerge.methods.philox`): no mask of the whole shard is made, and
since a draw depends on its element's position only, the flags are those of the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distmerge.methods.kernels.l1_norms import (
    abs_sums as abs_sums,  # re-exported: the L1 round's partials
)
from distmerge.methods.kernels.rounding import MAX_KEY, _jit, _key, _r, _value, key_bounds, mode_tag
from distmerge.methods.kernels.stack_order import reordered_from, stack_column
from distmerge.methods.philox import LANES, OUTPUTS_PER_COUNTER, KeepStream, fill_keep

NO_LOW = -1  # a low threshold below every key: no lower bound
NO_HIGH = 1 << 32  # a high threshold above every key: no upper bound
KEEP_NOTHING = 1 << 32  # a low threshold above every key

RESCALE_NONE, RESCALE_MULTIPLY, RESCALE_DIVIDE, RESCALE_DIVIDE_BY_PROBS = 0, 1, 2, 3

BLOCK = 512  # elements per block: every scratch row of a block together within a 32 KB L1 cache


@_jit
def _sparsified(x, b, mode, lo, hi, mask, kind, f, pr, w, row):  # noqa: ANN001, ANN202
    """One expert's weighted, sparsified, rescaled delta rows (keys kept in ``[lo, hi]``,
    int32 bounds from :func:`.rounding.key_bounds`); the common case in one loop."""
    zero = row.dtype.type(0.0)
    one = row.dtype.type(1.0)
    m = row.size
    if mask.size == 0 and kind == RESCALE_NONE:
        for j in range(m):
            d = _r(_value(x, j) - _value(b, j), mode)
            k = _key(d)
            row[j] = _r(d * (one if (lo <= k) & (k <= hi) else zero) * w, mode)
        return
    if mask.size and kind == RESCALE_MULTIPLY:  # DARE with the L1 rescale: the loops below in one
        for j in range(m):
            d = _r(_value(x, j) - _value(b, j), mode)
            k = _key(d)
            v = d * (one if (lo <= k) & (k <= hi) else zero) * (one if mask[j] else zero)
            row[j] = _r(_r(v * f, mode) * w, mode)
        return
    for j in range(m):
        d = _r(_value(x, j) - _value(b, j), mode)
        k = _key(d)
        row[j] = d * (one if (lo <= k) & (k <= hi) else zero)
    if mask.size:
        for j in range(m):
            row[j] = row[j] * (one if mask[j] else zero)
    if kind == RESCALE_MULTIPLY:
        for j in range(m):
            row[j] = _r(row[j] * f, mode)
    elif kind == RESCALE_DIVIDE:
        for j in range(m):
            row[j] = _r(row[j] / f, mode)
    elif kind == RESCALE_DIVIDE_BY_PROBS:
        for j in range(m):
            row[j] = _r(row[j] / pr[j], mode)
    for j in range(m):
        row[j] = _r(row[j] * w, mode)


@_jit
def _task_vectors(base, xs, mode, bounds, masks, streams, drawn, rescale_kind, rescale, probs,  # noqa: ANN001, ANN202
                  weights, consensus, normalize, total_weight, lam, tail, out):
    """One pass of the task-vector family; the torch formulation, op for op, per element.

    Per expert e: d = x - base; kept = d * mask (mask from the key bounds ``bounds[e]``, both
    inclusive (:func:`.rounding.key_bounds`), and,
    where given, an explicit mask, or where ``drawn[e]``, the keep-draws of the stream
    ``streams[e]`` = (key0, key1, start, threshold), drawn block by block); rescaled by a
    factor, a divisor or a per-element probability; weighted (by the weight rounded to the compute dtype). Then either a plain
    sum (normalized by ``total_weight`` if > 0) or TIES sign consensus (normalized by the
    agreeing weights); then lambda; then + base. Sums over the experts are accumulated in
    the array dtype and rounded once, as torch's ``sum(dim=0)``, left to right, except the
    elements :func:`.stack_order.reordered_from` names (``tail``: the shard-relative index
    where the whole tensor's tail starts), which are summed again in torch's order.
    The elements go in cache-sized blocks, expert by expert, and every inner loop is a
    simple branch-free loop over contiguous memory: that is what the compiler vectorizes
    (a per-element loop over the experts, or one with loop-invariant branches, runs
    several times slower).
    """
    n = len(xs)
    zero = out.dtype.type(0.0)
    one = out.dtype.type(1.0)
    wd = np.empty((max(n, 3), BLOCK), dtype=out.dtype)
    wd[n:] = zero  # the fused consensus below reads three rows: missing experts' are zeros of weight 0
    total = np.empty(BLOCK, dtype=out.dtype)
    sign = np.empty(BLOCK, dtype=out.dtype)
    div = np.empty(BLOCK, dtype=out.dtype)
    keep = np.empty(BLOCK, dtype=np.bool_)
    terms = np.empty(n, dtype=out.dtype)
    votes = np.empty(n, dtype=out.dtype)
    state = np.empty((OUTPUTS_PER_COUNTER, LANES), dtype=np.uint64)
    plain = not consensus  # task arithmetic: every expert's delta kept whole, a plain sum
    for e in range(n):
        plain = plain and not drawn[e] and masks[e].size == 0 and rescale_kind[e] == RESCALE_NONE
        plain = plain and bounds[e, 0] == 0 and bounds[e, 1] == MAX_KEY
    for s in range(0, out.size, BLOCK):
        m = min(BLOCK, out.size - s)
        b = base[s:s + m]
        acc = total[:m]
        if plain and reordered_from(n, tail, s, m) >= m:
            # The sum straight from the rows: the same terms, added in the same order as below.
            for e in range(n):
                x = xs[e][s:s + m]
                w = weights[e]
                if e == 0:
                    for j in range(m):
                        acc[j] = zero + _r(_r(_value(x, j) - _value(b, j), mode) * w, mode)
                else:
                    for j in range(m):
                        acc[j] = acc[j] + _r(_r(_value(x, j) - _value(b, j), mode) * w, mode)
            _finish(acc, b, mode, normalize, total_weight, lam, out[s:s + m])
            continue
        for e in range(n):
            kind = rescale_kind[e]
            if drawn[e]:
                st = streams[e]
                fill_keep(st[0], st[1], st[2] + np.uint64(s), st[3], keep[:m], state)
                mask = keep[:m]
            else:
                mask = masks[e][s:s + m] if masks[e].size else masks[e]
            _sparsified(xs[e][s:s + m], b, mode, bounds[e, 0], bounds[e, 1], mask,
                        kind, rescale[e], probs[e][s:s + m] if kind == RESCALE_DIVIDE_BY_PROBS else probs[e],
                        weights[e], wd[e, :m])
        # Sums over the experts accumulate unrounded (float32 in bfloat16 mode, as torch's
        # sum(dim=0) does) and are rounded once.
        first = wd[0, :m]
        for j in range(m):  # a loop: the slice assignment ``acc[:] = ...`` was measurably slower
            acc[j] = zero + first[j]  # from +0.0, as torch's sum: -0.0 terms sum to +0.0
        for e in range(1, n):
            row = wd[e, :m]
            for j in range(m):
                acc[j] = acc[j] + row[j]
        first_reordered = reordered_from(n, tail, s, m)
        for j in range(first_reordered, m):
            for e in range(n):
                terms[e] = wd[e, j]
            acc[j] = stack_column(terms, n, s + j >= tail)
        if consensus and n <= 3 and normalize and lam == one and first_reordered >= m:
            # Up to three experts at TIES' defaults: the loops below, fused into one pass per
            # element (the same operations in the same order). As five loops over the block the
            # consensus cost as much again as the thresholded sum before it; fused, the TIES merge
            # of two took 2.3 -> 1.2 ns per element (2^22 elements, AMD EPYC AVX2, alternated
            # three times). Fewer experts add rows of zeros and weight 0: each sum gains +-0.0
            # terms after a sum that is never -0.0 (it starts from +0.0), which changes no float.
            r0, r1, r2 = wd[0, :m], wd[1, :m], wd[2, :m]
            w0 = weights[0]
            w1 = weights[1] if n > 1 else zero
            w2 = weights[2] if n > 2 else zero
            z0, z1, z2 = zero * w0, zero * w1, zero * w2
            o = out[s:s + m]
            for j in range(m):
                sgn = one if _r(acc[j], mode) >= zero else -one
                a0 = r0[j] * sgn
                a0 = zero if a0 < zero else a0
                a1 = r1[j] * sgn
                a1 = zero if a1 < zero else a1
                a2 = r2[j] * sgn
                a2 = zero if a2 < zero else a2
                t = ((zero + a0) + a1) + a2
                d = _r(((zero + (w0 if a0 > zero else z0)) + (w1 if a1 > zero else z1)) + (w2 if a2 > zero else z2), mode)
                o[j] = _r(_value(b, j) + _r(_r(t, mode) * sgn / (one if d == zero else d), mode), mode)
            continue
        if consensus:
            sg = sign[:m]
            dv = div[:m]
            for e in range(n):
                row = wd[e, :m]
                ws = weights[e]
                wz = zero * ws
                if e == 0:  # elect the sign from the rounded total in acc, then start the agreeing sums
                    for j in range(m):
                        sgn = one if _r(acc[j], mode) >= zero else -one
                        sg[j] = sgn
                        a = row[j] * sgn
                        a = zero if a < zero else a  # clamp(min=0): -0.0 and NaN pass, as in torch
                        acc[j] = zero + a
                        dv[j] = zero + (ws if a > zero else wz)
                else:
                    for j in range(m):
                        a = row[j] * sg[j]
                        a = zero if a < zero else a
                        acc[j] = acc[j] + a
                        dv[j] = dv[j] + (ws if a > zero else wz)
            for j in range(first_reordered, m):
                for e in range(n):
                    a = wd[e, j] * sg[j]
                    a = zero if a < zero else a
                    terms[e] = a
                    votes[e] = weights[e] if a > zero else zero * weights[e]
                acc[j] = stack_column(terms, n, s + j >= tail)
                dv[j] = stack_column(votes, n, s + j >= tail)
            if normalize and lam == one:  # TIES' defaults: sign, normalize and + base in one loop
                o = out[s:s + m]
                for j in range(m):
                    d = _r(dv[j], mode)
                    o[j] = _r(_value(b, j) + _r(_r(acc[j], mode) * sg[j] / (one if d == zero else d), mode), mode)
                continue
            for j in range(m):
                acc[j] = _r(acc[j], mode) * sg[j]
            if normalize:
                for j in range(m):
                    # torch adds (div == 0): +1 where zero; adding +0.0 elsewhere changes nothing
                    d = _r(dv[j], mode)
                    acc[j] = _r(acc[j] / (one if d == zero else d), mode)
            _add_base(acc, b, mode, lam, out[s:s + m])
        else:
            _finish(acc, b, mode, normalize, total_weight, lam, out[s:s + m])


@_jit
def _finish(acc, b, mode, normalize, total_weight, lam, o):  # noqa: ANN001, ANN202
    """A plain sum's end: round it, normalize by the total weight, then :func:`_add_base`."""
    for j in range(acc.size):
        acc[j] = _r(acc[j], mode)
    if normalize:
        for j in range(acc.size):
            acc[j] = _r(acc[j] / total_weight, mode)
    _add_base(acc, b, mode, lam, o)


@_jit
def _add_base(acc, b, mode, lam, o):  # noqa: ANN001, ANN202
    """Every merge's end: the merged delta times lambda, plus base."""
    one = o.dtype.type(1.0)
    m = acc.size
    if lam != one:
        for j in range(m):
            acc[j] = _r(acc[j] * lam, mode)
    for j in range(m):
        o[j] = _r(_value(b, j) + acc[j], mode)


def task_vectors(
    base: np.ndarray, xs: Sequence[np.ndarray], mode: int, *, low: Sequence[int], high: Sequence[int],
    masks: Sequence[np.ndarray | None], rescale_kind: Sequence[int], rescale: np.ndarray,
    probs: Sequence[np.ndarray | None], weights: np.ndarray, consensus: bool,
    normalize: bool, total_weight: np.ndarray, lam: np.ndarray,
    streams: Sequence[KeepStream | None] | None = None, tail: int | None = None,
) -> np.ndarray:
    """Run :func:`_task_vectors` (see there); ``None`` masks/probs/streams mean "not used".
    ``base`` and ``xs`` are read through ``_value`` (bfloat16 bits or the kernel dtype's
    floats); ``weights`` are the weights rounded to the compute dtype (mergekit multiplies by
    those), in the kernel dtype, which the result takes too; a stream's ``start`` is the stream
    position of ``base[0]``; ``tail`` is where the whole tensor's tail starts relative to
    ``base[0]`` (:func:`distmerge.methods.stack_sums.tail_start`; None: beyond the rows)."""
    empty_mask = np.zeros(0, dtype=np.bool_)
    empty_probs = np.zeros(0, dtype=weights.dtype)
    drawn = [st is not None for st in streams] if streams is not None else [False] * len(xs)
    packed = np.zeros((len(xs), 4), dtype=np.uint64)
    for e, st in enumerate(streams or ()):
        if st is not None:
            packed[e] = st.packed()
    out = np.empty(base.size, dtype=weights.dtype)
    bounds = np.array([key_bounds(lo, hi) for lo, hi in zip(low, high, strict=True)], dtype=np.int32).reshape(-1, 2)
    _task_vectors(base, tuple(xs), mode_tag(mode), bounds,
                  tuple(empty_mask if m is None else m for m in masks), packed, np.asarray(drawn, dtype=np.bool_),
                  np.asarray(rescale_kind, dtype=np.int64), rescale, tuple(empty_probs if p is None else p for p in probs),
                  weights, consensus, normalize, total_weight[()], lam[()],
                  base.size if tail is None else tail, out)
    return out
