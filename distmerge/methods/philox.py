"""Philox4x64-10 in SIMD batches: the per-element random stream of DARE and DELLA at vector speed.

Why: DARE keeps each delta element iff its 64-bit draw is below a threshold, and with the L1
rescale it draws every element twice (the L1 round, then the merge). One Philox block after
another is a chain of ten dependent 64x64->128-bit multiplies, latency-bound at ~11 cycles
per draw, which made the draws cost more than the rest of a DARE merge together. Here
``LANES`` consecutive counters go through the ten rounds side by side, and each 64-bit high
product is written as four 32x32->64-bit ones, which the compiler turns into AVX-512/AVX2
``vpmuludq`` (there is no vector 64x64->128-bit multiply): about three times the throughput.

Why it is exact: it is the same function. Element ``i`` of a stream is output ``i % 4`` of the
Philox4x64-10 block at counter ``(i // 4 + 1, 0, 0, 0)`` under the stream's key, as numpy's
``Philox(key=...).random_raw`` gives them (:mod:`distmerge.methods.random_stream`); the split
multiply is exact integer arithmetic (every partial sum below fits in 64 bits). A batch that
runs past the end of the range computes counters nobody reads; the counter wraps mod 2**64
like numpy's, so the draws of a range never depend on where a block or a shard starts.

Callers pass scratch from :func:`philox_scratch` so that a loop drawing one cache-sized block
at a time allocates nothing per block. This module imports nothing from the package, so both
:mod:`distmerge.methods.random_stream` and the kernels can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distmerge.numba_cache import inline, jit

OUTPUTS_PER_COUNTER = 4  # Philox4x64: one counter = four 64-bit outputs
LANES = 64  # counters per batch: 256 draws (64 was measurably faster than 32 or 128 on Zen 5)

_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)  # Philox4x64 multipliers
_M0_LO, _M0_HI = np.uint64(0xE14C6C93), np.uint64(0xD2E7470E)
_M1_LO, _M1_HI = np.uint64(0x95121157), np.uint64(0xCA5A8263)
_W0, _W1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B)  # Weyl key increments
_LOW32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)

_jit = jit  # distmerge.numba_cache's (kernels.rounding's are the same ones)
_inline = inline


@dataclass(frozen=True)
class KeepStream:
    """A keep-mask drawn where it is used: element ``i`` of a block that starts at stream position
    ``start`` is kept iff output ``start + i`` of the stream keyed ``(key0, key1)`` is below
    ``threshold`` (DARE: ``floor(density * 2**64)``)."""

    key0: int
    key1: int
    start: int
    threshold: int

    def packed(self) -> np.ndarray:
        """``[key0, key1, start, threshold]`` as uint64, the form the kernels take."""
        return np.array([self.key0, self.key1, self.start, self.threshold], dtype=np.uint64)


def philox_scratch() -> np.ndarray:
    """Scratch for :func:`fill_raw` / :func:`fill_keep`: one batch's state, ``(4, LANES)`` uint64."""
    return np.empty((OUTPUTS_PER_COUNTER, LANES), dtype=np.uint64)


@_inline
def _mulhi(m_lo, m_hi, a):  # noqa: ANN001, ANN202 - numba infers the types
    """High 64 bits of ``m * a`` from four 32x32-bit products (``m = m_hi * 2**32 + m_lo``)."""
    a_lo = a & _LOW32
    a_hi = a >> _32
    ll = m_lo * a_lo
    t = m_lo * a_hi + (ll >> _32)  # < 2**64: (2**32 - 1)**2 + 2**32 - 1
    u = m_hi * a_lo + (t & _LOW32)  # likewise
    return m_hi * a_hi + (t >> _32) + (u >> _32)


@_jit
def _batch(key0, key1, group, state):  # noqa: ANN001, ANN202
    """Blocks at counters ``group + 1 .. group + LANES``: ``state[j, l]`` is output ``j`` of the
    block at counter ``group + l + 1``, i.e. stream element ``4 * (group + l) + j``."""
    x0 = state[0]
    x1 = state[1]
    x2 = state[2]
    x3 = state[3]
    for lane in range(LANES):
        x0[lane] = group + np.uint64(lane + 1)
        x1[lane] = 0
        x2[lane] = 0
        x3[lane] = 0
    k0 = key0
    k1 = key1
    for _ in range(10):
        for lane in range(LANES):  # independent lanes: the vectorized loop
            a = x0[lane]
            c = x2[lane]
            x0[lane] = _mulhi(_M1_LO, _M1_HI, c) ^ x1[lane] ^ k0
            x2[lane] = _mulhi(_M0_LO, _M0_HI, a) ^ x3[lane] ^ k1
            x1[lane] = _M1 * c
            x3[lane] = _M0 * a
        k0 = k0 + _W0
        k1 = k1 + _W1


@_inline
def _fill(key0, key1, start, threshold, compare, raw, keep, state):  # noqa: ANN001, ANN202
    """Stream outputs ``start ..`` into ``raw``, or ``output < threshold`` into ``keep``."""
    count = keep.size if compare else raw.size
    per_batch = OUTPUTS_PER_COUNTER * LANES
    i = 0
    position = np.uint64(start)  # int64 or uint64 in: numba would mix the two into float64
    group = position >> np.uint64(2)
    skip = np.int64(position & np.uint64(OUTPUTS_PER_COUNTER - 1))
    while i < count:
        _batch(key0, key1, group, state)
        n = min(per_batch - skip, count - i)
        if skip == 0 and n == per_batch:  # a whole batch: element 4 * lane + j is state[j, lane]
            x0 = state[0]
            x1 = state[1]
            x2 = state[2]
            x3 = state[3]
            if compare:
                out = keep[i:i + per_batch]
                for lane in range(LANES):
                    out[4 * lane] = x0[lane] < threshold
                    out[4 * lane + 1] = x1[lane] < threshold
                    out[4 * lane + 2] = x2[lane] < threshold
                    out[4 * lane + 3] = x3[lane] < threshold
            else:
                dst = raw[i:i + per_batch]
                for lane in range(LANES):
                    dst[4 * lane] = x0[lane]
                    dst[4 * lane + 1] = x1[lane]
                    dst[4 * lane + 2] = x2[lane]
                    dst[4 * lane + 3] = x3[lane]
        else:
            for e in range(skip, skip + n):
                v = state[e % OUTPUTS_PER_COUNTER, e // OUTPUTS_PER_COUNTER]
                if compare:
                    keep[i + e - skip] = v < threshold
                else:
                    raw[i + e - skip] = v
        i += n
        skip = 0
        group = group + np.uint64(LANES)


@_jit
def fill_raw(key0, key1, start, raw, state):  # noqa: ANN001, ANN202
    """``raw[i]`` = stream output ``start + i`` (uint64)."""
    _fill(key0, key1, start, np.uint64(0), False, raw, np.zeros(0, dtype=np.bool_), state)


@_jit
def fill_keep(key0, key1, start, threshold, keep, state):  # noqa: ANN001, ANN202
    """``keep[i]`` = stream output ``start + i`` < ``threshold`` (no uint64 buffer)."""
    _fill(key0, key1, start, threshold, True, state[0, :0], keep, state)  # no raw output: an empty view
