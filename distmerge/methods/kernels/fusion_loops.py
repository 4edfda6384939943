"""Arcee Fusion's quartile rounds and merge as fused loops, from each last-dim vector's KL.

Why: arcee_fusion's importance is ``|x - base| * kl``, ``kl`` one float per last-dim vector. As
torch ops every round recomputed both softmaxes and the KL, then made int64 order keys, a
weighted bincount over the chunk and boolean gathers per quartile: ~30x a linear merge per
core. Here the KL comes from the first round (torch computes it, once), and the rounds and the
merge are one pass each over the rows as stored (bfloat16 bits widened as read). Where the
quartiles come from a sample (tensors above a million elements), the rounds visit the sampled
elements only, once per draw, which is what weighting each element by its draw count gives. The
sample is drawn once per tensor (not once per chunk and round) and visited in position order
(:func:`sample_table`), not in draw order, where every pick missed the cache.

Why it is exact: the importance is ``float32(|float32(x - base)| * kl)``, as torch's broadcast
product; its key is ``arcee_fusion.order_keys``' (float32 bits mapped to an order-preserving
uint32); counts are integers; the merge is ``base + (x - base) * mask`` with a float32 mask, each
product and sum rounded to float32 as torch does. float32 compute only (others keep torch's ops).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from distmerge.methods.kernels.rounding import _inline, _jit, _value
from distmerge.methods.philox import LANES, OUTPUTS_PER_COUNTER, fill_raw

DIGIT = 1 << 16
_DRAWS = 4096  # sample draws per block
_UNIT = 2.0**-53  # as random_stream.uniforms
_TOP = np.uint32(0x80000000)


@_inline
def _order_key(b):  # noqa: ANN001, ANN202 - numba infers the types
    """``order_keys`` of the float32 with bits ``b``: sign bit set for >= 0, all flipped for < 0."""
    return np.int64(b | _TOP) if b < _TOP else np.int64(~b & np.uint32(0xFFFFFFFF))


@_jit
def _draw_positions(key0, key1, draws, numel, out):  # noqa: ANN001, ANN202
    """Draws ``0 .. draws - 1`` of the stream as positions ``min(floor(u * numel), numel - 1)``."""
    raw = np.empty(_DRAWS, dtype=np.uint64)
    state = np.empty((OUTPUTS_PER_COUNTER, LANES), dtype=np.uint64)
    top = numel - 1
    for s in range(0, draws, _DRAWS):
        m = min(_DRAWS, draws - s)
        fill_raw(key0, key1, np.uint64(s), raw[:m], state)
        for i in range(m):
            u = np.float64(np.int64(raw[i] >> np.uint64(11))) * _UNIT
            out[s + i] = min(np.int64(u * np.float64(numel)), top)


@_jit
def _sort_positions(positions, numel):  # noqa: ANN001, ANN202
    """``positions`` (each in ``[0, numel)``) sorted in place, as ``np.sort`` sorts them.

    Why not ``np.sort``: its cost depends on the CPU far more than this sort's does
    (``benchmarks.kernel_costs``, per position): 51 ns against this sort's 12.9 on the machine of
    RESULTS.md's twentieth part, 13.9 against 18.6 on the AMD Zen 3 of its twenty-first. A
    0.5 GB merge sorts 23 samples of a million, so the slow case cost 1.2 s of arcee_fusion's
    4 s and the fast one saves 0.1 s: this sort is the choice with the smaller worst case.
    Drawn uniformly, the positions spread evenly over buckets of their high bits: counted and
    placed bucket by bucket (a bucket's positions all below the next bucket's), each is then at
    most its bucket's few elements from its place, which one insertion sort pass closes."""
    n = positions.size
    shift = 0
    while ((numel - 1) >> shift) >= max(1, n // 4):  # about four positions a bucket
        shift += 1
    starts = np.zeros(((numel - 1) >> shift) + 2, dtype=np.int64)
    for i in range(n):
        starts[(positions[i] >> shift) + 1] += 1
    for b in range(starts.size - 1):
        starts[b + 1] += starts[b]
    placed = np.empty(n, dtype=np.int64)
    for i in range(n):
        b = positions[i] >> shift
        placed[starts[b]] = positions[i]
        starts[b] += 1
    for i in range(1, n):
        v = placed[i]
        j = i
        while j > 0 and placed[j - 1] > v:
            placed[j] = placed[j - 1]
            j -= 1
        placed[j] = v
    positions[:] = placed


@lru_cache(maxsize=4)
def sample_table(key0: int, key1: int, draws: int, numel: int) -> np.ndarray:
    """The ``draws`` positions drawn from ``numel`` by the stream keyed ``(key0, key1)``, sorted:
    drawn once per tensor in a process (each of its chunks, in each round, used to draw all of
    them again) and kept for the few tensors in flight, 8 MB per million draws. Sorted, a chunk's
    picks are a slice, and the rounds read the rows in order: in draw order every pick missed the
    cache (the counts took 7-10x as long at 11.5M elements, `benchmarks.arcee_sample_order`)."""
    positions = np.empty(draws, dtype=np.int64)
    _draw_positions(np.uint64(key0), np.uint64(key1), draws, numel, positions)
    _sort_positions(positions, numel)
    positions.flags.writeable = False  # shared by every chunk of the tensor
    return positions


def sample_positions(key: np.ndarray, draws: int, numel: int, lo: int, hi: int) -> np.ndarray:
    """arcee_fusion's sample (the stream keyed ``key``): the positions in ``[lo, hi)`` of the
    ``draws`` elements drawn from ``numel``, ``lo``-relative, each as often as it was drawn,
    ascending (what uses them counts, so the order is free)."""
    table = sample_table(int(key[0]), int(key[1]), draws, numel)
    first, end = np.searchsorted(table, [lo, hi])
    return table[first:end] - lo


@_inline
def _importance_key(d, kl):  # noqa: ANN001, ANN202
    """The order key of ``float32(|d| * kl)``: delta ``d`` in a vector whose KL is ``kl``."""
    return _order_key(np.float32(abs(d) * kl).view(np.uint32))


@_jit
def _counts(base, x, kl, cols, sampled, picks, buckets, hist):  # noqa: ANN001, ANN202
    """Quartile round counts over the chunk (or, ``sampled``, only its ``picks``, with
    repetition): with no ``buckets``, ``hist[0]`` counts the keys' high 16 bits; else
    ``hist[q]`` the low 16 bits of the keys in high bucket ``buckets[q]``. Every element goes
    vector by vector, one KL each: no division per element. (The update is written out in
    both loops: passing the arrays to a helper made the sampled loop 2x slower, 33 -> 65 ns.)"""
    for i in range(picks.size if sampled else 0):
        j = picks[i]
        key = _importance_key(np.float32(_value(x, j) - _value(base, j)), kl[j // cols])
        if buckets.size == 0:
            hist[0, key >> 16] += 1
        else:
            for q in range(buckets.size):
                if (key >> 16) == buckets[q]:
                    hist[q, key & 0xFFFF] += 1
    for s in range(0, 0 if sampled else base.size, max(cols, 1)):
        m = min(cols, base.size - s)
        k = kl[s // cols]
        xs, bs = x[s:s + m], base[s:s + m]
        for i in range(m):
            key = _importance_key(np.float32(_value(xs, i) - _value(bs, i)), k)
            if buckets.size == 0:
                hist[0, key >> 16] += 1
            else:
                for q in range(buckets.size):
                    if (key >> 16) == buckets[q]:
                        hist[q, key & 0xFFFF] += 1


def fusion_counts(base: np.ndarray, x: np.ndarray, kl: np.ndarray, cols: int, picks: np.ndarray | None,
                  buckets: np.ndarray) -> np.ndarray:
    """A quartile round's dense histograms (int64, one row per bucket, or one row of high bits
    when ``buckets`` is empty) of a chunk's importance keys: ``kl[v]`` is the KL of last-dim
    vector ``v`` (``cols`` elements each), ``picks`` the chunk's sampled elements (None: every
    element, once; empty: none)."""
    hist = np.zeros((max(buckets.size, 1), DIGIT), dtype=np.int64)
    sampled = picks is not None
    _counts(base, x, kl, cols, sampled, picks if sampled else np.zeros(0, dtype=np.int64), buckets, hist)
    return hist


@_jit
def _merge(base, x, kl, cols, threshold, out):  # noqa: ANN001, ANN202
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for s in range(0, base.size, max(cols, 1)):  # vector by vector: slices and one KL, which vectorizes
        m = min(cols, base.size - s)
        k = kl[s // cols]
        bs, xs, o = base[s:s + m], x[s:s + m], out[s:s + m]
        for j in range(m):
            b = _value(bs, j)
            d = np.float32(_value(xs, j) - b)
            importance = np.float32(abs(d) * k)
            o[j] = b + d * (one if importance >= threshold else zero)


def fusion_merge(base: np.ndarray, x: np.ndarray, kl: np.ndarray, cols: int, threshold: float) -> np.ndarray:
    """``base + (x - base) * [importance >= threshold]`` in float32 (the mask a float32 1 or 0)."""
    out = np.empty(base.size, dtype=np.float32)
    _merge(base, x, kl, cols, np.float32(threshold), out)
    return out
