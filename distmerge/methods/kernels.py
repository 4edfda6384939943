"""Fused elementwise kernels for the hot loops: magnitude selection and the task-vector merge.

The task-vector pipeline written as torch ops makes some thirty passes over memory per
element (delta, abs, compare, mask, weight, sign, clamp, sums ...), and the magnitude
histogram needs several more; on a CPU core that made TIES cost six times a linear merge.
Compiled with numba, each is one pass over cache-sized blocks of the rows (per core, a TIES
merge of three 0.5 GB models went from 13.4 s to 5.1 s and linear from 2.7 s to 1.5 s; see
benchmarks/RESULTS.md).

Exactness is the point, not an afterthought. Every loop performs the same IEEE operations
in the same order as the torch formulation (``TaskVectorMethod.merge_reference``), each
rounded separately (numba does not contract a multiply and an add into an FMA unless asked
to), so the kernels reproduce it bit for bit; the tests check that on random data for every
method and dtype. Elementwise loops have no notion of a shard, so shard invariance holds by
construction.

Dtypes: float32 and float64 compute run natively. bfloat16 compute runs on float32 copies
of the rows with each operation rounded to bfloat16 (round to nearest even), which is what
torch's CPU bfloat16 ops do (compute in float32, round the result). float16 compute has no
kernel: :func:`kernel_mode` returns None and callers use the torch formulation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba.core import types
from numba.extending import overload

NATIVE = 0  # float32 / float64: no rounding beyond the dtype's own
BFLOAT16 = 1  # float32 arrays, every result rounded to bfloat16

NO_LOW = -1  # a low threshold below every key: no lower bound
NO_HIGH = 1 << 32  # a high threshold above every key: no upper bound
KEEP_NOTHING = 1 << 32  # a low threshold above every key

KEY_BUCKETS = 1 << 15  # distinct high 16 bits of a key (the sign bit of a magnitude is 0)

RESCALE_NONE, RESCALE_MULTIPLY, RESCALE_DIVIDE, RESCALE_DIVIDE_BY_PROBS = 0, 1, 2, 3

_jit = numba.njit(cache=True, nogil=True)
_inline = numba.njit(cache=True, nogil=True, inline="always")


def kernel_mode(dtype: torch.dtype) -> int | None:
    """How the kernels compute in ``dtype``, or None when they cannot (use torch ops)."""
    if dtype in (torch.float32, torch.float64):
        return NATIVE
    if dtype == torch.bfloat16:
        return BFLOAT16
    return None


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the arrays the kernels see for compute dtype ``dtype``."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def as_array(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A flat, contiguous numpy view (or copy, when a cast is needed) of ``t`` in ``dtype``."""
    return t.detach().to(dtype).reshape(-1).contiguous().numpy()


def delta_arrays(base: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """``(base, x, mode)`` for a kernel that computes ``x - base`` in ``x``'s compute dtype.

    float16 has no kernel mode: torch computes that delta (rounded to float16, as the torch
    formulation does) and the kernel gets it in float32 against a zero base (``d - 0 == d``).
    """
    mode = kernel_mode(x.dtype)
    if mode is None:
        delta = as_array(x - base, torch.float32)
        return np.zeros_like(delta), delta, NATIVE
    kd = kernel_dtype(x.dtype)
    return as_array(base, kd), as_array(x, kd), mode


def scalar(value: float, dtype: torch.dtype) -> np.ndarray:
    """A Python number as torch uses it beside a ``dtype`` tensor: cast to the op's math type.

    torch computes bfloat16 ops in float32, so a Python scalar is cast to float32 (not to
    bfloat16); beside float32/float64 tensors it is cast to that dtype.
    """
    return np.asarray(value, dtype=np.float64 if dtype == torch.float64 else np.float32)


def rounded(values: Sequence[float], dtype: torch.dtype) -> np.ndarray:
    """Values stored in a ``dtype`` tensor (rounded to it), in the kernels' array dtype."""
    return torch.tensor(list(values), dtype=dtype).to(kernel_dtype(dtype)).numpy()


# ---- scalar helpers (inlined into the loops) --------------------------------------------------

@_inline
def _bits32(v):  # noqa: ANN001, ANN202 - numba infers the types
    return np.float32(v).view(np.int32)


@_jit
def _bf16(v):  # noqa: ANN001, ANN202
    """Round a float32 to the nearest bfloat16 (ties to even), as c10::BFloat16 does."""
    u = np.int64(_bits32(v)) & 0xFFFFFFFF
    r = np.uint32((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)
    return v if v != v else r  # branch-free, so loops stay vectorizable


def _r(v, mode):  # noqa: ANN001, ANN202
    """``v`` rounded to the compute dtype (see :func:`_r_typed`)."""
    raise NotImplementedError("only callable from jitted code")


@overload(_r)
def _r_typed(v, mode):  # noqa: ANN001, ANN202
    # The mode is a compile-time choice: BFLOAT16 arrives as an integer, NATIVE as a float
    # (see :func:`mode_tag`), so each loop is compiled without a per-element branch.
    if isinstance(mode, types.Integer):
        return lambda v, mode: _bf16(v)
    return lambda v, mode: v


def mode_tag(mode: int) -> np.generic:
    """The value kernels take as ``mode``; its numba type selects the rounding at compile time."""
    return np.int64(1) if mode == BFLOAT16 else np.float64(0.0)


@_inline
def _key(d):  # noqa: ANN001, ANN202
    """Selection key of a delta: the float32 bit pattern of ``|d|`` (orders like |d|)."""
    return _bits32(abs(d))


# ---- magnitude selection ---------------------------------------------------------------------

@_jit
def _key_histogram(base, x, mode, hist):  # noqa: ANN001, ANN202
    for i in range(x.size):
        hist[_key(_r(x[i] - base[i], mode)) >> 16] += 1


@_jit
def _histogram_and_windows(base, x, mode, hist, lo0, hi0, w0, lo1, hi1, w1):  # noqa: ANN001, ANN202
    for i in range(x.size):
        k = _key(_r(x[i] - base[i], mode))
        hist[k >> 16] += 1
        if lo0 <= k < hi0:
            w0[k - lo0] += 1
        if lo1 <= k < hi1:
            w1[k - lo1] += 1


def key_histogram(base: np.ndarray, x: np.ndarray, mode: int) -> torch.Tensor:
    """Counts of the high 16 bits of the delta keys of ``x - base`` (int64, ``KEY_BUCKETS`` long)."""
    hist = np.zeros(KEY_BUCKETS, dtype=np.int64)
    _key_histogram(base, x, mode_tag(mode), hist)
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


# ---- the task-vector merge ------------------------------------------------------------------

BLOCK = 2048  # elements per block: the per-expert scratch rows stay in L1/L2 cache


@_jit
def _sparsified(x, b, mode, lo, hi, mask, kind, f, pr, w, row):  # noqa: ANN001, ANN202
    """One expert's weighted, sparsified, rescaled delta rows; the common case in one loop."""
    zero = row.dtype.type(0.0)
    one = row.dtype.type(1.0)
    m = row.size
    if mask.size == 0 and kind == RESCALE_NONE:
        for j in range(m):
            d = _r(x[j] - b[j], mode)
            k = _key(d)
            row[j] = _r(d * (one if (lo <= k) & (k < hi) else zero) * w, mode)
        return
    for j in range(m):
        d = _r(x[j] - b[j], mode)
        k = _key(d)
        row[j] = d * (one if (lo <= k) & (k < hi) else zero)
    if mask.size:
        for j in range(m):
            row[j] = row[j] * (one if mask[j] else zero)
    if kind == RESCALE_MULTIPLY:
        for j in range(m):
            row[j] = _r(row[j] * f, mode)
    elif kind == RESCALE_DIVIDE:
        for j in range(m):
            row[j] = _r(row[j] / f, mode)
    elif kind == RESCALE_DIVIDE_BY_PROBS:
        for j in range(m):
            row[j] = _r(row[j] / pr[j], mode)
    for j in range(m):
        row[j] = _r(row[j] * w, mode)


@_jit
def _task_vectors(base, xs, mode, low, high, masks, rescale_kind, rescale, probs, weights,  # noqa: ANN001, ANN202
                  weights_stored, consensus, normalize, total_weight, lam, out):
    """One pass of the task-vector family; the torch formulation, op for op, per element.

    Per expert e: d = x - base; kept = d * mask (mask from key thresholds [low, high) and,
    where given, an explicit mask); rescaled by a factor, a divisor or a per-element
    probability; weighted. Then either a plain sum (normalized by ``total_weight`` if > 0)
    or TIES sign consensus (normalized by the agreeing weights); then lambda; then + base.
    The elements go in cache-sized blocks, expert by expert, and every inner loop is a
    simple branch-free loop over contiguous memory: that is what the compiler vectorizes
    (a per-element loop over the experts, or one with loop-invariant branches, runs
    several times slower).
    """
    n = len(xs)
    zero = out.dtype.type(0.0)
    one = out.dtype.type(1.0)
    wd = np.empty((n, BLOCK), dtype=out.dtype)
    total = np.empty(BLOCK, dtype=out.dtype)
    sign = np.empty(BLOCK, dtype=out.dtype)
    div = np.empty(BLOCK, dtype=out.dtype)
    for s in range(0, out.size, BLOCK):
        m = min(BLOCK, out.size - s)
        b = base[s:s + m]
        for e in range(n):
            kind = rescale_kind[e]
            _sparsified(xs[e][s:s + m], b, mode, low[e], high[e], masks[e][s:s + m] if masks[e].size else masks[e],
                        kind, rescale[e], probs[e][s:s + m] if kind == RESCALE_DIVIDE_BY_PROBS else probs[e],
                        weights[e], wd[e, :m])
        acc = total[:m]
        acc[:] = wd[0, :m]
        for e in range(1, n):
            row = wd[e, :m]
            for j in range(m):
                acc[j] = _r(acc[j] + row[j], mode)
        if consensus:
            sg = sign[:m]
            dv = div[:m]
            for e in range(n):
                row = wd[e, :m]
                ws = weights_stored[e]
                wz = zero * ws
                if e == 0:  # elect the sign from the total in acc, then start the agreeing sums
                    for j in range(m):
                        sgn = -one if np.signbit(acc[j]) else one
                        sg[j] = sgn
                        a = row[j] * sgn
                        a = zero if a < zero else a  # clamp(min=0): -0.0 and NaN pass, as in torch
                        acc[j] = a
                        dv[j] = ws if a > zero else wz
                else:
                    for j in range(m):
                        a = row[j] * sg[j]
                        a = zero if a < zero else a
                        acc[j] = _r(acc[j] + a, mode)
                        dv[j] = _r(dv[j] + (ws if a > zero else wz), mode)
            if normalize and lam == one:  # TIES' defaults: sign, normalize and + base in one loop
                o = out[s:s + m]
                for j in range(m):
                    o[j] = _r(b[j] + _r(acc[j] * sg[j] / (one if dv[j] == zero else dv[j]), mode), mode)
                continue
            for j in range(m):
                acc[j] = acc[j] * sg[j]
            if normalize:
                for j in range(m):
                    # torch adds (div == 0): +1 where zero; adding +0.0 elsewhere changes nothing
                    acc[j] = _r(acc[j] / (one if dv[j] == zero else dv[j]), mode)
        elif normalize:
            for j in range(m):
                acc[j] = _r(acc[j] / total_weight, mode)
        if lam != one:
            for j in range(m):
                acc[j] = _r(acc[j] * lam, mode)
        o = out[s:s + m]
        for j in range(m):
            o[j] = _r(b[j] + acc[j], mode)


def task_vectors(
    base: np.ndarray, xs: Sequence[np.ndarray], mode: int, *, low: Sequence[int], high: Sequence[int],
    masks: Sequence[np.ndarray | None], rescale_kind: Sequence[int], rescale: np.ndarray,
    probs: Sequence[np.ndarray | None], weights: np.ndarray, weights_stored: np.ndarray, consensus: bool,
    normalize: bool, total_weight: np.ndarray, lam: np.ndarray,
) -> np.ndarray:
    """Run :func:`_task_vectors` (see there); ``None`` masks/probs mean "not used"."""
    empty_mask = np.zeros(0, dtype=np.bool_)
    empty_probs = np.zeros(0, dtype=base.dtype)
    out = np.empty_like(base)
    _task_vectors(base, tuple(xs), mode_tag(mode), np.asarray(low, dtype=np.int64), np.asarray(high, dtype=np.int64),
                  tuple(empty_mask if m is None else m for m in masks), np.asarray(rescale_kind, dtype=np.int64),
                  rescale, tuple(empty_probs if p is None else p for p in probs), weights, weights_stored,
                  consensus, normalize, total_weight[()], lam[()], out)
    return out


# ---- L1 norms (the DARE/TIES rescale) -------------------------------------------------------

@_jit
def _abs_sums(base, x, mode, lo, hi, mask, sums):  # noqa: ANN001, ANN202
    """``sum |d|`` and ``sum |d * keep|`` in float64, in blocks of 1024 (a fixed order)."""
    has_mask = mask.size > 0
    for s in range(0, x.size, 1024):
        before = 0.0
        after = 0.0
        for i in range(s, min(s + 1024, x.size)):
            d = _r(x[i] - base[i], mode)
            k = _key(d)
            a = np.float64(abs(d))
            before += a
            if (lo <= k) & (k < hi) and (not has_mask or mask[i]):
                after += a
        sums[0] += before
        sums[1] += after


def abs_sums(base: np.ndarray, x: np.ndarray, mode: int, lo: int, hi: int, mask: np.ndarray | None) -> tuple[float, float]:
    """L1 norms of a delta chunk before and after sparsification (keys in ``[lo, hi)`` and,
    where given, ``mask``): one pass, float64, the same sums for the same chunk every time."""
    sums = np.zeros(2, dtype=np.float64)
    _abs_sums(base, x, mode_tag(mode), lo, hi, np.zeros(0, dtype=np.bool_) if mask is None else mask, sums)
    return float(sums[0]), float(sums[1])


# ---- AIM relaxation ------------------------------------------------------------------------

@_jit
def _relax(base, merged, factors, out):  # noqa: ANN001, ANN202
    n = factors.size
    for s in range(0, out.size, n):
        b = base[s:s + n]
        m = merged[s:s + n]
        o = out[s:s + n]
        for j in range(n):
            o[j] = b[j] + (m[j] - b[j]) * factors[j]


def relax(base: np.ndarray, merged: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """``base + (merged - base) * factors`` with ``factors`` along the last dimension (rows of
    ``factors.size`` elements), each operation rounded as torch's three ops round it."""
    out = np.empty_like(merged)
    if merged.size == 0:
        return out
    if factors.size == 0 or merged.size % factors.size:
        raise ValueError(f"{factors.size} factors do not divide a block of {merged.size} elements into rows")
    _relax(base, merged, factors, out)
    return out


# ---- weighted sums (linear) -------------------------------------------------------------------

@_jit
def _weighted_sum(xs, weights, mode, out):  # noqa: ANN001, ANN202
    n = len(xs)
    for i in range(out.size):
        v = _r(xs[0][i] * weights[0], mode)
        for e in range(1, n):
            v = _r(v + _r(xs[e][i] * weights[e], mode), mode)
        out[i] = v


@_jit
def _divide(out, divisor, mode):  # noqa: ANN001, ANN202
    for i in range(out.size):
        out[i] = _r(out[i] / divisor, mode)


def weighted_sum(xs: Sequence[np.ndarray], weights: np.ndarray, mode: int, divisor: np.ndarray | None) -> np.ndarray:
    """``sum_e weights[e] * xs[e]`` (each product and sum rounded), then ``/ divisor`` if given."""
    out = np.empty_like(xs[0])
    _weighted_sum(tuple(xs), weights, mode_tag(mode), out)
    if divisor is not None:
        _divide(out, divisor[()], mode_tag(mode))
    return out


def warm_up(experts: Sequence[int] = (2, 3), dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)) -> None:
    """Compile (or load from numba's on-disk cache) the kernels a merge of ``experts`` models
    in ``dtypes`` uses, so that the first block of a timed merge does not pay for it."""
    for dtype in dtypes:
        mode = kernel_mode(dtype)
        if mode is None:
            continue
        kd = kernel_dtype(dtype)
        a = as_array(torch.zeros(64, dtype=dtype), kd)
        key_histogram(a, a, mode)
        key_histogram(a[::2], a[::2], mode)
        histogram_and_windows(a, a, mode, [(0, 1)])
        for n in experts:
            ones = np.ones(n, dtype=a.dtype)
            for consensus in (False, True):
                task_vectors(a, [a] * n, mode, low=[NO_LOW] * n, high=[NO_HIGH] * n, masks=[None] * n,
                             rescale_kind=[RESCALE_NONE] * n, rescale=ones, probs=[None] * n, weights=ones,
                             weights_stored=ones, consensus=consensus, normalize=True, total_weight=ones[0],
                             lam=ones[0])
            weighted_sum([a] * n, ones, mode, ones[0])
        relax(a, a, a[:8])
