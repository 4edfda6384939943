"""L1 norms of a delta chunk before and after sparsification: the L1 rescale round's partials.

What is summed, and in which order, is fixed (the partials must be the same floats for the same
chunk on any machine): ``sum |d|`` and ``sum |d * keep|`` in float64 over blocks of
``L1_BLOCK`` elements from the chunk's start, each block summed left to right from +0.0 and
added to the running totals in block order.

Why this module: summed one element at a time, each block is one chain of dependent float64
additions, so the loop waited on the adder's latency (about half of a DARE merge's L1 round
besides the draws). Blocks are independent chains, so ``CHAINS`` of them are summed side by
side, which gives bit for bit the same block sums (each chain adds the same values in the same
order). An element that is not kept adds +0.0 to the after-sum instead of being skipped,
which changes nothing: the sum starts at +0.0 and adds magnitudes only, so it is never -0.0,
and ``s + 0.0 == s`` for every other ``s`` (NaN included).

DARE's keep-mask is drawn here from its stream (:class:`~distmerge.methods.philox.KeepStream`)
one span at a time instead of being materialised for the whole chunk first.
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.rounding import _jit, _key, _r, _value, key_bounds, mode_tag
from distmerge.methods.philox import LANES, OUTPUTS_PER_COUNTER, KeepStream, fill_keep

L1_BLOCK = 1024  # elements per block sum (part of the result's definition: do not change)
CHAINS = 8  # blocks summed side by side (``_chains`` spells out eight)


@_jit
def _magnitudes(base, x, mode, lo, hi, mask, keep, first, mags, kept):  # noqa: ANN001, ANN202
    """``mags[i] = |d|`` (float64) and ``kept[i]`` = ``|d|`` if kept else +0.0, for the elements
    ``first .. first + mags.size`` of the chunk (kept: keys in ``[lo, hi]``, int32 bounds from
    :func:`.rounding.key_bounds`; ``keep``: their draws, or empty). One
    branch-free loop per condition: a loop-invariant branch inside would stop vectorization."""
    xs = x[first:first + mags.size]  # slices, not x[first + i]: index arithmetic blocks vectorization
    bs = base[first:first + mags.size]
    for i in range(mags.size):
        d = _r(_value(xs, i) - _value(bs, i), mode)
        k = _key(d)
        a = np.float64(abs(d))
        mags[i] = a
        kept[i] = a if (lo <= k) & (k <= hi) else 0.0
    if mask.size:
        m = mask[first:first + mags.size]
        for i in range(mags.size):
            kept[i] = kept[i] if m[i] else 0.0
    if keep.size:
        for i in range(mags.size):
            kept[i] = kept[i] if keep[i] else 0.0


@_jit
def _chains(mags, kept, sums):  # noqa: ANN001, ANN202
    """Add ``CHAINS`` whole blocks' sums (each left to right from +0.0) to ``sums`` in block
    order; the chains advance together, in scalars (array accumulators would wait on stores)."""
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = 0.0
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    n = L1_BLOCK
    for i in range(n):
        b0 += mags[i]
        b1 += mags[n + i]
        b2 += mags[2 * n + i]
        b3 += mags[3 * n + i]
        b4 += mags[4 * n + i]
        b5 += mags[5 * n + i]
        b6 += mags[6 * n + i]
        b7 += mags[7 * n + i]
        a0 += kept[i]
        a1 += kept[n + i]
        a2 += kept[2 * n + i]
        a3 += kept[3 * n + i]
        a4 += kept[4 * n + i]
        a5 += kept[5 * n + i]
        a6 += kept[6 * n + i]
        a7 += kept[7 * n + i]
    for b, a in ((b0, a0), (b1, a1), (b2, a2), (b3, a3), (b4, a4), (b5, a5), (b6, a6), (b7, a7)):
        sums[0] += b
        sums[1] += a


@_jit
def _abs_sums(base, x, mode, lo, hi, mask, stream, sums):  # noqa: ANN001, ANN202
    n = x.size
    span = CHAINS * L1_BLOCK
    keep = np.empty(span if stream.size else 0, dtype=np.bool_)
    state = np.empty((OUTPUTS_PER_COUNTER, LANES), dtype=np.uint64)
    mags = np.empty(span, dtype=np.float64)
    kept = np.empty(span, dtype=np.float64)
    for s in range(0, n, span):
        m = min(span, n - s)
        if stream.size:
            fill_keep(stream[0], stream[1], stream[2] + np.uint64(s), stream[3], keep[:m], state)
        _magnitudes(base, x, mode, lo, hi, mask, keep[:m], s, mags[:m], kept[:m])
        if m == span:
            _chains(mags, kept, sums)
            continue
        for c in range(0, m, L1_BLOCK):  # the tail: block by block
            b = 0.0
            a = 0.0
            for i in range(c, min(c + L1_BLOCK, m)):
                b += mags[i]
                a += kept[i]
            sums[0] += b
            sums[1] += a


def abs_sums(
    base: np.ndarray, x: np.ndarray, mode: int, lo: int, hi: int, mask: np.ndarray | None,
    stream: KeepStream | None = None,
) -> tuple[float, float]:
    """L1 norms of a delta chunk before and after sparsification (keys in ``[lo, hi)`` and,
    where given, ``mask`` and the keep-draws of ``stream`` from the chunk's start): one pass,
    float64, the same sums for the same chunk every time."""
    sums = np.zeros(2, dtype=np.float64)
    _abs_sums(base, x, mode_tag(mode), *key_bounds(lo, hi), np.zeros(0, dtype=np.bool_) if mask is None else mask,
              np.zeros(0, dtype=np.uint64) if stream is None else stream.packed(), sums)
    return float(sums[0]), float(sums[1])
