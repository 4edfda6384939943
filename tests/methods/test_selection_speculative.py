"""Round 0's speculative low-bit ranges: exact when they cover the global bucket, and a
clean fallback to round 1 when chunks differ so much that they do not."""

from __future__ import annotations

import torch

from distmerge.methods import selection


def _chunks_round0(chunks: list[torch.Tensor], rank: int):
    numel = sum(c.numel() for c in chunks)
    parts, highs = [], []
    for c in chunks:
        keys = selection.DeltaKeys(torch.zeros_like(c), c)
        high, speculated = keys.round_zero({"low": rank}, numel)
        assert torch.equal(high, keys.high_histogram())  # the fused pass counts every key
        parts.append(speculated["low"])
        highs.append(high)
    return parts, selection.sum_histograms(highs)


def _exact_kth(x: torch.Tensor, rank: int) -> int:
    top = torch.topk(x.reshape(-1).abs().float(), rank).values[-1]
    return int(top.view(torch.int32))


def test_alike_chunks_resolve_in_round_zero():
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(50_000, generator=g) * 0.01 for _ in range(4)]
    whole = torch.cat(chunks)
    # Densities people use (10% .. 90% kept) put the threshold where alike chunks agree.
    for rank in (20_000, 100_000, 180_000):
        parts, hist = _chunks_round0(chunks, rank)
        bucket, residual = selection.locate(hist, rank)
        low = selection.resolve_speculative(parts, bucket, residual)
        assert low is not None
        assert (bucket << 16) | low == _exact_kth(whole, rank)
    # In the extreme tail the estimates may miss; whatever resolves is still exact.
    for rank in (1, 17):
        parts, hist = _chunks_round0(chunks, rank)
        bucket, residual = selection.locate(hist, rank)
        low = selection.resolve_speculative(parts, bucket, residual)
        assert low is None or (bucket << 16) | low == _exact_kth(whole, rank)


def test_unlike_chunks_fall_back_to_round_one_exactly():
    g = torch.Generator().manual_seed(4)
    chunks = [torch.randn(20_000, generator=g) * 1e-4, torch.randn(20_000, generator=g) * 10.0]
    whole = torch.cat(chunks)
    rank = 20_000
    parts, hist = _chunks_round0(chunks, rank)
    bucket, residual = selection.locate(hist, rank)
    assert selection.resolve_speculative(parts, bucket, residual) is None
    low_parts = [selection.DeltaKeys(torch.zeros_like(c), c).low_histogram(bucket) for c in chunks]
    low, _ = selection.locate(selection.dense_low(low_parts), residual)
    assert (bucket << 16) | low == _exact_kth(whole, rank)
