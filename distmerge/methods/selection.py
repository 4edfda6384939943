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
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from distmerge.methods import kernels

K = TypeVar("K", bound=Hashable)  # how a caller names its ranks (e.g. the bounds of a trim)

HIGH_BINS = kernels.KEY_BUCKETS
LOW_BINS = 1 << 16


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like ``|x|`` (float32 bit patterns of the magnitudes), flattened."""
    return x.detach().reshape(-1).abs().to(torch.float32).view(torch.int32)


SAMPLE_STEP = 16  # round 0 places its windows from one key in 16 of a chunk (in blocks) ...
MIN_SAMPLED = 1 << 16  # ... when the chunk has at least this many (else from every key)
MAX_WINDOW_BUCKETS = 64  # a wider window (a chunk unlike the others) is not worth counting: round 1 decides
EVERY_BUCKET = (0, HIGH_BINS)  # the window of a small chunk that ships every key it has


class DeltaKeys:
    """The selection keys of one expert's delta rows ``x - base``, counted by fused kernels.

    The keys are never materialized: each count is a pass over the two row blocks
    (subtract, round to the compute dtype, take the magnitude's bit pattern, count). float16
    compute has no kernel, so torch computes that delta and the kernels count its keys.
    """

    def __init__(self, base: torch.Tensor, x: torch.Tensor, compute: torch.dtype | None = None) -> None:
        """``compute``: the dtype of the delta when the rows come as stored (default: ``x``'s)."""
        self._base, self._x, self._mode = kernels.delta_arrays(base, x, compute)
        self.numel = x.numel()
        self.nonfinite = -1  # NaN/Inf deltas, once a pass over every key has counted them

    def round_zero(self, ranks: dict[K, int], numel: int) -> tuple[torch.Tensor, dict[K, Speculation]]:
        """Round 0 of a chunk: the high-bits histogram, and for each named rank the low bits
        of the keys in the buckets where the chunk expects it.

        The buckets are placed from a sample of the keys (a cheap pre-pass), so the
        histogram and every window's low bits come from one full pass over the rows.
        """
        windows = _countable(self._windows(ranks, numel))
        high, parts = kernels.histogram_and_windows(self._base, self._x, self._mode, _key_ranges(windows))
        return high, {name: (w, *part) for (name, w), part in zip(windows.items(), parts, strict=True)}

    def speculate(self, ranks: dict[K, int], numel: int) -> dict[K, WindowCount]:
        """The speculative round of a chunk: for each named rank, the buckets where the chunk
        expects it, how many keys lie above them, and the low bits of the keys inside. The
        same pass counts the NaN/Inf deltas (:attr:`nonfinite`).

        No high-bits histogram: when every chunk's window holds the global threshold
        (:func:`resolve_windows`), the counts above and inside give it exactly; when one
        does not, the radix rounds (:meth:`round_zero`) follow.
        """
        # A small chunk (a tensor's last rows, often) ships all its keys: its estimate is the
        # noisiest, its window the likeliest to miss or to be too wide to count densely.
        small = 0 < self.numel <= MIN_SAMPLED and self.numel < numel
        windows = {name: EVERY_BUCKET for name in ranks} if small else _countable(self._windows(ranks, numel))
        counted = {name: (0, 0) if w == EVERY_BUCKET else w for name, w in windows.items()}
        above, parts, self.nonfinite = kernels.above_and_windows(self._base, self._x, self._mode, _key_ranges(counted))
        out: dict[K, WindowCount] = {}
        for (name, w), n, part in zip(windows.items(), above, parts, strict=True):
            out[name] = (w, 0, *self._every_key()) if w == EVERY_BUCKET else (w, n, *part)
        return out

    def _every_key(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's distinct keys and how often each occurs (int32, int64)."""
        values, counts = np.unique(kernels.delta_keys(self._base, self._x, self._mode), return_counts=True)
        return torch.from_numpy(values), torch.from_numpy(counts.astype(np.int64))

    def _windows(self, ranks: dict[K, int], numel: int) -> dict[K, tuple[int, int] | None]:
        """Per named rank, the buckets ``(first, count)`` the chunk expects it in, placed from a
        sample of the keys (a cheap pre-pass); None for an empty chunk. A chunk that is
        the whole tensor counts every key instead and names the one bucket that holds the rank."""
        if self.numel == numel:
            high = self.high_histogram()
            return {name: (locate(high, rank)[0], 1) if self.numel else None for name, rank in ranks.items()}
        step = SAMPLE_STEP if self.numel >= MIN_SAMPLED else 1
        sample = kernels.key_histogram(self._base, self._x, self._mode, step)
        return {name: local_estimate(sample, rank, numel, self.numel, step) for name, rank in ranks.items()}

    def tie_rows(self, rows: int, key: int) -> torch.Tensor:
        """Per row of the chunk's ``rows`` rows: how many of its keys equal ``key`` (int64)."""
        return torch.from_numpy(kernels.row_key_counts(self._base, self._x, self._mode, rows, key))

    def high_histogram(self) -> torch.Tensor:
        """Counts of the high 16 bits (int64, ``HIGH_BINS`` long)."""
        return kernels.key_histogram(self._base, self._x, self._mode)

    def low_histogram(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Round 1 partial, sparse: the distinct low 16 bits among keys in ``bucket`` and their counts."""
        lo = bucket << 16
        return kernels.histogram_and_windows(self._base, self._x, self._mode, [(lo, lo + LOW_BINS)])[1][0]


def _countable(windows: dict[K, tuple[int, int] | None]) -> dict[K, tuple[int, int] | None]:
    """The windows with one too wide to count densely emptied (its chunk resolves nothing)."""
    return {name: (w[0], 0) if w is not None and w[1] > MAX_WINDOW_BUCKETS else w for name, w in windows.items()}


def _key_range(window: tuple[int, int]) -> tuple[int, int]:
    """The key range ``[lo, hi)`` of a window's buckets."""
    return window[0] << 16, (window[0] + window[1]) << 16


def _key_ranges(windows: dict[K, tuple[int, int] | None]) -> list[tuple[int, int]]:
    """The key range of each window (``(0, 0)`` for none)."""
    return [_key_range(w) if w else (0, 0) for w in windows.values()]


# A chunk's round-0 window (first bucket, bucket count; None for an empty chunk) and the
# distinct low bits (relative to the first bucket's start) of its keys inside, with counts.
Speculation = tuple[tuple[int, int] | None, torch.Tensor, torch.Tensor]


def local_estimate(high: torch.Tensor, rank: int, numel: int, chunk_numel: int, step: int = 1,
                   ) -> tuple[int, int] | None:
    """Buckets ``(first, count)`` where this chunk expects the global ``rank``-th largest key.

    ``high`` counts a sample of about one in ``step`` keys of the chunk. Chunks of one tensor are alike, so the
    chunk's share of the rank, give or take four binomial standard deviations (across
    chunks, and of the sample), and one bucket on each side, brackets where the global k-th
    largest key falls in it. Shipping the low bits of those buckets lets round 0 finish the
    selection and saves a second read of the tensor; round 1 remains the fallback.
    """
    total = int(high.sum())
    if total == 0:
        return None
    share = rank * total / numel  # the expected rank within the sample
    # Binomial variances: the chunk's count above the global threshold (finite population),
    # then the sample's; each carries (1 - q), q the kept fraction, which matters at high densities.
    kept = min(1.0, rank / max(numel, 1))
    variance = share * (1.0 - kept) * ((1.0 - chunk_numel / max(numel, 1)) / step + (1.0 if step > 1 else 0.0))
    spread = 4.0 * math.sqrt(max(variance, 1.0)) + 1.0
    top, _ = locate(high, min(total, max(1, math.floor(share - spread))))
    bottom, _ = locate(high, min(total, max(1, math.ceil(share + spread))))
    first = max(0, bottom - 1)
    return first, min(top + 1, HIGH_BINS - 1) - first + 1


# A chunk's speculative window (as in Speculation), how many of its keys lie above the window,
# and the distinct low bits (relative to the window's first bucket) of its keys inside, with counts.
WindowCount = tuple[tuple[int, int] | None, int, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Resolved:
    """The exact ``rank``-th largest key of a tensor, from the chunks' speculative windows."""

    key: int
    above: int  # keys of the whole tensor strictly above ``key``
    tied: tuple[int, ...]  # per chunk, in chunk order: its keys equal to ``key``


def resolve_windows(parts: Sequence[WindowCount], rank: int) -> Resolved | None:
    """The exact ``rank``-th largest key from every chunk's window and count above it, or None
    when the windows do not show it (then the radix rounds decide).

    Inside the range every chunk's window covers, each chunk's count of keys at or above a key
    is its count above its window plus its window's keys from there up; summed over chunks,
    that ranks every key of the range exactly. The answer is exact, or None: never a guess.
    """
    spans = [_key_range(w) for w, _, _, _ in parts if w is not None]
    if not spans:
        return None
    lo, hi = max(a for a, _ in spans), min(b for _, b in spans)
    if lo >= hi:
        return None
    at_or_above_hi = 0
    keys, counts = [], []
    for window, above, values, n in parts:
        if window is None:
            continue
        absolute = values.to(torch.int64) + (window[0] << 16)
        at_or_above_hi += above + int(n[absolute >= hi].sum())
        inside = (absolute >= lo) & (absolute < hi)
        keys.append(absolute[inside])
        counts.append(n[inside])
    distinct, inverse = torch.unique(torch.cat(keys), return_inverse=True)
    sums = torch.zeros(distinct.numel(), dtype=torch.int64).index_add_(0, inverse, torch.cat(counts))
    if not at_or_above_hi < rank <= at_or_above_hi + int(sums.sum()):
        return None  # the threshold lies outside the range every window covers
    descending = at_or_above_hi + torch.flip(sums, dims=[0]).cumsum(0)
    i = int(torch.searchsorted(descending, torch.tensor([rank], dtype=descending.dtype)).item())
    j = distinct.numel() - 1 - i
    key = int(distinct[j])
    tied = []
    for window, _, values, n in parts:
        hit = (values.to(torch.int64) + (window[0] << 16) == key) if window is not None else None
        tied.append(int(n[hit].sum()) if hit is not None else 0)
    return Resolved(key, int(descending[i]) - int(sums[j]), tuple(tied))


def speculative_low(parts: Sequence[Speculation], bucket: int) -> torch.Tensor | None:
    """Dense low-bits histogram of ``bucket`` from round 0's speculative ranges, or None when
    some chunk did not ship that bucket (then round 1 reads the tensor again)."""
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
    return low


def resolve_speculative(parts: Sequence[Speculation], bucket: int,
                        residual: int) -> int | None:
    """Exact low bits in ``bucket`` from round 0's speculative ranges, or None (see
    :func:`speculative_low`)."""
    low = speculative_low(parts, bucket)
    return None if low is None else locate(low, residual)[0]


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


def dense_to_sparse(hist: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense digit count as chunks ship it: the digits that occur (int64, ascending) and their
    counts; :func:`dense_low` or ``torch.index_add`` undo it on the driver."""
    values = np.flatnonzero(hist)
    return torch.from_numpy(values.astype(np.int64)), torch.from_numpy(hist[values])


def dense_low(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Dense low-bits histogram of one bucket from the chunks' sparse parts."""
    out = torch.zeros(LOW_BINS, dtype=torch.int64)
    for values, counts in parts:
        if values.numel():
            out.index_add_(0, values.to(torch.int64), counts)
    return out

