"""The speculative round's windows and round 0's speculative low-bit ranges: exact when they
cover the global threshold, and a clean fallback to the radix rounds when chunks differ so much
that they do not."""

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


def _speculate(chunks: list[torch.Tensor], rank: int):
    numel = sum(c.numel() for c in chunks)
    return [selection.DeltaKeys(torch.zeros_like(c), c).speculate({"low": rank}, numel)["low"] for c in chunks]


def _tied(chunks: list[torch.Tensor], key: int) -> tuple[int, ...]:
    return tuple(int((c.reshape(-1).abs().float().view(torch.int32) == key).sum()) for c in chunks)


def test_speculative_windows_give_the_exact_threshold_and_its_ties():
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):  # bfloat16 values: thousands of ties per key
        chunks = [(torch.randn(400_000, generator=g) * 0.01).to(dtype).float() for _ in range(5)]
        whole = torch.cat(chunks)
        for rank in (200_000, 1_000_000, 1_800_000):  # 10%, 50%, 90% kept
            resolved = selection.resolve_windows(_speculate(chunks, rank), rank)
            assert resolved is not None, (dtype, rank)
            assert resolved.key == _exact_kth(whole, rank)
            keys = whole.abs().view(torch.int32)
            assert resolved.above == int((keys > resolved.key).sum())
            assert resolved.tied == _tied(chunks, resolved.key)
            assert resolved.above < rank <= resolved.above + sum(resolved.tied)


def test_speculative_windows_never_guess():
    """Chunks unlike each other (or windows too wide to count) give None, never a wrong key;
    whatever resolves, at any rank, is exact."""
    g = torch.Generator().manual_seed(7)
    unlike = [torch.randn(100_000, generator=g) * 1e-4, torch.randn(100_000, generator=g) * 10.0]
    assert selection.resolve_windows(_speculate(unlike, 100_000), 100_000) is None
    small = [c[:20_000] for c in unlike]  # small chunks ship every key: exact whatever they hold
    resolved = selection.resolve_windows(_speculate(small, 20_000), 20_000)
    assert resolved is not None and resolved.key == _exact_kth(torch.cat(small), 20_000)
    chunks = [torch.randn(3000, generator=g) * 0.01 for _ in range(3)]
    whole = torch.cat(chunks)
    resolved_any = False
    for rank in (1, 2, 17, 900, 4500, 8999, 9000):
        resolved = selection.resolve_windows(_speculate(chunks, rank), rank)
        if resolved is not None:
            resolved_any = True
            assert resolved.key == _exact_kth(whole, rank), rank
    assert resolved_any


def test_a_small_last_chunk_ships_every_key():
    """A tensor's last rows make a small chunk whose own estimate is noisy and may be unlike
    the others; it ships all its keys, so the threshold still resolves in the speculative round."""
    g = torch.Generator().manual_seed(8)
    chunks = [(torch.randn(400_000, generator=g) * 0.01).to(torch.bfloat16).float() for _ in range(3)]
    chunks.append((torch.randn(15_000, generator=g) * 0.002).to(torch.bfloat16).float())  # unlike the rest
    whole = torch.cat(chunks)
    for rank in (120_000, 600_000, 1_000_000):
        parts = _speculate(chunks, rank)
        assert parts[-1][0] == selection.EVERY_BUCKET and parts[-1][1] == 0
        assert int(parts[-1][3].sum()) == 15_000
        resolved = selection.resolve_windows(parts, rank)
        assert resolved is not None and resolved.key == _exact_kth(whole, rank)
        assert resolved.tied == _tied(chunks, resolved.key)
