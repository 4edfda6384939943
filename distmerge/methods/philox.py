"""Philox in SIMD batches: the per-element random streams of DARE and DELLA at vector speed.

Two counter-based generators, each keyed by the stream's 128-bit key
(:func:`distmerge.methods.random_stream.stream_key`) and indexed by element position:

- **Philox4x64-10** (:func:`fill_raw`): 64-bit outputs, as numpy's ``Philox(key=...)``
  gives them. Element ``i`` is output ``i % 4`` of the block at counter ``(i // 4 + 1, 0, 0,
  0)``. arcee_fusion's sample comes from it (DARE and DELLA did before distmerge 0.2).
- **Philox4x32-10** (:func:`fill_keep`, :func:`fill_raw32`): the keep stream, DARE's keep
  flags and DELLA's uniforms. A flag needs one comparison with ``floor(density * 2**32)``
  (DELLA: ``output * 2**-32`` against its float32 probability), not 64 bits, and a
  32x32->64-bit multiply is one vector
  instruction (``vpmuludq``) where a 64-bit high product takes four and the low one three:
  0.40 against 1.7 ns per flag on one Zen 5 core (``benchmarks/kernel_costs.py``), and DARE
  draws every element of every expert twice (the L1 round, then the merge) unless the
  tensor is held. Element ``i`` is
  output ``i % 4`` of the Random123 Philox4x32-10 block whose counter words are ``(low, high
  32 bits of i // 4, low, high 32 bits of key1)`` under the key ``(low, high 32 bits of
  key0)``: the counter's upper half carries the rest of the 128-bit stream key.

Why it is fast: one block after another is a chain of ten dependent multiplies,
latency-bound. Here ``LANES`` consecutive counters go through the ten rounds side by side, which
the compiler turns into AVX-512/AVX2 ``vpmuludq`` (a 64-bit high product is written as four
32x32->64-bit ones: there is no vector 64x64->128-bit multiply). Philox4x32 runs each lane's
ten rounds inside the lane loop, in registers (:func:`_batch32`).

Why it is exact: it is the same function. The split multiply is exact integer arithmetic
(every partial sum below fits in 64 bits); the tests compare the 64-bit stream with numpy's and
the 32-bit one with a plain-Python Philox4x32-10 checked against Random123's known answers. A
batch that runs past the end of the range computes counters nobody reads; counters wrap mod
2**64, so the draws of a range never depend on where a block or a shard starts.

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
_M0_32, _M1_32 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox4x32 multipliers
_W0_32, _W1_32 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # its Weyl key increments
_LOW32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)

_jit = jit  # distmerge.numba_cache's (kernels.rounding's are the same ones)
_inline = inline


@dataclass(frozen=True)
class KeepStream:
    """A keep-mask drawn where it is used: element ``i`` of a block that starts at stream position
    ``start`` is kept iff output ``start + i`` of the Philox4x32-10 stream keyed ``(key0, key1)``
    is below ``threshold``."""

    key0: int
    key1: int
    start: int
    threshold: int  # floor(density * 2**32): a Philox4x32 output below it keeps its element

    def packed(self) -> np.ndarray:
        """``[key0, key1, start, threshold]`` as uint64, the form the kernels take."""
        return np.array([self.key0, self.key1, self.start, self.threshold], dtype=np.uint64)


def philox_scratch() -> np.ndarray:
    """Scratch for :func:`fill_raw` / :func:`fill_keep`: one batch's state, ``(4, LANES)`` uint64
    (the 32-bit stream uses it as uint32 for the partial batches at a range's ends)."""
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
def _block32(c0, c1, c2, c3, k0, k1):  # noqa: ANN001, ANN202
    """Philox4x32-10 of the counter words ``c0..c3`` under the key ``(k0, k1)`` (each a 32-bit
    value held in a uint64): its four outputs, likewise."""
    x0 = c0
    x1 = c1
    x2 = c2
    x3 = c3
    for _ in range(10):
        p0 = _M0_32 * x0
        p1 = _M1_32 * x2
        x0 = ((p1 >> _32) ^ x1 ^ k0) & _LOW32
        x2 = ((p0 >> _32) ^ x3 ^ k1) & _LOW32
        x1 = p1 & _LOW32
        x3 = p0 & _LOW32
        k0 = (k0 + _W0_32) & _LOW32
        k1 = (k1 + _W1_32) & _LOW32
    return x0, x1, x2, x3


@_inline
def _key_words(key0, key1):  # noqa: ANN001, ANN202
    """The keep stream's counter words 2-3 (``key1``'s halves) and its key (``key0``'s halves),
    each a 32-bit value in a uint64. A Python int comes in as int64: numba would mix it with
    uint64 arithmetic into float64, hence the casts."""
    key0 = np.uint64(key0)
    key1 = np.uint64(key1)
    return key1 & _LOW32, key1 >> _32, key0 & _LOW32, key0 >> _32


@_jit
def _batch32(key0, key1, group, state):  # noqa: ANN001, ANN202
    """Philox4x32-10 blocks ``group .. group + LANES - 1`` of the keep stream: ``state[j, l]``
    (uint32) is output ``j`` of block ``n = group + l``, i.e. stream element ``4 * n + j``. Its
    counter words are ``(low, high 32 bits of n, low, high 32 bits of key1)``, its key ``(low, high
    32 bits of key0)``.

    The ten rounds run inside the loop over lanes: LLVM unrolls them, keeps a lane's four words
    in registers, and vectorizes the lane loop. With the rounds outside it, every word was stored
    and loaded again every round: 0.88 against 0.45 ns per keep flag (both timed in one process;
    ``benchmarks/kernel_costs.py`` gives 0.40 now).
    """
    c2, c3, k0, k1 = _key_words(key0, key1)
    for lane in range(LANES):
        n = group + np.uint64(lane)
        x0, x1, x2, x3 = _block32(n & _LOW32, n >> _32, c2, c3, k0, k1)
        state[0, lane] = np.uint32(x0)
        state[1, lane] = np.uint32(x1)
        state[2, lane] = np.uint32(x2)
        state[3, lane] = np.uint32(x3)


@_jit
def _keep_batch(key0, key1, group, threshold, keep):  # noqa: ANN001, ANN202
    """:func:`_batch32`'s blocks compared with ``threshold`` straight into ``keep`` (``4 * LANES``
    flags in stream order), without the scratch in between."""
    c2, c3, k0, k1 = _key_words(key0, key1)
    for lane in range(LANES):
        n = group + np.uint64(lane)
        x0, x1, x2, x3 = _block32(n & _LOW32, n >> _32, c2, c3, k0, k1)
        keep[4 * lane] = x0 < threshold
        keep[4 * lane + 1] = x1 < threshold
        keep[4 * lane + 2] = x2 < threshold
        keep[4 * lane + 3] = x3 < threshold


_RAW64, _KEEP, _RAW32 = 0, 1, 2  # what _fill writes


@_inline
def _in_stream_order(batch, dst):  # noqa: ANN001, ANN202
    """``dst[4 * lane + j] = batch[j, lane]``: a whole batch's outputs in stream order."""
    x0 = batch[0]
    x1 = batch[1]
    x2 = batch[2]
    x3 = batch[3]
    for lane in range(LANES):
        dst[4 * lane] = x0[lane]
        dst[4 * lane + 1] = x1[lane]
        dst[4 * lane + 2] = x2[lane]
        dst[4 * lane + 3] = x3[lane]


@_inline
def _fill(key0, key1, start, threshold, kind, raw, narrow_raw, keep, state):  # noqa: ANN001, ANN202
    """From element ``start`` on: Philox4x64 outputs into ``raw`` (``_RAW64``), or Philox4x32
    outputs into ``narrow_raw`` (``_RAW32``) or their comparison ``< threshold`` into ``keep``
    (``_KEEP``)."""
    narrow_kind = kind != _RAW64
    count = raw.size if kind == _RAW64 else (keep.size if kind == _KEEP else narrow_raw.size)
    per_batch = OUTPUTS_PER_COUNTER * LANES
    narrow = state.view(np.uint32)  # the 32-bit stream's state, in the same scratch
    i = 0
    position = np.uint64(start)  # int64 or uint64 in: numba would mix the two into float64
    group = position >> np.uint64(2)
    skip = np.int64(position & np.uint64(OUTPUTS_PER_COUNTER - 1))
    while i < count:
        n = min(per_batch - skip, count - i)
        whole = skip == 0 and n == per_batch  # element 4 * lane + j is state[j, lane]
        if whole and kind == _KEEP:
            _keep_batch(key0, key1, group, threshold, keep[i:i + per_batch])
        elif narrow_kind:
            _batch32(key0, key1, group, narrow)
        else:
            _batch(key0, key1, group, state)
        if whole:
            if kind == _RAW32:
                _in_stream_order(narrow, narrow_raw[i:i + per_batch])
            elif kind == _RAW64:
                _in_stream_order(state, raw[i:i + per_batch])
        else:
            for e in range(skip, skip + n):
                if kind == _KEEP:
                    keep[i + e - skip] = narrow[e % OUTPUTS_PER_COUNTER, e // OUTPUTS_PER_COUNTER] < threshold
                elif kind == _RAW32:
                    narrow_raw[i + e - skip] = narrow[e % OUTPUTS_PER_COUNTER, e // OUTPUTS_PER_COUNTER]
                else:
                    raw[i + e - skip] = state[e % OUTPUTS_PER_COUNTER, e // OUTPUTS_PER_COUNTER]
        i += n
        skip = 0
        group = group + np.uint64(LANES)


@_jit
def fill_raw(key0, key1, start, raw, state):  # noqa: ANN001, ANN202
    """``raw[i]`` = Philox4x64 stream output ``start + i`` (uint64)."""
    _fill(key0, key1, start, np.uint64(0), _RAW64, raw, state.view(np.uint32)[0, :0], np.zeros(0, dtype=np.bool_),
          state)


@_jit
def fill_raw32(key0, key1, start, raw, state):  # noqa: ANN001, ANN202
    """``raw[i]`` = Philox4x32 stream output ``start + i`` (uint32): DELLA's uniforms."""
    _fill(key0, key1, start, np.uint64(0), _RAW32, state[0, :0], raw, np.zeros(0, dtype=np.bool_), state)


@_jit
def fill_keep(key0, key1, start, threshold, keep, state):  # noqa: ANN001, ANN202
    """``keep[i]`` = Philox4x32 stream output ``start + i`` < ``threshold`` (no output buffer)."""
    _fill(key0, key1, start, threshold, _KEEP, state[0, :0], state.view(np.uint32)[0, :0], keep, state)
