"""Exact k-th largest magnitude of a row-sharded tensor by radix selection, never a sort.

Magnitude trimming (TIES, breadcrumbs) ranks |delta| over the whole tensor, but no worker
holds a whole tensor. The bit pattern of a non-negative float32, read as an int32, orders
exactly like the float, so the k-th largest magnitude is found digit by digit:

- round 0: each canonical chunk histograms the high 16 bits of its keys (32768 bins, the
  sign bit is always 0); the reduce adds the histograms in chunk order (exact integers)
  and walks down from the top to the bucket that holds the k-th largest key, leaving a
  residual rank inside that bucket;
- round 1: each chunk histograms the low 16 bits of its keys that fall in that bucket
  (sent sparsely: the bucket is usually a tiny part of the chunk); the reduce finds the
  exact low bits.

The result is the exact key of the k-th largest magnitude: two reads of the tensor, integer
counting only, and the same answer for any chunking. Magnitudes are ranked as float32 (for
bf16/fp16/fp32 deltas that is exact; mergekit ranks in float32 on CPU too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like ``|x|`` (float32 bit patterns of the magnitudes), flattened."""
    return x.detach().reshape(-1).abs().to(torch.float32).view(torch.int32)


def _count(bins: torch.Tensor, size: int) -> torch.Tensor:
    # index_add_ of ones: exact integer counts, several times faster than torch.bincount here.
    out = torch.zeros(size, dtype=torch.int64)
    if bins.numel():
        out.index_add_(0, bins.to(torch.int64), torch.ones(1, dtype=torch.int64).expand(bins.numel()))
    return out


def high_histogram(keys: torch.Tensor) -> torch.Tensor:
    """Round 0 partial: counts of the high 16 bits (int64, ``HIGH_BINS`` long)."""
    return _count(keys >> 16, HIGH_BINS)


def low_histogram(keys: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round 1 partial, sparse: the distinct low 16 bits among keys in ``bucket`` and their counts."""
    # A range test on the whole key is one pass; numpy's compare and boolean take are several
    # times faster than torch's shift + mask + index on CPU.
    k = keys.numpy()
    lo = bucket << 16
    inside = torch.from_numpy(k[(k >= lo) & (k < lo + LOW_BINS)] - lo)
    if not inside.numel():
        return torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)
    values, counts = torch.unique(inside, return_counts=True)
    return values.to(torch.int32), counts.to(torch.int64)


def local_estimate(high: torch.Tensor, rank: int, numel: int, chunk_numel: int) -> tuple[int, int] | None:
    """Buckets ``(first, count)`` where this chunk expects the global ``rank``-th largest key.

    Chunks of one tensor are alike, so the chunk's share of the rank, give or take a few
    binomial standard deviations (and one bucket on each side), brackets where the global
    k-th largest key falls in it. Shipping the low bits of those buckets lets round 0 finish
    the selection and saves a second read of the tensor; round 1 remains the fallback.
    """
    total = int(high.sum())
    if total == 0:
        return None
    share = rank * chunk_numel / numel
    spread = 4.0 * math.sqrt(max(share * (1.0 - chunk_numel / max(numel, 1)), 1.0)) + 1.0
    top, _ = locate(high, min(total, max(1, math.floor(share - spread))))
    bottom, _ = locate(high, min(total, max(1, math.ceil(share + spread))))
    first = max(0, bottom - 1)
    return first, min(top + 1, HIGH_BINS - 1) - first + 1


def range_histogram(keys: torch.Tensor, first_bucket: int, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse counts of the keys in ``buckets`` consecutive buckets, relative to the first's start."""
    k = keys.numpy()
    lo = first_bucket << 16
    inside = torch.from_numpy(k[(k >= lo) & (k < lo + buckets * LOW_BINS)] - lo)
    if not inside.numel():
        return torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)
    values, counts = torch.unique(inside, return_counts=True)
    return values.to(torch.int32), counts.to(torch.int64)


def resolve_speculative(parts: Sequence[tuple[tuple[int, int] | None, torch.Tensor, torch.Tensor]], bucket: int,
                        residual: int) -> int | None:
    """Exact low bits in ``bucket`` from round 0's speculative ranges, or None when some chunk
    did not ship that bucket (then round 1 reads the tensor again)."""
    low = torch.zeros(LOW_BINS, dtype=torch.int64)
    for window, values, counts in parts:
        if window is None:
            continue  # an empty chunk holds nothing of any bucket
        first, count = window
        if not first <= bucket < first + count:
            return None
        offset = (bucket - first) * LOW_BINS
        keep = (values >= offset) & (values < offset + LOW_BINS)
        if bool(keep.any()):
            low.index_add_(0, (values[keep] - offset).to(torch.int64), counts[keep])
    return locate(low, residual)[0]


def locate(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bin holding the ``rank``-th largest (1-based) and the rank left inside that bin.

    Walks the bins from the top: the bin is the first where the count of keys at or above
    it reaches ``rank``.
    """
    total = int(histogram.sum())
    if not 1 <= rank <= total:
        raise ValueError(f"rank {rank} outside 1..{total}")
    descending = torch.flip(histogram, dims=[0]).cumsum(0)
    idx = int(torch.searchsorted(descending, torch.tensor([rank], dtype=descending.dtype)).item())
    b = histogram.numel() - 1 - idx
    above = int(descending[idx]) - int(histogram[b])
    return b, rank - above


def sum_histograms(partials: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact sum of integer histograms (order does not matter for integers; kept in chunk order)."""
    out = partials[0].clone()
    for p in partials[1:]:
        out += p
    return out


def dense_low(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Dense low-bits histogram of one bucket from the chunks' sparse parts."""
    out = torch.zeros(LOW_BINS, dtype=torch.int64)
    for values, counts in parts:
        if values.numel():
            out.index_add_(0, values.to(torch.int64), counts)
    return out


def kth_largest_key(keys: torch.Tensor, rank: int) -> int:
    """Whole-tensor key of the ``rank``-th largest: the two rounds on one chunk (for tests/tools)."""
    bucket, residual = locate(high_histogram(keys), rank)
    low, _ = locate(dense_low([low_histogram(keys, bucket)]), residual)
    return (bucket << 16) | low
