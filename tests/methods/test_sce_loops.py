"""SCE's fused loops (float32 compute) give, bit for bit, what its torch formulation gives: every
round's partials reduced, and every merged row, under any chunking and sharding, with the
selection off, empty, splitting ties and keeping them, on smooth, tied and awkward task
vectors (zeros, -0.0, infinities, rows where the experts disagree in sign)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distmerge.methods import sce
from tests.methods.test_kernels import same_values
from tests.methods.test_methods_catalogue import (
    merge_sharded,
    params_for,
    reductions,
    torch_and_fused,
)


def sce_inputs(kind, shape, n, seed):
    """float32 base and ``n`` experts; ``tied``: task vectors on a coarse grid (variances repeat,
    so the selection cuts through ties); ``awkward``: that, plus zeros, -0.0 and sign flips;
    ``infinite``: that, plus infinities (the weights, and so every merged row, become NaN)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if kind == "smooth":
        return base, [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]
    xs = [base + torch.randint(-3, 4, shape, generator=g).float() / 64 for _ in range(n)]
    if kind in ("awkward", "infinite"):
        flat = [x.view(-1) for x in xs]
        flat[0][::7] = base.view(-1)[::7]  # a zero task vector
        flat[-1][1::11] = -flat[-1][1::11]  # experts disagree in sign
        base.view(-1)[2::13] = 0.0
        flat[0][2::13] = -0.0  # a -0.0 task vector
        base.view(-1)[3::17] = -0.0  # every expert's task vector negative, equal (variance 0):
        for f in flat:  # dropped by any selection, tv * 0 = -0.0, and torch's sums of those are +0.0
            f[3::17] = -1 / 64
    if kind == "infinite":
        flat[-1][3] = float("inf")
        flat[0][min(5, flat[0].numel() - 1)] = -float("inf")
    return base, xs


def same_reductions(a, b) -> bool:
    """Equal reductions; NaN weights (an infinite task vector's) equal NaN."""
    wa, wb = a.weights, b.weights
    if (wa is None) != (wb is None):
        return False
    if wa is not None and not (torch.equal(torch.isnan(wa), torch.isnan(wb))
                               and torch.equal(torch.nan_to_num(wa), torch.nan_to_num(wb))):
        return False
    return same_values(dataclasses.replace(a, weights=None), dataclasses.replace(b, weights=None))


def assert_same_bits(a, b):
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@pytest.mark.parametrize("gathered", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("topk", [1.0, 0.0, 0.37, 0.004])
@pytest.mark.parametrize("kind", ["smooth", "tied", "awkward", "infinite"])
def test_fused_sce_is_the_torch_formulation(kind, topk, n, gathered, monkeypatch):
    """Both selections: the variances gathered (the tensor's own), and the radix rounds of a
    tensor above the gather bound (lowered to none here)."""
    if not gathered:
        monkeypatch.setattr(sce, "TOPK_GATHER_MAX_ELEMENTS", 0)
    for shape in ((37, 19), (6,), (3, 5, 4)):
        base, xs = sce_inputs(kind, shape, n, seed=n + shape[0])
        params = params_for("sce", n, {"select_topk": topk})
        rows = shape[0]
        for chunk_rows in (1, 7, rows):
            (r_torch, m_torch), (r_fused, m_fused) = torch_and_fused(sce, "sce", base, xs, params, chunk_rows,
                                                                     (3, rows), monkeypatch)
            assert same_reductions(r_torch, r_fused), (shape, chunk_rows)
            for a, b in zip(m_torch, m_fused, strict=True):
                assert_same_bits(a, b)


def test_the_cases_reach_every_selection_path(monkeypatch):
    """The parametrized cases above are not vacuous: the tied inputs split ties at the
    threshold (``tie_kept``), the smooth ones keep some elements and drop others, the awkward
    ones merge to finite rows other than the base, and the infinite ones to NaN."""
    base, xs = sce_inputs("tied", (37, 19), 2, seed=39)
    reduced = reductions("sce", base, xs, params_for("sce", 2, {"select_topk": 0.37}), chunk_rows=7)
    assert reduced.tie_kept is not None and reduced.tie_kept.numel() > 0
    base, xs = sce_inputs("smooth", (37, 19), 3, seed=40)
    params = params_for("sce", 3, {"select_topk": 0.37})
    reduced = reductions("sce", base, xs, params, chunk_rows=7)
    assert reduced.tie_kept is None and 0 < reduced.k < base.numel()
    merged = merge_sharded("sce", base, xs, params, reduced, 37)
    moved = merged != base
    assert 0 < int(moved.sum()) < base.numel()
    base, xs = sce_inputs("awkward", (37, 19), 2, seed=39)
    params = params_for("sce", 2, {"select_topk": 1.0})
    merged = merge_sharded("sce", base, xs, params, reductions("sce", base, xs, params, chunk_rows=7), 37)
    assert torch.isfinite(merged).all() and (merged != base).any()
    base, xs = sce_inputs("infinite", (37, 19), 2, seed=39)
    merged = merge_sharded("sce", base, xs, params, reductions("sce", base, xs, params, chunk_rows=7), 37)
    assert torch.isnan(merged).all()


def test_five_experts_are_fused_except_on_a_lone_element():
    """torch's sum over a stack of five or more models is not left to right in the tensor's
    tail; the fused loops follow it (``stack_order``, tested against torch and the torch
    formulation in test_stack_sums.py). A one-element tensor's stack torch sums by another
    kernel, so with five experts or more it keeps the torch formulation."""
    from tests.methods.test_methods_catalogue import ctx

    base, xs = sce_inputs("smooth", (4, 7), 5, seed=1)
    assert sce._fused(base, xs, ctx((4, 7), 0, 4, 0, 5))
    assert not sce._fused(base[:1, :1], [x[:1, :1] for x in xs], ctx((1, 1), 0, 1, 0, 5))
    assert sce._fused(base[:1, :1], [x[:1, :1] for x in xs[:4]], ctx((1, 1), 0, 1, 0, 4))
    g = torch.Generator().manual_seed(0)  # why it matters: five rows of mixed magnitudes
    stacked = torch.randn(5, 1000, generator=g) * torch.logspace(-3, 3, 5).reshape(5, 1)
    four = stacked[:4].sum(dim=0)
    assert torch.equal(four, stacked[0] + stacked[1] + stacked[2] + stacked[3])
    assert not torch.equal(stacked.sum(dim=0), four + stacked[4])


def test_a_sum_of_negative_zeros_is_positive_zero(monkeypatch):
    """An element every expert moves by the same negative step has variance 0, is dropped by any
    selection, and its kept task vectors are -0.0: torch sums them to +0.0, so a -0.0 base
    merges to +0.0 (mergekit's output), in the fused loops too."""
    base = torch.tensor([[-0.0, 1.0, 2.0, 3.0]])
    xs = [torch.tensor([[-1.0, 2.0, 2.5, 3.0]])]
    params = params_for("sce", 1, {"select_topk": 0.5})
    (_, (want,)), (_, (got,)) = torch_and_fused(sce, "sce", base, xs, params, 1, (1,), monkeypatch)
    assert want[0, 0].item() == 0.0 and not torch.signbit(want[0, 0])
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
