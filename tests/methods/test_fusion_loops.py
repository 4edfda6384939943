"""arcee_fusion's fused loops (matrices, float32 compute) give, bit for bit, what its torch
formulation gives: the reduced quartile buckets, threshold and per-vector KL, and every merged
row, under any chunking and sharding, on exact quartiles and on sampled ones, for smooth,
tied and awkward rows (zeros, -0.0, sign flips, a large outlier)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distmerge.methods import arcee_fusion
from tests.methods.test_kernels import same_values
from tests.methods.test_methods_catalogue import (
    merge_sharded,
    params_for,
    reductions,
    torch_and_fused,
)


def fusion_inputs(kind, shape, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if kind == "smooth":
        return base, [base + 0.05 * torch.randn(shape, generator=g)]
    x = base + torch.randint(-3, 4, shape, generator=g).float() / 64
    if kind == "awkward":
        flat, b = x.view(-1), base.view(-1)
        flat[::7] = b[::7]  # no change
        b[2::13] = 0.0
        flat[2::13] = -0.0
        flat[1::11] = -flat[1::11]
        flat[4] = 1e4  # an outlier: one vector's softmax saturates
    return base, [x]


def same_reductions(a, b) -> bool:
    ka, kb = a.kl_vectors, b.kl_vectors
    if not (torch.equal(torch.isnan(ka), torch.isnan(kb)) and torch.equal(torch.nan_to_num(ka), torch.nan_to_num(kb))):
        return False
    return same_values(dataclasses.replace(a, kl_vectors=None), dataclasses.replace(b, kl_vectors=None))


@pytest.mark.parametrize("sampled", [False, True], ids=["exact", "sampled"])
@pytest.mark.parametrize("kind", ["smooth", "tied", "awkward"])
def test_fused_arcee_fusion_is_the_torch_formulation(kind, sampled, monkeypatch):
    if sampled:  # quartiles from a sample of 300 draws, as mergekit's above a million elements
        monkeypatch.setattr(arcee_fusion, "SAMPLE_SIZE", 300)
    params = params_for("arcee_fusion", 1)
    for shape in ((37, 19), (3, 5, 4), (64, 48)):
        base, xs = fusion_inputs(kind, shape, seed=shape[0])
        rows = shape[0]
        for chunk_rows in (1, 7, rows):
            (r_torch, m_torch), (r_fused, m_fused) = torch_and_fused(arcee_fusion, "arcee_fusion", base, xs, params,
                                                                     chunk_rows, (3, rows), monkeypatch)
            assert same_reductions(r_torch, r_fused), (shape, chunk_rows)
            for a, b in zip(m_torch, m_fused, strict=True):
                assert a.dtype == b.dtype == torch.float32
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (shape, chunk_rows)


def test_the_cases_take_some_changes_and_not_others(monkeypatch):
    """Not vacuous: the merge keeps some of the expert's changes and drops others, and the
    sampled rounds count fewer elements than the tensor holds."""
    base, xs = fusion_inputs("tied", (64, 48), seed=64)
    params = params_for("arcee_fusion", 1)
    merged = merge_sharded("arcee_fusion", base, xs, params, reductions("arcee_fusion", base, xs, params, chunk_rows=7), 64)
    changed = (xs[0] != base)
    taken = (merged == xs[0]) & changed
    assert 0 < int(taken.sum()) < int(changed.sum())
    monkeypatch.setattr(arcee_fusion, "SAMPLE_SIZE", 300)
    counted = []
    real = arcee_fusion.fusion_loops.fusion_counts

    def spy(*args):
        hist = real(*args)
        counted.append(int(hist.sum()))
        return hist

    monkeypatch.setattr(arcee_fusion.fusion_loops, "fusion_counts", spy)
    reductions("arcee_fusion", base, xs, params, chunk_rows=7)
    assert sum(counted[:10]) == 300  # round 0: the 300 draws, over the 10 chunks


def test_importances_at_the_threshold_are_kept(monkeypatch):
    """Where most importances are equal the quartiles coincide and the threshold is one of them:
    those elements are kept (``>=``), as in the torch formulation."""
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-100, 100, (1, 300), generator=g).float() / 64  # x - base exact
    x = base + 0.05 * torch.randn(1, 300, generator=g)
    x[0, :210] = base[0, :210] + 1 / 64
    params = params_for("arcee_fusion", 1)
    (r_torch, m_torch), (r_fused, m_fused) = torch_and_fused(arcee_fusion, "arcee_fusion", base, [x], params, 1, (1,),
                                                               monkeypatch)
    assert same_reductions(r_torch, r_fused)
    assert torch.equal(m_torch[0].view(torch.int32), m_fused[0].view(torch.int32))
    assert torch.equal(m_fused[0][0, :210], x[0, :210])  # the plateau, at the threshold, is taken


@pytest.mark.parametrize("numel", [1_000_001, 3 * 2**20, 50_000_000])
def test_a_chunks_sample_is_the_streams_draws_that_fall_in_it(numel):
    """The sample's positions in any element range, drawn once per tensor and sorted, are exactly
    (as a multiset) the stream's draws that fall there: the whole tensor, its first and last
    element, empty ranges, a drawn position as an edge on either side, arbitrary cuts."""
    import numpy as np

    from distmerge.methods.kernels import fusion_loops
    from distmerge.methods.random_stream import stream_key, uniforms

    draws = 200_000
    everything = np.minimum((uniforms(7, "t", -1, 0, draws) * numel).astype(np.int64), numel - 1)
    key = stream_key(7, "t", -1)
    drawn = int(everything[17])
    ranges = [(0, numel), (0, 1), (numel - 1, numel), (numel // 2, numel // 2), (drawn, drawn + 1), (drawn, numel),
              (0, drawn), (numel // 3, numel // 2 + 1), (12_345, 987_654)]
    for lo, hi in ranges:
        got = fusion_loops.sample_positions(key, draws, numel, lo, hi)
        want = everything[(everything >= lo) & (everything < hi)] - lo
        assert np.array_equal(got, np.sort(want)), (lo, hi)
    assert fusion_loops.sample_positions(key, draws, numel, drawn, drawn + 1).size == np.count_nonzero(everything == drawn)


def test_positions_sort_as_numpy_sorts_them():
    """The sample's bucket sort gives ``np.sort``'s array for any positions, not only evenly
    spread ones: empty, one, all equal, reversed, clustered in one bucket, one-element tensors."""
    import numpy as np

    from distmerge.methods.kernels import fusion_loops

    rng = np.random.default_rng(3)
    cases = [(np.zeros(0, dtype=np.int64), 5), (np.array([4]), 5), (np.zeros(1000, dtype=np.int64), 1),
             (np.arange(3000)[::-1].copy(), 3000), (np.full(500, 77), 10**9),
             (rng.integers(0, 9, 4000), 9), (rng.integers(10**6, 10**6 + 50, 3000), 2 * 10**6),
             (rng.integers(0, 2**40, 10**5), 2**40), (rng.integers(0, 1_000_003, 10**6), 1_000_003)]
    for positions, numel in cases:
        got = positions.astype(np.int64)
        fusion_loops._sort_positions(got, numel)
        assert np.array_equal(got, np.sort(positions)), (positions.size, numel)
