"""Stable magnitude ranks along dim 1 by radix sort, and DELLA's keep rule built on them.

Why a kernel: DELLA keeps each delta element with a probability that grows linearly with the
rank of its magnitude inside its row (dim 1), and a merge with the L1 rescale evaluates that
rule twice (the L1 round, then the merge). As torch ops (a stable ``argsort`` per row, a scatter
of the positions, float64 uniform draws and a compare) it cost ~22x a linear merge per core.

Why it is exact: non-negative float32 magnitudes order like their uint32 bit patterns, so a
stable least-significant-digit radix sort over those patterns (:mod:`.radix_ranks`) gives
exactly the order of ``torch.argsort(stable=True)`` on the magnitudes, in O(n) per row: equal
magnitudes stay in position order, +0.0 and -0.0 are one key (the sign bit is cleared),
denormals order by their bits as by value, and every NaN gets one key above +inf (torch's sort
puts NaNs last, as equals). Contiguous rows are ranked two at a time.

The DELLA loop (:func:`della_keep`) writes each element's keep probability from a per-rank
table (computed by the caller with the torch formulation's own ops, so its values are the same
floats) straight from its sorted position, then compares it with the element's uniform draw:
the keep stream (Philox4x32, :mod:`distmerge.methods.philox`) and float64 uniform as
``random_stream.keep_uniforms``. No order, rank or draw tensor is materialised; per element and
core it is ~3.3-3.7 ns for bfloat16-compute deltas and ~7 ns for float32-compute ones of
bfloat16 weights (RESULTS.md, the twenty-third part), against ~50 ns for the argsort alone.
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.radix_ranks import _rank_pair, _rank_row, _scratch
from distmerge.methods.kernels.rounding import INF_KEY, _inline, _jit, _r, _value, mode_tag
from distmerge.methods.philox import LANES, OUTPUTS_PER_COUNTER, fill_raw32

_SIGN_OFF = np.uint32(0x7FFFFFFF)
_INF_KEY = np.uint32(INF_KEY)
_NAN_KEY = np.uint32(0x7F800001)  # every NaN: one key above +inf
_UNIT32 = 2.0**-32  # as random_stream.keep_uniforms: a 32-bit draw -> [0, 1)


@_inline
def _magnitude_key(v):  # noqa: ANN001, ANN202 - numba infers the types
    """Sort key of ``|float32(v)|``: its bit pattern, sign cleared, NaNs made one key."""
    k = np.float32(v).view(np.uint32) & _SIGN_OFF
    return _NAN_KEY if k > _INF_KEY else k


@_jit
def _rank_values(values, outer, n, inner, table, out):  # noqa: ANN001, ANN202
    """``out[f] = table[rank of |values[f]| along dim 1]`` for a flat (outer, n, inner) block."""
    a, b = _scratch(n), _scratch(n)
    keys, keys2, order, order2, hist = a
    if inner == 1:  # contiguous rows, two at a time (_rank_pair): slices (see _della_keep)
        for o in range(0, outer, 2):
            _value_keys(values[o * n:(o + 1) * n], a[0])
            if o + 1 < outer:
                _value_keys(values[(o + 1) * n:(o + 2) * n], b[0])
                _rank_pair(a, b, table, out, o * n, (o + 1) * n, 1)
            else:
                _rank_row(keys, keys2, order, order2, hist, table, out, o * n, 1)
        return
    for o in range(outer):
        for c in range(inner):
            first = o * n * inner + c
            for j in range(n):
                keys[j] = _magnitude_key(values[first + j * inner])
            _rank_row(keys, keys2, order, order2, hist, table, out, first, inner)


@_inline
def _value_keys(row, keys):  # noqa: ANN001, ANN202
    for j in range(row.size):
        keys[j] = _magnitude_key(row[j])


@_inline
def _delta_keys(xs, bs, mode, keys):  # noqa: ANN001, ANN202
    """The keys of the deltas ``xs - bs`` rounded in ``mode`` (slices, which the compiler vectorizes)."""
    for j in range(xs.size):
        keys[j] = _magnitude_key(abs(_r(_value(xs, j) - _value(bs, j), mode)))


@_jit
def _della_keep(base, x, mode, outer, n, inner, table, key0, key1, start, mask, probs):  # noqa: ANN001, ANN202
    """DELLA's keep rule on a flat (outer, n, inner) block of deltas ``x - base`` (rounded in
    ``mode``): ``probs[f] = table[rank along dim 1]``; ``mask[f] = u(start + f) < probs[f]``."""
    a, b = _scratch(n), _scratch(n)
    keys, keys2, order, order2, hist = a
    slab = n * inner
    raw = np.empty(2 * n if inner == 1 else slab, dtype=np.uint32)  # the draws of two rows, or of one slab
    state = np.empty((OUTPUTS_PER_COUNTER, LANES), dtype=np.uint64)
    if inner == 1:  # rows contiguous (every 2-D weight), two at a time (_rank_pair)
        for o in range(0, outer, 2):
            s0 = o * n
            _delta_keys(x[s0:s0 + n], base[s0:s0 + n], mode, keys)
            rows = 1
            if o + 1 < outer:
                _delta_keys(x[s0 + n:s0 + 2 * n], base[s0 + n:s0 + 2 * n], mode, b[0])
                _rank_pair(a, b, table, probs, s0, s0 + n, 1)
                rows = 2
            else:
                _rank_row(keys, keys2, order, order2, hist, table, probs, s0, 1)
            _draw_and_keep(key0, key1, start, s0, rows * n, raw, state, probs, mask)
        return
    for o in range(outer):
        s0 = o * slab
        for c in range(inner):
            for j in range(n):
                f = s0 + j * inner + c
                keys[j] = _magnitude_key(abs(_r(_value(x, f) - _value(base, f), mode)))
            _rank_row(keys, keys2, order, order2, hist, table, probs, s0 + c, inner)
        _draw_and_keep(key0, key1, start, s0, slab, raw, state, probs, mask)


@_inline
def _draw_and_keep(key0, key1, start, s0, count, raw, state, probs, mask):  # noqa: ANN001, ANN202
    """``mask[f] = u(start + f) < probs[f]`` for ``f`` in ``s0 .. s0 + count``."""
    fill_raw32(key0, key1, start + s0, raw[:count], state)
    pr = probs[s0:s0 + count]
    m = mask[s0:s0 + count]
    for i in range(count):  # the 32-bit draw * 2**-32, exact in float64
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
