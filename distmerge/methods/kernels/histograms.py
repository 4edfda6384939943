"""Histograms of selection keys: the counting passes of the radix selection (:mod:`distmerge.methods.selection`).

A key is the float32 bit pattern of ``|x - base|`` rounded to the compute dtype, which orders
like the magnitude; the high 16 bits index a bucket (the sign bit of a magnitude is 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from distmerge.methods.kernels.rounding import _jit, _key, _r, mode_tag

KEY_BUCKETS = 1 << 15  # distinct high 16 bits of a key (the sign bit of a magnitude is 0)


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

