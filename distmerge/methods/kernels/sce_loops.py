"""SCE's statistics rounds and merge as fused loops (float32 compute).

Why: SCE evaluates the per-element variance of the task vectors in three reduction rounds and
again in its last round and merge. As torch ops each evaluation stacked the task vectors,
called the variance kernel on a float32 copy, took magnitudes, viewed their bits and counted
them: with the merge's dozen elementwise ops it cost ~40x a linear merge per core. Here each
round and the merge is one pass over cache-sized blocks of the rows as stored (bfloat16 bits
widened as read, :func:`rounding._value`), with no task-vector stack.

Why it is exact: every operation is the torch formulation's (``methods.sce``) in float32, in
the same order. The task vector is ``float32(x - base)``; the variance is torch's CPU Welford
(float64 accumulation over the models in order, ``m2 / n`` rounded once to float32, as
:mod:`.variance`); the key is the bit pattern of its magnitude (``selection.magnitude_keys``);
the kept task vector is ``tv * 1.0`` or ``tv * 0.0`` (as ``tvs * mask``); the squares' sum is
numpy's pairwise sum of their float64 copies (:mod:`.sum_orders`); sums over the models add
in float32 from +0.0 in torch's stacked ``sum(dim=0)`` order (:mod:`.stack_order`). Other
compute dtypes keep the torch formulation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distmerge.methods.kernels.rounding import _inline, _jit, _value
from distmerge.methods.kernels.stack_order import reordered_from, stack_column
from distmerge.methods.kernels.sum_orders import PW_BLOCK, leaves_into, pairwise_spans
from distmerge.methods.kernels.variance import exact_reciprocal, over_count

BLOCK = 2048  # elements per block of the counting rounds and the merge
KEEP_ALL = -1  # a threshold below every key (select_topk >= 1)
KEEP_NONE = 1 << 32  # a threshold above every key (select_topk <= 0)
_SIGN_OFF = np.uint32(0x7FFFFFFF)

HISTOGRAM, LOW_BITS, MAGNITUDES = 0, 1, 2  # the counting rounds (:func:`sce_counts`)


@_inline
def _task_vectors(base, xs, s, m, tv):  # noqa: ANN001, ANN202 - numba infers the types
    """``tv[e, :m]`` = ``float32(xs[e] - base)`` over elements ``s .. s + m``."""
    b = base[s:s + m]
    for e in range(len(xs)):
        x = xs[e][s:s + m]
        row = tv[e]
        for j in range(m):
            row[j] = np.float32(_value(x, j) - _value(b, j))


@_inline
def _variance_keys(tv, m, mean, m2, keys):  # noqa: ANN001, ANN202
    """``keys[:m]`` = magnitude keys of the population variances of ``tv[:, :m]`` (Welford in
    float64 over the models in order, rounded once to float32)."""
    n = tv.shape[0]
    for j in range(m):
        mean[j] = 0.0
        m2[j] = 0.0
    for e in range(n):
        row = tv[e]
        count = np.float64(e + 1)
        r = exact_reciprocal(e + 1)
        for j in range(m):
            x = np.float64(row[j])
            delta = x - mean[j]
            mean[j] = mean[j] + over_count(delta, count, r)
            m2[j] = m2[j] + delta * (x - mean[j])
    r = exact_reciprocal(n)
    for j in range(m):
        keys[j] = np.int64(np.float32(over_count(m2[j], np.float64(n), r)).view(np.uint32) & _SIGN_OFF)


@_inline
def _keep(keys, m, threshold, tied, keep):  # noqa: ANN001, ANN202
    """``keep[:m]`` = 1.0 where the variance key is kept, else 0.0 (``mask.to(tvs.dtype)``)."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    if tied.size:  # the ties at the threshold split as torch.topk splits them
        for j in range(m):
            k = keys[j]
            keep[j] = one if (k > threshold) | ((k == threshold) & tied[j]) else zero
    else:
        for j in range(m):
            keep[j] = one if keys[j] >= threshold else zero


@_jit
def _counts(base, xs, stage, bucket, hist, values):  # noqa: ANN001, ANN202
    """One counting round (see :func:`sce_counts`); returns the count of nonzero keys."""
    size = base.size
    tv = np.empty((len(xs), BLOCK), dtype=np.float32)
    mean = np.empty(BLOCK, dtype=np.float64)
    m2 = np.empty(BLOCK, dtype=np.float64)
    keys = np.empty(BLOCK, dtype=np.int64)
    nonzero = 0
    for s in range(0, size, BLOCK):
        m = min(BLOCK, size - s)
        _task_vectors(base, xs, s, m, tv)
        _variance_keys(tv, m, mean, m2, keys)
        if stage == HISTOGRAM:
            for j in range(m):
                k = keys[j]
                hist[k >> 16] += 1
                nonzero += k != 0
        elif stage == LOW_BITS:
            for j in range(m):
                k = keys[j]
                if (k >> 16) == bucket:
                    hist[k & 0xFFFF] += 1
        else:
            out = values[s:s + m]
            for j in range(m):
                out[j] = np.uint32(keys[j]).view(np.float32)
    return nonzero


def sce_counts(base: np.ndarray, xs: Sequence[np.ndarray], stage: int, bucket: int = 0,
               ) -> tuple[int, np.ndarray]:
    """One of SCE's counting rounds over a chunk (rows as :func:`rounding.value_arrays` gives them):

    * ``HISTOGRAM``: (count of nonzero variance keys, int64 histogram of their high 16 bits);
    * ``LOW_BITS``: (0, int64 histogram of the low 16 bits of the keys in high bucket ``bucket``);
    * ``MAGNITUDES``: (0, the variances' magnitudes, float32, flat: ``var.abs()``).
    """
    size = base.size
    hist = np.zeros(1 << 16 if stage != MAGNITUDES else 0, dtype=np.int64)
    values = np.empty(size if stage == MAGNITUDES else 0, dtype=np.float32)
    nonzero = _counts(base, tuple(xs), stage, bucket, hist, values)
    return int(nonzero), (values if stage == MAGNITUDES else hist)


@_jit
def _square_sums(base, xs, threshold, tied, sums):  # noqa: ANN001, ANN202
    """``sums[e]`` = numpy's pairwise float64 sum of the float32 squares of kept task vector e."""
    n = base.size
    starts, sizes = pairwise_spans(n)
    k = len(xs)
    tv = np.empty((k, PW_BLOCK), dtype=np.float32)
    mean = np.empty(PW_BLOCK, dtype=np.float64)
    m2 = np.empty(PW_BLOCK, dtype=np.float64)
    keys = np.empty(PW_BLOCK, dtype=np.int64)
    keep = np.empty(PW_BLOCK, dtype=np.float32)
    leaf = np.empty((k, starts.size), dtype=np.float64)
    buf = np.empty((k, PW_BLOCK), dtype=np.float64)
    for j in range(starts.size):
        s = starts[j]
        z = sizes[j]
        _task_vectors(base, xs, s, z, tv)
        if threshold == KEEP_ALL:
            for i in range(z):
                keep[i] = np.float32(1.0)
        else:
            _variance_keys(tv, z, mean, m2, keys)
            _keep(keys, z, threshold, tied[s:s + z] if tied.size else tied, keep)
        for e in range(k):
            row = tv[e]
            q = buf[e]
            for i in range(z):
                kept = row[i] * keep[i]
                q[i] = np.float64(kept * kept)
        leaves_into(leaf, j, buf, z, sums, n, j == starts.size - 1)


def sce_square_sums(base: np.ndarray, xs: Sequence[np.ndarray], threshold: int, tied: np.ndarray,
                    ) -> np.ndarray:
    """SCE's last round over a chunk: per model, the float64 sum of ``tv^2`` over the kept
    elements (keys >= ``threshold``; where ``tied`` is not empty, ties at the threshold only
    where it is True), as ``scalars.total(kept.square())``."""
    sums = np.zeros(len(xs), dtype=np.float64)
    _square_sums(base, tuple(xs), threshold, tied, sums)
    return sums


@_jit
def _merge(base, xs, threshold, tied, weights, tail, out):  # noqa: ANN001, ANN202
    """SCE's erase and weighted mean over the rows, block by block (see :func:`sce_merge`)."""
    n = len(xs)
    size = base.size
    one = np.float32(1.0)
    zero = np.float32(0.0)
    floor = np.float32(1e-6)
    tv = np.empty((n, BLOCK), dtype=np.float32)
    mean = np.empty(BLOCK, dtype=np.float64)
    m2 = np.empty(BLOCK, dtype=np.float64)
    keys = np.empty(BLOCK, dtype=np.int64)
    keep = np.empty(BLOCK, dtype=np.float32)
    total = np.empty(BLOCK, dtype=np.float32)
    merged = np.empty(BLOCK, dtype=np.float32)
    divisor = np.empty(BLOCK, dtype=np.float32)
    terms = np.empty(n, dtype=np.float32)
    for s in range(0, size, BLOCK):
        m = min(BLOCK, size - s)
        _task_vectors(base, xs, s, m, tv)
        if threshold != KEEP_ALL:
            _variance_keys(tv, m, mean, m2, keys)
            _keep(keys, m, threshold, tied[s:s + m] if tied.size else tied, keep)
            for e in range(n):
                row = tv[e]
                for j in range(m):
                    row[j] = row[j] * keep[j]
        for j in range(m):  # torch's sums start from +0.0 (a sum of -0.0 terms is +0.0)
            total[j] = zero
            merged[j] = zero
            divisor[j] = zero
        for e in range(n):
            row = tv[e]
            for j in range(m):
                total[j] = total[j] + row[j]
        first_reordered = reordered_from(n, tail, s, m)
        for j in range(first_reordered, m):
            for e in range(n):
                terms[e] = tv[e, j]
            total[j] = stack_column(terms, n, s + j >= tail)
        for e in range(n):
            row = tv[e]
            w = weights[e]
            for j in range(m):
                t = row[j]
                agrees = ((t > zero) & (total[j] >= zero)) | ((t < zero) & ~(total[j] >= zero))
                erased = w * (one if agrees else zero)
                merged[j] = merged[j] + t * erased
                divisor[j] = divisor[j] + erased
        for j in range(first_reordered, m):
            for e in range(n):
                t = tv[e, j]
                agrees = ((t > zero) & (total[j] >= zero)) | ((t < zero) & ~(total[j] >= zero))
                terms[e] = t * (weights[e] * (one if agrees else zero))
            merged[j] = stack_column(terms, n, s + j >= tail)
            for e in range(n):
                t = tv[e, j]
                agrees = ((t > zero) & (total[j] >= zero)) | ((t < zero) & ~(total[j] >= zero))
                terms[e] = weights[e] * (one if agrees else zero)
            divisor[j] = stack_column(terms, n, s + j >= tail)
        b = base[s:s + m]
        o = out[s:s + m]
        for j in range(m):
            d = divisor[j]
            d = floor if d < floor else d  # clamp(min=1e-6): NaN passes
            o[j] = _value(b, j) + merged[j] / d


def sce_merge(base: np.ndarray, xs: Sequence[np.ndarray], threshold: int, tied: np.ndarray,
              weights: np.ndarray, tail: int) -> np.ndarray:
    """SCE's merge of a block of rows in float32: the kept task vectors (as
    :func:`sce_square_sums` keeps them; ``KEEP_ALL`` skips the variances), the sign elected by
    their sum (``>= 0``: +), each model's ``weights[e]`` where its sign agrees (a zero never
    does), and ``base + sum(tv * w) / max(sum(w), 1e-6)``; sums over the models in torch's
    stacked order, the tensor's tail from the row-relative index ``tail``
    (:mod:`.stack_order`)."""
    out = np.empty(base.size, dtype=np.float32)
    _merge(base, tuple(xs), threshold, tied, weights.astype(np.float32), tail, out)
    return out
