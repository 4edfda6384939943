"""Histograms of selection keys: the counting passes of the radix selection (:mod:`distmerge.methods.selection`).

A key is the float32 bit pattern of ``|x - base|`` rounded to the compute dtype, which orders
like the magnitude; the high 16 bits index a bucket (the sign bit of a magnitude is 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from distmerge.methods.kernels.rounding import INF_KEY, _jit, _key, _r, _value, mode_tag

KEY_BUCKETS = 1 << 15  # distinct high 16 bits of a key (the sign bit of a magnitude is 0)
_INF_KEY = np.int32(INF_KEY)  # the keys here are int32


@_jit
def _histogram_and_windows(base, x, mode, hist, lo0, hi0, w0, lo1, hi1, w1):  # noqa: ANN001, ANN202
    for i in range(x.size):
        k = _key(_r(_value(x, i) - _value(base, i), mode))
        hist[k >> 16] += 1
        if lo0 <= k < hi0:
            w0[k - lo0] += 1
        if lo1 <= k < hi1:
            w1[k - lo1] += 1


SAMPLE_BLOCK = 128  # contiguous keys per block of the histogram passes
FLUSH_BLOCKS = 1 << 22  # blocks after which the int32 lane counts are added up (no overflow)


@_jit
def _sampled_key_histogram(base, x, mode, step, hist):  # noqa: ANN001, ANN202
    # Consecutive keys often fall in one bucket (bfloat16 deltas take few distinct values), so
    # a single histogram waited on its own last increment; four lane histograms, each taking
    # every fourth key of a block, break that chain (measured 1.7-2.2 -> 1.0 ns per key).
    lanes = np.zeros((4, hist.size), dtype=np.int32)
    keys = np.empty(SAMPLE_BLOCK, dtype=np.int32)
    span = SAMPLE_BLOCK * step
    spans = (x.size + span - 1) // span
    for k in range(spans):
        s = k * span
        first = s + (k % step) * SAMPLE_BLOCK
        m = min(first + SAMPLE_BLOCK, x.size) - first
        if m > 0:
            xs, bs = x[first:first + m], base[first:first + m]
            for j in range(m):
                keys[j] = _key(_r(_value(xs, j) - _value(bs, j), mode)) >> 16
            l0, l1, l2, l3 = lanes[0], lanes[1], lanes[2], lanes[3]
            j = 0
            while j + 4 <= m:
                l0[keys[j]] += 1
                l1[keys[j + 1]] += 1
                l2[keys[j + 2]] += 1
                l3[keys[j + 3]] += 1
                j += 4
            for i in range(j, m):
                l0[keys[i]] += 1
        if (k + 1) % FLUSH_BLOCKS == 0 or k + 1 == spans:
            for i in range(hist.size):
                hist[i] += np.int64(lanes[0, i]) + lanes[1, i] + lanes[2, i] + lanes[3, i]
            lanes[:] = 0


def key_histogram(base: np.ndarray, x: np.ndarray, mode: int, step: int = 1) -> torch.Tensor:
    """Counts of the high 16 bits of the delta keys of ``x - base`` (int64, ``KEY_BUCKETS``
    long); with ``step`` > 1, of a sample of about one key in ``step``: from each span of
    ``step`` blocks of ``SAMPLE_BLOCK`` keys, one block, its place in the span turning from span
    to span (so rows whose length is a multiple of the span are sampled in every column over a
    few rows).

    Why blocks and not every ``step``-th key: a strided sample touches every cache line of the
    rows, a full pass's memory traffic for a sixteenth of the keys.
    """
    hist = np.zeros(KEY_BUCKETS, dtype=np.int64)
    _sampled_key_histogram(base, x, mode_tag(mode), step, hist)
    return torch.from_numpy(hist)


def histogram_and_windows(
    base: np.ndarray, x: np.ndarray, mode: int, ranges: Sequence[tuple[int, int]],
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """In one pass: :func:`key_histogram`, and for each ``[lo, hi)`` in ``ranges`` (one or two:
    TIES has one threshold, breadcrumbs two) the distinct ``key - lo`` of the keys inside with
    how often each occurs (counted densely, returned sparsely)."""
    if not 1 <= len(ranges) <= 2:
        raise ValueError(f"one or two key ranges per pass, not {len(ranges)}")
    (lo0, hi0), (lo1, hi1) = ranges[0], ranges[1] if len(ranges) == 2 else (0, 0)
    hist = np.zeros(KEY_BUCKETS, dtype=np.int64)
    w0, w1 = np.zeros(max(0, hi0 - lo0), dtype=np.int32), np.zeros(max(0, hi1 - lo1), dtype=np.int32)
    _histogram_and_windows(base, x, mode_tag(mode), hist, lo0, hi0, w0, lo1, hi1, w1)
    parts = []
    for window in (w0, w1)[:len(ranges)]:
        values = np.flatnonzero(window)
        parts.append((torch.from_numpy(values.astype(np.int32)), torch.from_numpy(window[values].astype(np.int64))))
    return torch.from_numpy(hist), parts



WINDOW_BLOCK = 128  # keys computed per block before the rare window hits are counted
HIT_WORD = 8  # keys whose inside-a-window flags (one byte each) are read as one uint64


@_jit
def _above_and_windows(base, x, mode, lasts, los, spans, windows, above, nonfinite, touched, distinct):  # noqa: ANN001, ANN202
    # Per block: compute each key; per range, count it against the range's top, flag whether it
    # lies inside (a byte per key) and take the smallest offset from the range's start, all in
    # one vectorized loop; then, only in blocks whose smallest offset is inside, gather the
    # offsets of the keys inside without a branch and add them to the range's dense counts.
    # Counts are kept per lane in int32 arrays and summed at the end: a scalar int64 count of
    # int32 compares widened every lane first, and the loop took twice as long (each lane
    # gains at most 1 a block, so 2^31 blocks, 2^38 keys, would be needed to overflow it).
    # The gather reads the flags eight at a time as uint64 words, lists the words that hold a
    # hit (without a branch) and gathers only their keys: with the keys of bf16-valued deltas
    # in float32, 0.7% of a chunk's keys fell inside a window, yet 57% of the blocks held one,
    # and a gather over the whole block cost 0.33 ns per key of the 1.1 the pass took (2^22
    # keys of the synthetic benchmark model, on a Zen 3; this pass takes 0.6). Where most words
    # hold a hit (deltas of a few ulps put 9% of the keys inside) the whole block is gathered
    # without listing them: 1.45 -> 1.2 ns per key there. A branch per key was mispredicted
    # too often where many keys lie inside (2.1 ns per key).
    # The keys of NaN/Inf deltas (>= the key of +Inf) are counted in the same vectorized loop
    # (in float64 compute a key is float32's, so a finite delta beyond its range counts too:
    # the count proves clean rows finite where it is 0, and otherwise only costs the scan).
    # Each offset counted for the first time is noted in ``touched[w]`` (``distinct[w]`` of
    # them), so the caller reads the few hundred distinct keys of a window without scanning
    # all of it: a breadcrumbs window spans up to ~720k keys (measured 0.8 ms a scan per chunk).
    keys = np.empty(WINDOW_BLOCK, dtype=np.int32)
    offsets = np.empty(WINDOW_BLOCK, dtype=np.uint32)
    inside = np.zeros(WINDOW_BLOCK, dtype=np.uint8)
    words = inside.view(np.uint64)
    hit_words = np.empty(WINDOW_BLOCK // HIT_WORD, dtype=np.int64)
    bad = np.zeros(WINDOW_BLOCK, dtype=np.int32)
    tops = np.zeros((lasts.size, WINDOW_BLOCK), dtype=np.int32)
    for s in range(0, x.size, WINDOW_BLOCK):
        m = min(x.size - s, WINDOW_BLOCK)
        xs, bs = x[s:s + m], base[s:s + m]
        for j in range(m):
            k = _key(_r(_value(xs, j) - _value(bs, j), mode))
            keys[j] = k
            bad[j] += np.int32(k >= _INF_KEY)
        for w in range(lasts.size):
            last, lo, span = lasts[w], los[w], spans[w]
            for j in range(m, WINDOW_BLOCK):  # a short last block: its missing keys lie outside
                keys[j] = lo - 1
            nearest = np.uint32(0xFFFFFFFF)
            for j in range(m):
                o = np.uint32(keys[j] - lo)
                tops[w, j] += np.int32(keys[j] > last)
                inside[j] = o < span
                nearest = min(nearest, o)
            if nearest < span:
                hits = 0
                for q in range((m + HIT_WORD - 1) // HIT_WORD):
                    hit_words[hits] = q
                    hits += words[q] != 0
                c = 0
                if hits * 2 > WINDOW_BLOCK // HIT_WORD:  # most words hit: gather the whole block
                    for j in range(WINDOW_BLOCK):
                        o = np.uint32(keys[j] - lo)
                        offsets[c] = o
                        c += o < span
                else:
                    for h in range(hits):
                        first = hit_words[h] * HIT_WORD
                        for j in range(HIT_WORD):
                            o = np.uint32(keys[first + j] - lo)
                            offsets[c] = o
                            c += o < span
                counts = windows[w]
                seen = touched[w]
                n = distinct[w]
                for j in range(c):
                    o = offsets[j]
                    seen[n] = o
                    n += counts[o] == 0
                    counts[o] += 1
                distinct[w] = n
    for w in range(lasts.size):
        above[w] = np.sum(tops[w].astype(np.int64))
    nonfinite[0] = np.sum(bad.astype(np.int64))


def above_and_windows(
    base: np.ndarray, x: np.ndarray, mode: int, ranges: Sequence[tuple[int, int]],
) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]], int]:
    """In one pass, for each ``[lo, hi)`` in ``ranges``: how many delta keys of ``x - base``
    are ``>= hi``, and the distinct ``key - lo`` of the keys inside with how often each occurs
    (sparse, as :func:`histogram_and_windows` gives them); and how many deltas are NaN or Inf
    (which proves the rows finite where none is: ``Partials.inputs_finite``).

    The speculative selection round's count: with no 32768-bin histogram to update per key,
    the pass over every key is a vectorized compare and sum (measured ~3x faster than
    :func:`histogram_and_windows` on 2^25 bf16-valued float32 deltas).
    """
    # Each range's last key, not its end: a window over the top bucket ends at 2^31, beyond
    # int32 (where NaN deltas' keys lie), while its last key 2^31 - 1 is the largest key.
    lasts = np.array([hi - 1 for _, hi in ranges], dtype=np.int32)
    los = np.array([lo for lo, _ in ranges], dtype=np.int32)
    spans = np.array([max(0, hi - lo) for lo, hi in ranges], dtype=np.uint32)
    width = int(spans.max()) if len(ranges) else 0
    windows = np.zeros((len(ranges), width), dtype=np.int32)
    # One slot more than a window's keys: the loop writes each offset before it knows it is new.
    touched = np.empty((len(ranges), width + 1), dtype=np.uint32)
    distinct = np.zeros(len(ranges), dtype=np.int64)
    above = np.zeros(len(ranges), dtype=np.int64)
    nonfinite = np.zeros(1, dtype=np.int64)
    _above_and_windows(base, x, mode_tag(mode), lasts, los, spans, windows, above, nonfinite, touched, distinct)
    parts = []
    for w in range(len(ranges)):
        values = np.sort(touched[w, :distinct[w]])  # the offsets, ascending, as flatnonzero gave them
        parts.append((torch.from_numpy(values.astype(np.int32)), torch.from_numpy(windows[w, values].astype(np.int64))))
    return [int(a) for a in above], parts, int(nonfinite[0])


@_jit
def _row_key_counts(base, x, mode, cols, key, out):  # noqa: ANN001, ANN202
    for r in range(out.size):
        xs, bs = x[r * cols:(r + 1) * cols], base[r * cols:(r + 1) * cols]
        n = 0
        for j in range(cols):
            n += _key(_r(_value(xs, j) - _value(bs, j), mode)) == key
        out[r] = n


def row_key_counts(base: np.ndarray, x: np.ndarray, mode: int, rows: int, key: int) -> np.ndarray:
    """Per row of the ``rows`` rows of ``x - base``: how many delta keys equal ``key`` (int64)."""
    out = np.zeros(rows, dtype=np.int64)
    if rows:
        _row_key_counts(base, x, mode_tag(mode), x.size // rows, np.int32(key), out)
    return out


@_jit
def _delta_keys(base, x, mode, out):  # noqa: ANN001, ANN202
    for i in range(x.size):
        out[i] = _key(_r(_value(x, i) - _value(base, i), mode))


def delta_keys(base: np.ndarray, x: np.ndarray, mode: int) -> np.ndarray:
    """Every delta key of ``x - base`` (int32), for a chunk small enough to ship all of them."""
    out = np.empty(x.size, dtype=np.int32)
    _delta_keys(base, x, mode_tag(mode), out)
    return out
