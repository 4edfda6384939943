"""Stable ascending ranks of a row of uint32 keys by least-significant-digit radix sort.

Why: DELLA ranks the magnitudes of each row's deltas (:mod:`.ranks`); a stable LSD radix sort
gives the order of a stable comparison sort in O(n) per row. Only the bits that vary inside a
row are sorted, in as few passes of at most :data:`MAX_DIGIT` bits as they need, each pass's
histogram no larger than the row. Where it takes fewer bits, the keys are first rewritten as
their offsets from the smallest nonzero key, zero kept below them (:func:`_offset_keys`), which
makes the deltas of bfloat16 weights one pass instead of two. Where the keys would still take
two or more passes but few of them set bits below the top few (float32 deltas of bfloat16
weights), one counting pass over the high bits places the rest (:func:`_coarse_rank`). Two rows
that take the same one or two passes are ranked side by side (:func:`_rank_pair`), so each loop
carries two rows' independent counters.

Each function writes ``out[first + i * stride] = table[r_i]``, ``r_i`` the rank of key ``i``:
the caller maps ranks to what it needs (DELLA: its keep probabilities) without a rank array.

Longer than 300 lines because it is one algorithm, a row's stable ranks, whose three ways (the
radix passes, two rows side by side, the coarse pass) share their planning and scratch and
fall back on one another row by row.
"""

from __future__ import annotations

import numpy as np

from distmerge.methods.kernels.rounding import _inline, _jit

MAX_DIGIT = 11  # bits per radix pass at most: 2048 buckets
MIN_DIGIT = 4  # and at least (short rows): 16 buckets
ODD_SHARE = 8  # _coarse_rank: at most 1 key in 8 with fine bits set, ...
ODD_SAMPLE = 256  # ... judged first on the row's first keys
SHORT = 32  # odd keys up to this many are ordered by insertion


@_inline
def _key_stats(keys):  # noqa: ANN001, ANN202
    """``(vary, smallest, largest, zeros)``: the bits in which some key differs from the first,
    the smallest nonzero key (0xFFFFFFFF if none), the largest key and how many keys are 0."""
    k0 = keys[0]
    vary, largest, smallest, zeros = np.uint32(0), np.uint32(0), np.uint32(0xFFFFFFFF), 0
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


@_inline
def _plan(keys):  # noqa: ANN001, ANN202
    """``(lo, hi, smallest, largest, zero)``: the lowest varying bit of the keys and one past the
    highest (``hi == 0`` when every key is the same: the ranks are the positions), the smallest
    nonzero and the largest key, and 1 where some key is 0 (else 0)."""
    vary, smallest, largest, zeros = _key_stats(keys)
    if vary == 0:
        return 0, 0, smallest, largest, np.uint32(0)
    lo = _bit_length(vary & (~vary + np.uint32(1))) - 1  # the lowest and highest bits that vary:
    hi = _bit_length(vary)  # the rest orders nothing
    return lo, hi, smallest, largest, np.uint32(1 if zeros else 0)


@_inline
def _offset_width(lo, smallest, largest, zero):  # noqa: ANN001, ANN202
    """How many bits the keys take as offsets (:func:`_offset_keys`)."""
    return _bit_length(((largest - smallest) >> np.uint32(lo)) + zero)


@_inline
def _narrow(keys, lo, hi, smallest, largest, zero):  # noqa: ANN001, ANN202
    """The bits ``(lo, hi)`` to sort, after the offset rewrite where it narrows them."""
    offsets = _offset_width(lo, smallest, largest, zero)
    if offsets < hi - lo:  # the offsets' bit 0 varies (as bit lo of the keys), their top is bit offsets - 1
        _offset_keys(keys, lo, smallest, zero)
        return 0, offsets
    return lo, hi


@_inline
def _widest(n):  # noqa: ANN001, ANN202
    """The widest digit for rows of ``n``: buckets at most ~n, so that clearing and summing
    them costs no more than a pass."""
    widest = MIN_DIGIT
    while widest < MAX_DIGIT and (2 << widest) <= n:
        widest += 1
    return widest


@_inline
def _digits(n, lo, hi):  # noqa: ANN001, ANN202
    """``(passes, digit)``: how many radix passes bits ``lo .. hi`` take, of how many bits each."""
    widest = _widest(n)
    passes = (hi - lo + widest - 1) // widest
    return passes, (hi - lo + passes - 1) // passes


@_inline
def _positions(out, first, stride, table, n):  # noqa: ANN001, ANN202
    """Every key the same: the ranks are the positions."""
    for i in range(n):
        out[first + i * stride] = table[i]


@_jit
def _rank_row(keys, keys2, order, order2, hist, table, out, first, stride):  # noqa: ANN001, ANN202
    """``out[first + i * stride] = table[r_i]``, ``r_i`` the stable ascending rank of ``keys[i]``
    (uint32; clobbered, as ``keys2``, ``order`` and ``order2``, the scratch of the passes)."""
    lo, hi, smallest, largest, zero = _plan(keys)
    if hi == 0:
        _positions(out, first, stride, table, keys.size)
    elif not _coarse_rank(keys, keys2, order, order2, hist, table, out, first, stride, lo, hi, smallest, largest, zero):
        lo, hi = _narrow(keys, lo, hi, smallest, largest, zero)
        _sort(keys, keys2, order, order2, hist, table, out, first, stride, lo, hi)


@_jit
def _coarse_rank(keys, keys2, order, order2, hist, table, out, first, stride, lo, hi, smallest, largest, zero):  # noqa: ANN001, ANN202, PLR0913
    """:func:`_rank_row` in one counting pass over the keys' high bits, where the radix passes
    would take two or more and few keys have low bits set; False (nothing written, the keys
    untouched) where that does not hold.

    Why: a delta of two bfloat16 weights, taken in float32, mostly has no more significant
    bits than a bfloat16 (its keys' low 16 bits are 0), yet its rows span a few exponents and
    the odd delta of a weight near zero sets low bits: 20 or more bits vary, two passes. Here
    each key's coarse part (its bits from ``shift`` up, as an offset, in one pass's buckets)
    places it; a key whose fine bits (``lo .. shift``) are all 0 is the smallest of its coarse
    bucket's keys, in position order, so its rank is the bucket's next place. The few others
    (``odd``) are ranked among themselves by their whole keys, then take the places their
    buckets have left, in that order: the stable order of the whole keys."""
    n = keys.size
    if _digits(n, 0, min(_offset_width(lo, smallest, largest, zero), hi - lo))[0] < 2:
        return False  # one pass already
    buckets = 1 << _widest(n)
    shift = lo
    while ((largest >> np.uint32(shift)) - (smallest >> np.uint32(shift))) + zero >= buckets:
        shift += 1
    fine = np.uint32((1 << shift) - (1 << lo))  # bits lo .. shift - 1
    sample = min(n, ODD_SAMPLE)
    odd = 0
    for i in range(sample):
        odd += (keys[i] & fine) != 0
    if odd * ODD_SHARE > sample:
        return False
    top = np.uint32(shift)
    low = smallest >> top
    used = ((largest >> top) - low) + zero + 1
    h = hist[0]
    h[:used] = 0
    odd = 0
    for i in range(n):
        k = keys[i]
        h[_coarse(k, top, low, zero)] += 1
        odd += (k & fine) != 0
    if odd * ODD_SHARE > n:
        return False
    _starts(h, used)
    odd_keys, odd_at = keys2[:odd], order2[:odd]
    j = 0
    for i in range(n):
        k = keys[i]
        if k & fine:
            odd_keys[j] = k
            odd_at[j] = i
            j += 1
        else:
            out[first + i * stride] = table[_next_place(h, _coarse(k, top, low, zero))]
    by_rank = order[:odd]  # the odd keys' indices in stable order of their keys
    if odd <= SHORT:
        _insertion_order(odd_keys, by_rank)
    else:
        ranked, identity = order2[odd:2 * odd], order2[2 * odd:3 * odd]  # 3 * odd <= n
        for j in range(odd):
            identity[j] = j
        sort_keys = keys[:odd]  # every key of the row is read: its scratch is free
        sort_keys[:] = odd_keys
        lo2, hi2, smallest2, largest2, zero2 = _plan(sort_keys)
        if hi2 == 0:
            ranked[:] = identity
        else:
            lo2, hi2 = _narrow(sort_keys, lo2, hi2, smallest2, largest2, zero2)
            _sort(sort_keys, keys[odd:2 * odd], order[:odd], order[odd:2 * odd], hist[1:], identity, ranked, 0, 1,
                  lo2, hi2)
        for j in range(odd):
            by_rank[ranked[j]] = j
    for r in range(odd):
        j = by_rank[r]
        out[first + odd_at[j] * stride] = table[_next_place(h, _coarse(odd_keys[j], top, low, zero))]
    return True


@_inline
def _coarse(k, top, low, zero):  # noqa: ANN001, ANN202
    """A key's coarse bucket: 0 for the key 0, else its bits from ``top`` up as an offset from
    the smallest nonzero key's (``low``), after the zero bucket where there is one."""
    return np.uint32(0) if k == 0 else (k >> top) - low + zero


@_inline
def _insertion_order(keys, order):  # noqa: ANN001, ANN202
    """``order``: the indices of the few ``keys`` in stable ascending order of their keys."""
    for j in range(keys.size):
        k = keys[j]
        t = j
        while t > 0 and keys[order[t - 1]] > k:
            order[t] = order[t - 1]
            t -= 1
        order[t] = j


@_jit
def _sort(keys, keys2, order, order2, hist, table, out, first, stride, lo, hi):  # noqa: ANN001, ANN202
    """:func:`_rank_row`'s radix passes over the prepared keys' bits ``lo .. hi``."""
    n = keys.size
    k0 = keys[0]
    passes, digit = _digits(n, lo, hi)
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
    while _one_digit(h[last], k0, np.uint32(lo + last * digit), mask, n):
        last -= 1
    src_k, dst_k, src_o, dst_o = keys, keys2, order2, order
    done = False
    for p in range(last + 1):
        shift = np.uint32(lo + p * digit)
        hp = h[p]
        if _one_digit(hp, k0, shift, mask, n):
            continue
        _starts(hp, buckets)
        if p == last:  # the final positions are the ranks: write the table there
            if done:
                for i in range(n):
                    at = _next_place(hp, (src_k[i] >> shift) & mask)
                    out[first + src_o[i] * stride] = table[at]
            else:
                for i in range(n):
                    at = _next_place(hp, (src_k[i] >> shift) & mask)
                    out[first + i * stride] = table[at]
            return
        if done:
            for i in range(n):
                k = src_k[i]
                at = _next_place(hp, (k >> shift) & mask)
                dst_k[at] = k
                dst_o[at] = src_o[i]
        else:
            for i in range(n):
                k = src_k[i]
                at = _next_place(hp, (k >> shift) & mask)
                dst_k[at] = k
                dst_o[at] = i
        done = True
        src_k, dst_k, src_o, dst_o = dst_k, src_k, dst_o, src_o


@_jit
def _rank_pair(a, b, table, out, first_a, first_b, stride):  # noqa: ANN001, ANN202
    """Two rows ranked as :func:`_rank_row` ranks each (``a`` and ``b``: their scratch, as
    :func:`_scratch` gives it, keys in ``[0]``), side by side where both take the same one or two
    passes, so that each loop carries both rows' counters.

    Why: a row holds a few hundred distinct magnitudes, some of them frequent, and a bucket's
    counter is read, incremented and written back for each of its keys, so a frequent bucket's
    keys wait on each other's store. Two rows' counters are independent chains: one
    histogram-and-scatter pass over float32-compute deltas took 2.64 against 3.59 ns per
    element (RESULTS.md, the nineteenth part)."""
    ka, kb = a[0], b[0]
    n = ka.size
    lo_a, hi_a, smallest_a, largest_a, zero_a = _plan(ka)
    lo_b, hi_b, smallest_b, largest_b, zero_b = _plan(kb)
    left_a = hi_a == 0 or not _coarse_rank(*a, table, out, first_a, stride, lo_a, hi_a, smallest_a, largest_a, zero_a)
    left_b = hi_b == 0 or not _coarse_rank(*b, table, out, first_b, stride, lo_b, hi_b, smallest_b, largest_b, zero_b)
    if left_a and hi_a != 0:
        lo_a, hi_a = _narrow(ka, lo_a, hi_a, smallest_a, largest_a, zero_a)
    if left_b and hi_b != 0:
        lo_b, hi_b = _narrow(kb, lo_b, hi_b, smallest_b, largest_b, zero_b)
    if left_a and left_b and hi_a != 0 and hi_b != 0:
        passes, digit_a = _digits(n, lo_a, hi_a)
        passes_b, digit_b = _digits(n, lo_b, hi_b)
        if passes == passes_b and passes <= 2:
            _side_by_side(a, b, passes, lo_a, digit_a, lo_b, digit_b, table, out, first_a, first_b, stride)
            return
    for rows, left, lo, hi, first in ((a, left_a, lo_a, hi_a, first_a), (b, left_b, lo_b, hi_b, first_b)):
        if not left:
            continue
        if hi == 0:
            _positions(out, first, stride, table, n)
        else:
            _sort(rows[0], rows[1], rows[2], rows[3], rows[4], table, out, first, stride, lo, hi)


@_inline
def _side_by_side(a, b, passes, lo_a, digit_a, lo_b, digit_b, table, out, first_a, first_b, stride):  # noqa: ANN001, ANN202, PLR0913
    """:func:`_rank_pair`'s one or two shared passes. Neither skips a digit: the first digit
    holds a row's lowest varying bit and the last its highest, so with two passes no digit is
    the same for every key (what :func:`_sort` checks for with three or more)."""
    ka, kb = a[0], b[0]
    n = ka.size
    mask_a, mask_b = np.uint32((1 << digit_a) - 1), np.uint32((1 << digit_b) - 1)
    low_a, low_b = np.uint32(lo_a), np.uint32(lo_b)
    next_a, next_b = np.uint32(lo_a + digit_a), np.uint32(lo_b + digit_b)
    a0, a1, b0, b1 = a[4][0], a[4][1], b[4][0], b[4][1]
    a[4][:passes, :1 << digit_a] = 0
    b[4][:passes, :1 << digit_b] = 0
    if passes == 1:
        for i in range(n):
            a0[(ka[i] >> low_a) & mask_a] += 1
            b0[(kb[i] >> low_b) & mask_b] += 1
    else:
        for i in range(n):
            k = ka[i]
            a0[(k >> low_a) & mask_a] += 1
            a1[(k >> next_a) & mask_a] += 1
            k = kb[i]
            b0[(k >> low_b) & mask_b] += 1
            b1[(k >> next_b) & mask_b] += 1
    for p in range(passes):
        _starts(a[4][p], 1 << digit_a)
        _starts(b[4][p], 1 << digit_b)
    if passes == 1:
        for i in range(n):
            at = _next_place(a0, (ka[i] >> low_a) & mask_a)
            out[first_a + i * stride] = table[at]
            at = _next_place(b0, (kb[i] >> low_b) & mask_b)
            out[first_b + i * stride] = table[at]
        return
    sorted_a, sorted_b, order_a, order_b = a[1], b[1], a[2], b[2]
    for i in range(n):
        k = ka[i]
        at = _next_place(a0, (k >> low_a) & mask_a)
        sorted_a[at] = k
        order_a[at] = i
        k = kb[i]
        at = _next_place(b0, (k >> low_b) & mask_b)
        sorted_b[at] = k
        order_b[at] = i
    for i in range(n):
        at = _next_place(a1, (sorted_a[i] >> next_a) & mask_a)
        out[first_a + order_a[i] * stride] = table[at]
        at = _next_place(b1, (sorted_b[i] >> next_b) & mask_b)
        out[first_b + order_b[i] * stride] = table[at]


@_inline
def _next_place(h, d):  # noqa: ANN001, ANN202
    """Bucket ``d``'s next place, counted on (a stable pass's step for one key)."""
    at = h[d]
    h[d] = at + 1
    return at


@_inline
def _one_digit(h, k0, shift, mask, n):  # noqa: ANN001, ANN202
    """Whether every key has the first key's digit: ``h`` counts them all in its bucket."""
    return h[(k0 >> shift) & mask] == n


@_inline
def _starts(h, buckets):  # noqa: ANN001, ANN202
    """Counts to each bucket's first position (exclusive prefix sums)."""
    total = 0
    for d in range(buckets):
        c = h[d]
        h[d] = total
        total += c


@_jit
def _scratch(n):  # noqa: ANN001, ANN202
    """The passes' scratch for rows of ``n``: keys, keys2, order, order2 and the histograms."""
    return (np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.int32),
            np.empty(n, dtype=np.int32), np.empty((8, 1 << MAX_DIGIT), dtype=np.int32))
