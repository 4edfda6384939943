"""Stable magnitude ranks along dim 1 by radix sort, and DELLA's keep rule built on them.

Why a kernel: DELLA keeps each delta element with a probability that grows linearly with the
rank of its magnitude inside its row (dim 1), and a merge with the L1 rescale evaluates that
rule twice (the L1 round, then the merge). As torch ops (a stable ``argsort`` per row, a scatter
of the positions, float64 uniform draws and a compare) it cost ~22x a linear merge per core.

Why it is exact: non-negative float32 magnitudes order like their uint32 bit patterns, so a
stable least-significant-digit radix sort over those patterns gives exactly the order of
``torch.argsort(stable=True)`` on the magnitudes, in O(n) per row: equal magnitudes stay in
position order, +0.0 and -0.0 are one key (the sign bit is cleared), denormals order by their
bits as by value, and every NaN gets one key above +inf (torch's sort puts NaNs last, as
equals). Only the bits that vary inside a row are sorted, in as few passes of at most 11 bits
as they need, each pass's histogram no larger than the row; where it takes fewer bits, the
keys are first rewritten as their offsets from the smallest nonzero key, zero kept below them
(:func:`_offset_keys`), which makes the deltas of bfloat16 weights one pass instead of two.

The DELLA loop (:func:`della_keep`) writes each element's keep probability from a per-rank
table (computed by the caller with the torch formulation's own ops, so its values are the same
floats) straight from its sorted position, then compares it with the element's uniform draw:
the keep stream (Philox4x32, :mod:`distmerge.methods.philox`) and float64 uniform as
``random_stream.keep_uniforms``. No order, rank or draw tensor is materialised; per element and
core it is ~3.5-3.9 ns against ~50 ns for the argsort alone.
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.rounding import INF_KEY, _inline, _jit, _r, _value, mode_tag
from distmerge.methods.philox import LANES, OUTPUTS_PER_COUNTER, fill_raw32

MAX_DIGIT = 11  # bits per radix pass at most: 2048 buckets
MIN_DIGIT = 4  # and at least (short rows): 16 buckets
_SIGN_OFF = np.uint32(0x7FFFFFFF)
_INF_KEY = np.uint32(INF_KEY)
_NAN_KEY = np.uint32(0x7F800001)  # every NaN: one key above +inf
_UNIT32 = 2.0**-32  # as random_stream.keep_uniforms: a 32-bit draw -> [0, 1)


@_inline
def _magnitude_key(v):  # noqa: ANN001, ANN202 - numba infers the types
    """Sort key of ``|float32(v)|``: its bit pattern, sign cleared, NaNs made one key."""
    k = np.float32(v).view(np.uint32) & _SIGN_OFF
    return _NAN_KEY if k > _INF_KEY else k


@_inline
def _key_stats(keys):  # noqa: ANN001, ANN202
    """``(vary, smallest, largest, zeros)``: the bits in which some key differs from the first,
    the smallest nonzero key (0xFFFFFFFF if none), the largest key and how many keys are 0."""
    k0 = keys[0]
    vary = np.uint32(0)
    smallest = np.uint32(0xFFFFFFFF)
    largest = np.uint32(0)
    zeros = 0
    for i in range(keys.size):
        k = keys[i]
        vary |= k ^ k0
        zeros += k == 0
        largest = max(largest, k)
        smallest = min(smallest, k if k != 0 else np.uint32(0xFFFFFFFF))
    return vary, smallest, largest, zeros


@_inline
def _bit_length(v):  # noqa: ANN001, ANN202
    width = 0
    while v >> np.uint32(width):
        width += 1
    return width


@_inline
def _offset_keys(keys, lo, smallest, zero):  # noqa: ANN001, ANN202
    """Each key replaced by its offset: ``0`` for a zero key, else ``((k - smallest) >> lo) +
    zero`` (``zero``: 1 when some key is 0, else 0).

    Why: a delta of two bfloat16 weights is a multiple of the weights' ulp, so a row's nonzero
    magnitudes span ~1000-1300 steps of bit ``lo`` (a few hundred distinct values), while the
    exact zeros a fine-tune leaves stretch the keys' varying bits to 14-15: two radix passes
    where the offsets need one. The map keeps order and ties, since every key has the same
    bits below ``lo``."""
    shift = np.uint32(lo)
    for i in range(keys.size):
        k = keys[i]
        keys[i] = np.uint32(0) if k == 0 else ((k - smallest) >> shift) + zero


@_jit
def _rank_row(keys, keys2, order, order2, hist, table, out, first, stride):  # noqa: ANN001, ANN202
    """``out[first + i * stride] = table[r_i]``, ``r_i`` the stable ascending rank of ``keys[i]``
    (uint32; clobbered, as ``keys2``, ``order`` and ``order2``, the scratch of the passes)."""
    n = keys.size
    vary, smallest, largest, zeros = _key_stats(keys)
    if vary == 0:  # one key: position order
        for i in range(n):
            out[first + i * stride] = table[i]
        return
    lo = 0  # the lowest and highest bits that vary: the rest orders nothing
    while (vary >> np.uint32(lo)) & np.uint32(1) == 0:
        lo += 1
    hi = _bit_length(vary)
    zero = np.uint32(1 if zeros else 0)
    offsets = _bit_length(((largest - smallest) >> np.uint32(lo)) + zero)
    if offsets < hi - lo:  # the offsets' bit 0 varies (as bit lo of the keys), their top is bit offsets - 1
        _offset_keys(keys, lo, smallest, zero)
        lo, hi = 0, offsets
    k0 = keys[0]
    widest = MIN_DIGIT  # buckets at most ~n: clearing and summing them costs no more than a pass
    while widest < MAX_DIGIT and (2 << widest) <= n:
        widest += 1
    passes = (hi - lo + widest - 1) // widest
    digit = (hi - lo + passes - 1) // passes
    buckets = 1 << digit
    mask = np.uint32(buckets - 1)
    h = hist[:passes, :buckets]
    h[:, :] = 0
    h0, h1, h2 = hist[0], hist[1], hist[2]
    low, step, step2 = np.uint32(lo), np.uint32(digit), np.uint32(2 * digit)
    if passes == 1:  # one loop per pass count: the compiler keeps the counters' addresses apart
        for i in range(n):
            h0[(keys[i] >> low) & mask] += 1
    elif passes == 2:
        for i in range(n):
            k = keys[i] >> low
            h0[k & mask] += 1
            h1[(k >> step) & mask] += 1
    elif passes == 3:
        for i in range(n):
            k = keys[i] >> low
            h0[k & mask] += 1
            h1[(k >> step) & mask] += 1
            h2[(k >> step2) & mask] += 1
    else:
        for i in range(n):
            k = keys[i] >> low
            for p in range(passes):
                h[p, (k >> np.uint32(p * digit)) & mask] += 1
    last = passes - 1  # a digit the same for every key orders nothing either (bit lo varies: pass 0 stays)
    while h[last, ((k0 >> np.uint32(lo + last * digit)) & mask)] == n:
        last -= 1
    src_k, dst_k, src_o, dst_o = keys, keys2, order2, order
    done = False
    for p in range(last + 1):
        shift = np.uint32(lo + p * digit)
        hp = h[p]
        if hp[(k0 >> shift) & mask] == n:
            continue
        total = 0
        for b in range(buckets):
            c = hp[b]
            hp[b] = total
            total += c
        if p == last:  # the final positions are the ranks: write the table there
            if done:
                for i in range(n):
                    d = (src_k[i] >> shift) & mask
                    at = hp[d]
                    hp[d] = at + 1
                    out[first + src_o[i] * stride] = table[at]
            else:
                for i in range(n):
                    d = (src_k[i] >> shift) & mask
                    at = hp[d]
                    hp[d] = at + 1
                    out[first + i * stride] = table[at]
            return
        if done:
            for i in range(n):
                k = src_k[i]
                d = (k >> shift) & mask
                at = hp[d]
                hp[d] = at + 1
                dst_k[at] = k
                dst_o[at] = src_o[i]
        else:
            for i in range(n):
                k = src_k[i]
                d = (k >> shift) & mask
                at = hp[d]
                hp[d] = at + 1
                dst_k[at] = k
                dst_o[at] = i
        done = True
        src_k, dst_k, src_o, dst_o = dst_k, src_k, dst_o, src_o


@_jit
def _scratch(n):  # noqa: ANN001, ANN202
    """The passes' scratch for rows of ``n``: keys, keys2, order, order2 and the histograms."""
    return (np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.int32),
            np.empty(n, dtype=np.int32), np.empty((8, 1 << MAX_DIGIT), dtype=np.int32))


@_jit
def _rank_values(values, outer, n, inner, table, out):  # noqa: ANN001, ANN202
    """``out[f] = table[rank of |values[f]| along dim 1]`` for a flat (outer, n, inner) block."""
    keys, keys2, order, order2, hist = _scratch(n)
    for o in range(outer):
        if inner == 1:  # contiguous rows: a slice (see _della_keep)
            row = values[o * n:(o + 1) * n]
            for j in range(n):
                keys[j] = _magnitude_key(row[j])
            _rank_row(keys, keys2, order, order2, hist, table, out, o * n, 1)
        else:
            for c in range(inner):
                first = o * n * inner + c
                for j in range(n):
                    keys[j] = _magnitude_key(values[first + j * inner])
                _rank_row(keys, keys2, order, order2, hist, table, out, first, inner)


@_jit
def _della_keep(base, x, mode, outer, n, inner, table, key0, key1, start, mask, probs):  # noqa: ANN001, ANN202
    """DELLA's keep rule on a flat (outer, n, inner) block of deltas ``x - base`` (rounded in
    ``mode``): ``probs[f] = table[rank along dim 1]``; ``mask[f] = u(start + f) < probs[f]``."""
    keys, keys2, order, order2, hist = _scratch(n)
    slab = n * inner
    raw = np.empty(slab, dtype=np.uint32)
    state = np.empty((OUTPUTS_PER_COUNTER, LANES), dtype=np.uint64)
    for o in range(outer):
        s0 = o * slab
        if inner == 1:  # rows contiguous (every 2-D weight): slices, which the compiler vectorizes
            xs, bs = x[s0:s0 + n], base[s0:s0 + n]
            for j in range(n):
                keys[j] = _magnitude_key(abs(_r(_value(xs, j) - _value(bs, j), mode)))
            _rank_row(keys, keys2, order, order2, hist, table, probs, s0, 1)
        else:
            for c in range(inner):
                for j in range(n):
                    f = s0 + j * inner + c
                    keys[j] = _magnitude_key(abs(_r(_value(x, f) - _value(base, f), mode)))
                _rank_row(keys, keys2, order, order2, hist, table, probs, s0 + c, inner)
        fill_raw32(key0, key1, start + s0, raw, state)
        pr = probs[s0:s0 + slab]
        m = mask[s0:s0 + slab]
        for i in range(slab):  # the 32-bit draw * 2**-32, exact in float64
            m[i] = np.float64(raw[i]) * _UNIT32 < np.float64(pr[i])


def block_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(outer, n, inner)`` of a tensor ranked along dim 1; fewer than 2 dims: one row."""
    if len(shape) < 2:
        total = 1
        for d in shape:
            total *= d
        return 1, total, 1
    inner = 1
    for d in shape[2:]:
        inner *= d
    return shape[0], shape[1], inner


def rank_values(values: np.ndarray, shape: tuple[int, ...], table: np.ndarray) -> np.ndarray:
    """``table[r]`` for each element of the flat float32 ``values`` of ``shape``, ``r`` the
    0-based stable rank of its magnitude along dim 1 (as ``torch.argsort(stable=True)``)."""
    outer, n, inner = block_dims(shape)
    out = np.empty(values.size, dtype=table.dtype)
    if out.size:
        _rank_values(values, outer, n, inner, table, out)
    return out


def magnitude_ranks(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """0-based stable ranks (int64, flat) of ``|values|`` along dim 1 of ``shape``."""
    return rank_values(values, shape, np.arange(block_dims(shape)[1], dtype=np.int64))


def della_keep(base: np.ndarray, x: np.ndarray, mode: int, shape: tuple[int, ...], table: np.ndarray,
               key: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """DELLA's keep mask and keep probabilities (flat bool and float32) of the delta block
    ``x - base`` of ``shape`` (kernel arrays in ``mode``, as :func:`delta_arrays` gives them):
    element ``f`` gets ``table[r]``, ``r`` its magnitude's rank along dim 1, and is kept where
    the Philox uniform of element ``start + f`` under ``key`` is below that probability."""
    mask = np.empty(x.size, dtype=np.bool_)
    probs = np.empty(x.size, dtype=np.float32)
    if x.size:
        outer, n, inner = block_dims(shape)
        _della_keep(base, x, mode_tag(mode), outer, n, inner, table, key[0], key[1], start, mask, probs)
    return mask, probs
