"""Which elements ``torch.topk(v, k, largest=True)`` picks on CPU, ties included, without torch.

Why: mergekit's SCE keeps the ``k`` elements ``torch.topk`` picks from a tensor's variances. Where
many are tied at the k-th largest, which of the tied ones it keeps follows from how its
selection permutes the whole array, so distmerge runs the same selection on the whole tensor
(``methods.sce``). torch builds a vector of ``(value, index)`` pairs and selects on it with a
NaN-aware comparator; on tensors whose values repeat (bfloat16 task vectors) that measured
25-75 ns per element, most of an SCE merge.

Why it is exact: it is the same algorithm on the same sequence. torch's CPU topk
(``ATen/native/TopKImpl.h``) fills the pairs in index order, then, when ``64 k <= n``, runs
``std::partial_sort`` (whose chosen set is that of its ``__heap_select``) and otherwise
``std::nth_element`` (libstdc++'s ``__introselect``: median-of-three pivots, unguarded
partitions, ``__heap_select`` past a depth of ``2 log2 n``, insertion sort below four elements).
Its comparator for ``largest`` is "a is NaN and b is not, or a > b", which on magnitudes is an
integer comparison of their bit patterns with every NaN given one key above +inf. (``sorted``
changes only the order of the chosen, not the set: after ``nth_element`` it sorts the first
``k - 1``; ``partial_sort`` ignores it.) Each element
here is one uint64, that key in the high half and the index in the low half, and the loops below
are libstdc++'s, comparing the high halves only: the same comparisons, the same swaps, so the
same first ``k`` (the partition finds its swaps block by block before making them,
:func:`_partition`, and makes the same ones in the same order). The tests compare the chosen
sets with ``torch.topk``'s on tie-heavy arrays in both branches, and each partition's whole
result with a plain Python transcription of libstdc++'s loop.

Longer than 300 lines because it is one algorithm, libstdc++'s selection, whose pieces
(heap, median, partition, insertion sort) only make sense together and must stay in step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch

from distmerge.methods.kernels.rounding import INF_KEY, _inline, _jit

_SIGN_OFF = np.uint32(0x7FFFFFFF)
_INF_KEY = np.uint32(INF_KEY)
_NAN_KEY = np.uint64(0x7F800001)  # every NaN: one key above +inf (the comparator's NaNs tie)
_HALF = np.uint64(32)
_LOW = np.uint64(0xFFFFFFFF)
PARTIAL_SORT_FACTOR = 64  # torch: partial_sort when k * 64 <= n
PARTITION_BLOCK = 256  # elements scanned per block of :func:`_partition`'s swap-finding phase

log = logging.getLogger(__name__)


@_inline
def _before(a, b):  # noqa: ANN001, ANN202 - numba infers the types
    """torch's ``largest`` comparator on packed elements: a's value ranks above b's."""
    return (a >> _HALF) > (b >> _HALF)


@_inline
def _swap(q, i, j):  # noqa: ANN001, ANN202
    t = q[i]
    q[i] = q[j]
    q[j] = t


@_inline
def _push_heap(q, first, hole, top, value):  # noqa: ANN001, ANN202
    """libstdc++ ``__push_heap`` (offsets relative to ``first``)."""
    parent = (hole - 1) // 2 if hole > 0 else 0
    while hole > top and _before(q[first + parent], value):
        q[first + hole] = q[first + parent]
        hole = parent
        parent = (hole - 1) // 2 if hole > 0 else 0
    q[first + hole] = value


@_inline
def _adjust_heap(q, first, hole, length, value):  # noqa: ANN001, ANN202
    """libstdc++ ``__adjust_heap``."""
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _before(q[first + child], q[first + child - 1]):
            child -= 1
        q[first + hole] = q[first + child]
        hole = child
    if (length & 1) == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        q[first + hole] = q[first + child - 1]
        hole = child - 1
    _push_heap(q, first, hole, top, value)


@_jit
def _heap_select(q, first, middle, last):  # noqa: ANN001, ANN202
    """libstdc++ ``__heap_select``: ``__make_heap`` on [first, middle), then each later element
    that ranks above the heap's top replaces it (``__pop_heap``)."""
    length = middle - first
    if length >= 2:
        parent = (length - 2) // 2
        while True:
            _adjust_heap(q, first, parent, length, q[first + parent])
            if parent == 0:
                break
            parent -= 1
    for i in range(middle, last):
        if _before(q[i], q[first]):
            value = q[i]
            q[i] = q[first]
            _adjust_heap(q, first, 0, length, value)


@_inline
def _move_median_to_first(q, result, a, b, c):  # noqa: ANN001, ANN202
    """libstdc++ ``__move_median_to_first``."""
    if _before(q[a], q[b]):
        if _before(q[b], q[c]):
            _swap(q, result, b)
        elif _before(q[a], q[c]):
            _swap(q, result, c)
        else:
            _swap(q, result, a)
    elif _before(q[a], q[c]):
        _swap(q, result, a)
    elif _before(q[b], q[c]):
        _swap(q, result, c)
    else:
        _swap(q, result, b)


@_inline
def _unguarded_partition(q, first, last, pivot):  # noqa: ANN001, ANN202
    """libstdc++ ``__unguarded_partition`` around ``q[pivot]`` (outside [first, last))."""
    p = q[pivot]
    while True:
        while _before(q[first], p):
            first += 1
        last -= 1
        while _before(p, q[last]):
            last -= 1
        if not first < last:
            return first
        _swap(q, first, last)
        first += 1


@_inline
def _insertion_sort(q, first, last):  # noqa: ANN001, ANN202
    """libstdc++ ``__insertion_sort``."""
    if first == last:
        return
    for i in range(first + 1, last):
        value = q[i]
        if _before(value, q[first]):
            for j in range(i, first, -1):  # move_backward
                q[j] = q[j - 1]
            q[first] = value
        else:
            hole = i
            while _before(value, q[hole - 1]):
                q[hole] = q[hole - 1]
                hole -= 1
            q[hole] = value


@_inline
def _find_stops(q, start, size, key, left, stops):  # noqa: ANN001, ANN202
    """The positions among ``size`` from ``start`` (upward for the left scan, downward for the
    right) where a partition's scan stops, in scan order, into ``stops``; returns how many. The
    left scan stops at a key <= the pivot's (it is not ``_before`` the pivot), the right scan at
    a key >= it. Branch-free: each position is written and the count advances past the stops."""
    count = 0
    if left:
        for i in range(start, start + size):
            stops[count] = i
            count += (q[i] >> _HALF) <= key
    else:
        for i in range(start, start - size, -1):
            stops[count] = i
            count += (q[i] >> _HALF) >= key
    return count


@_jit
def _partition(q, first, last, pivot, lefts, rights):  # noqa: ANN001, ANN202
    """libstdc++ ``__unguarded_partition(first, last, pivot)`` with the same swaps in the same
    order, returning its cut.

    Why: the scalar loops branch on every comparison, and on a tensor's variances half of
    those branches are mispredicted: 8.4 ns per element of a 2^24-element selection. Here the
    swaps are found block by block first (BlockQuicksort, Edelkamp and Weiss 2016): 3.9 ns.

    Why it is the same: the scalar partition swaps its i-th left stop with its i-th right stop
    while the left one lies before the right one. While a left block and a right block do not
    overlap, every stop in the left block lies before every stop in the right one, and both
    hold the values they started with (swaps so far touched only stops already passed), so
    their stops, paired in scan order, are the scalar loop's next swaps. Once the unscanned
    middle is narrower than a block, the scalar loop resumes just after the last swap made,
    where it would itself have stood, and finishes (the crossing included) as before."""
    key = q[pivot] >> _HALF
    size = lefts.size
    lscan, rscan = first, last  # next block to scan on each side: [lscan, lscan + size), [rscan - size, rscan)
    nl = il = nr = ir = 0  # stops found in each side's current block, and used
    while True:
        if il == nl:
            if rscan - lscan < size:
                break
            nl, il = _find_stops(q, lscan, size, key, True, lefts), 0
            lscan += size
        if ir == nr:
            if rscan - lscan < size:
                break
            nr, ir = _find_stops(q, rscan - 1, size, key, False, rights), 0
            rscan -= size
        take = min(nl - il, nr - ir)
        if take:
            for t in range(take):
                _swap(q, lefts[il + t], rights[ir + t])
            il += take
            ir += take
            first = lefts[il - 1] + 1  # the scalar loop's state after this swap
            last = rights[ir - 1]
    return _unguarded_partition(q, first, last, pivot)


@_jit
def _introselect(q, nth, first, last, depth):  # noqa: ANN001, ANN202
    """libstdc++ ``__introselect``."""
    lefts = np.empty(PARTITION_BLOCK, dtype=np.int64)
    rights = np.empty(PARTITION_BLOCK, dtype=np.int64)
    while last - first > 3:
        if depth == 0:
            _heap_select(q, first, nth + 1, last)
            _swap(q, first, nth)
            return
        depth -= 1
        mid = first + (last - first) // 2
        _move_median_to_first(q, first, first + 1, mid, last - 1)
        cut = _partition(q, first + 1, last, first, lefts, rights)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(q, first, last)


@_jit
def _pack(bits, q, offset):  # noqa: ANN001, ANN202
    """``q[i]`` = (comparator key of the float32 whose bits are ``bits[i]``) << 32 | (offset + i);
    returns how many of the magnitudes are not zero (NaN counts, as in ``count_nonzero``)."""
    nonzero = 0
    for i in range(bits.size):
        k = bits[i] & _SIGN_OFF
        nonzero += k != 0
        key = _NAN_KEY if k > _INF_KEY else np.uint64(k)
        q[i] = (key << _HALF) | np.uint64(offset + i)
    return nonzero


@_jit
def _key_after(q, k, key):  # noqa: ANN001, ANN202
    """Whether an element after the first ``k`` of ``q`` has comparator key ``key``. A split tie
    usually lies just after the k (the last partitions were narrow there), so the scan stops at
    the first block holding one instead of reading the rest (a branch-free test per block)."""
    wanted = np.uint64(key)
    for start in range(k, q.size, 64):
        found = False
        for i in range(start, min(start + 64, q.size)):
            found |= (q[i] >> _HALF) == wanted
        if found:
            return True
    return False


@_jit
def _tied_in_top(q, k, threshold):  # noqa: ANN001, ANN202
    """Indices among the first ``k`` of ``q`` whose comparator key is ``threshold`` (a key of at
    most +inf: there it is the magnitude's bits, so no element needs to be looked up)."""
    out = np.empty(k, dtype=np.int64)
    count = 0
    wanted = np.uint64(threshold)
    for i in range(k):
        e = q[i]
        out[count] = np.int64(e & _LOW)
        count += (e >> _HALF) == wanted
    return out[:count]


@_jit
def _nan_tied_in_top(bits, q, k, threshold):  # noqa: ANN001, ANN202
    """Indices among the first ``k`` of ``q`` whose magnitude bits are ``threshold``, a NaN's
    (the comparator gave every NaN one key, so the bits themselves are compared)."""
    out = np.empty(k, dtype=np.int64)
    count = 0
    for i in range(k):
        j = np.int64(q[i] & _LOW)
        if np.int64(bits[j] & _SIGN_OFF) == threshold:
            out[count] = j
            count += 1
    return out[:count]


def _lg(n: int) -> int:
    """libstdc++ ``__lg``: floor(log2 n)."""
    return n.bit_length() - 1


class PackedMagnitudes:
    """A tensor's float32 magnitudes (NaN allowed), packed for torch.topk's selection: one
    uint64 per element (:func:`_pack`), from the consecutive pieces of the array (a tensor's
    chunks), each packed where it lies instead of being joined first. ``nonzero`` counts the
    magnitudes that are not zero, which SCE needs for its ``k`` before it selects."""

    def __init__(self, values: np.ndarray | Sequence[np.ndarray]) -> None:
        parts = [values] if isinstance(values, np.ndarray) else list(values)
        self._bits = [np.ascontiguousarray(p, dtype=np.float32).reshape(-1).view(np.uint32) for p in parts]
        self.size = sum(b.size for b in self._bits)
        if self.size >= 1 << 32:
            raise ValueError(f"topk over {self.size} elements: indices take 32 bits")
        self._q = np.empty(self.size, dtype=np.uint64)
        self.nonzero = 0
        offset = 0
        for b in self._bits:
            self.nonzero += int(_pack(b, self._q[offset:offset + b.size], offset))
            offset += b.size

    def top(self, k: int) -> tuple[int, np.ndarray | None]:
        """What ``torch.topk(values, k, largest=True)`` keeps, as SCE needs it: the magnitude
        key (float32 bits, integer order) of the k-th largest, and, when only some of the
        elements tied at it are among the k, the sorted indices of those (else None: every
        tied element is kept). Selects in place, so it is called once."""
        n, q = self.size, self._q
        if not 0 < k <= n:
            raise ValueError(f"topk of {k} from {n} elements")
        if k == n:  # every element is chosen, so every tie: the smallest key
            return min(int((b & _SIGN_OFF).min()) for b in self._bits if b.size), None
        if k * PARTIAL_SORT_FACTOR <= n:
            _heap_select(q, 0, k, n)  # partial_sort's choice (its sort_heap only orders the k)
            kth = int(q[0] >> _HALF)  # the heap's top: the last of the chosen
        else:  # nth_element at k - 1
            _introselect(q, k - 1, 0, n, 2 * _lg(n))
            kth = int(q[k - 1] >> _HALF)
        if kth <= int(_INF_KEY):  # not a NaN: the comparator's key is the magnitude's bits
            return kth, np.sort(_tied_in_top(q, k, kth)) if _key_after(q, k, kth) else None
        # The k-th is a NaN, and NaNs tie in the comparator: the k-th largest bit pattern decides
        # (as the radix selection of a larger tensor finds it), its ties are found by their bits,
        # and they are split where more keys than k reach it in bit order, as that selection
        # counts. (The comparator may have chosen a NaN of a lower payload over a higher one;
        # both are NaN variances, whose task vectors make every weight NaN: no output differs.)
        keys = np.concatenate(self._bits) & _SIGN_OFF
        threshold = int(np.partition(keys, n - k)[n - k])
        if int(np.count_nonzero(keys >= threshold)) == k:
            return threshold, None
        return threshold, np.sort(_nan_tied_in_top(keys, q, k, threshold))


@cache
def agrees_with_torch() -> bool:
    """Whether this torch's CPU topk chooses as :meth:`PackedMagnitudes.top` does, probed once on tie-heavy
    arrays in both of its branches. The port is libstdc++'s selection (Linux wheels); a torch
    built on another C++ library (libc++, MSVC's) or a changed ``TopKImpl.h`` would choose other
    tied elements, and then callers use ``torch.topk`` itself."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((5000, 70), (5000, 2100), (777, 700)):  # partial_sort, then nth_element
        v = torch.randint(0, 9, (n,), generator=g).to(torch.float32)
        v[::97] = float("nan")
        chosen = torch.topk(v, k, largest=True, sorted=False).indices
        threshold = int(torch.topk(v, k).values[-1:].view(torch.int32)[0]) & 0x7FFFFFFF
        keys = v[chosen].view(torch.int32) & 0x7FFFFFFF
        want = torch.sort(chosen[keys == threshold]).values.numpy()
        got, tied = PackedMagnitudes(v.numpy()).top(k)
        if tied is None:  # every tied element kept
            tied = np.flatnonzero((v.view(torch.int32) & 0x7FFFFFFF).numpy() == threshold)
        if got != threshold or not np.array_equal(tied, want):
            log.info("torch.topk chooses tied elements otherwise here: SCE's tie split runs torch.topk")
            return False
    return True
