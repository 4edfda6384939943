"""RAM's and RAM+'s fused loops give the bits (and counts) of their torch formulation.

The torch formulation (``ram.reference_merge`` / ``reference_counts``: mergekit 0.1.5's
expressions) is what the loops replaced and what float16 still runs; it is itself checked
against mergekit 0.1.5 (``test_methods_mergekit_015``, ``tests/compat``). Here the loops must
give the same bits for every compute dtype with a loop, 1 to 3 models, across block edges, with
task vectors that are exactly zero (signed zeros), at epsilon (bfloat16 compares with epsilon
rounded to it), just above it, and shared by several models or unique to one.
"""

from __future__ import annotations

import pytest
import torch

from distmerge.methods.ram import fused_counts, fused_merge, reference_counts, reference_merge
from tests.methods.test_kernels import same_bits

SIZES = [1, 7, 2048, 2049, 5000]


def inputs(size: int, k: int, dtype: torch.dtype, epsilon: float, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=g, dtype=torch.float64).to(dtype)
    xs = []
    for _ in range(k):
        delta = torch.randn(size, generator=g, dtype=torch.float64) * 1e-3
        pick = torch.randint(0, 5, (size,), generator=g)
        delta[pick == 0] = 0.0  # no change: a zero task vector
        delta[pick == 1] = epsilon * torch.sign(delta[pick == 1])  # at epsilon
        delta[pick == 2] *= 1e-3  # below epsilon
        xs.append((base.to(torch.float64) + delta).to(dtype))
    return base, xs


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_fused_ram_equals_torch(dtype: torch.dtype, size: int, k: int) -> None:
    for epsilon in (1e-5, 1e-3):
        base, xs = inputs(size, k, dtype, epsilon)
        want = reference_merge(base, xs, epsilon, None)
        got = fused_merge(base, xs, epsilon, None)
        assert got.dtype == want.dtype and same_bits(got, want), epsilon
        counts, want_counts = fused_counts(base, xs, epsilon), reference_counts(base, xs, epsilon)
        assert (counts.shared, counts.unique) == (want_counts.shared, want_counts.unique)
        assert counts.inputs_finite  # finite rows: the round proves it
        n = base.numel()
        assert all(0 <= s + u <= n for s, u in zip(counts.shared, counts.unique, strict=True))
        lambda_ = 1 + 0.1 * torch.tensor([0.05, 0.2, 0.13][:k], dtype=torch.float32)
        want = reference_merge(base, xs, epsilon, lambda_)
        got = fused_merge(base, xs, epsilon, lambda_)
        assert got.dtype == want.dtype and same_bits(got, want), ("ramplus_tl", epsilon)


@pytest.mark.parametrize("where", [0, 2047, 2048, 4999])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_fused_counts_prove_finite_rows_only(dtype: torch.dtype, value: float, where: int) -> None:
    """A NaN or Inf in the base or in any model, at a block's edge or inside one, leaves the
    chunk unproven (the engine then scans it) with the counts torch gives; so does a finite
    difference too large for the compute dtype (it rounds to Inf)."""
    for source in range(3):
        base, xs = inputs(5000, 2, dtype, 1e-5)
        rows = [base.clone(), *(x.clone() for x in xs)]
        rows[source][where] = value
        got, want = fused_counts(rows[0], rows[1:], 1e-5), reference_counts(rows[0], rows[1:], 1e-5)
        assert not got.inputs_finite, (source, where)
        assert (got.shared, got.unique) == (want.shared, want.unique)
    big = torch.finfo(dtype).max
    base, xs = inputs(5000, 2, dtype, 1e-5)
    base[where], xs[1][where] = -big, torch.tensor(big, dtype=dtype)
    assert not fused_counts(base, xs, 1e-5).inputs_finite
