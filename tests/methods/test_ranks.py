"""The radix-sort ranks kernel equals torch's stable argsort, and DELLA's keep rule is unchanged.

:mod:`distmerge.methods.kernels.ranks` replaced a per-row ``torch.argsort(stable=True)`` and a
scatter of the positions; the merged bytes must not change. So the kernel's ranks are compared
with the argsort-derived ranks (ties by position, signed zeros, denormals, NaN and inf, 1-row,
1-column and 3-D blocks), and DELLA's probabilities and keep mask with the torch implementation
they replaced (kept here, verbatim, as the reference), bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmerge.methods import kernels
from distmerge.methods.base import ShardContext
from distmerge.methods.kernels import radix_ranks
from distmerge.methods.random_stream import stream_key
from distmerge.methods.sparsification.della import DellaSampling, della_probabilities
from tests.methods.keep_stream_reference import della_uniforms


def old_della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """The torch implementation before the kernel (the reference)."""
    shape = delta.shape
    x = delta.reshape(1, -1) if delta.dim() < 2 else delta
    mags = x.abs().to(torch.float32)
    n = x.shape[1]
    if n < 2:
        rank_norm = torch.full(mags.shape, 0.5, dtype=torch.float32)
    else:
        order = torch.argsort(mags, dim=1, stable=True)
        steps = torch.arange(n, dtype=torch.float32).reshape((1, n) + (1,) * (x.dim() - 2)).expand(order.shape)
        ranks = torch.empty(mags.shape, dtype=torch.float32).scatter_(1, order, steps.contiguous())
        rank_norm = (ranks / float(n - 1)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs.reshape(shape)


def old_della_mask(probs: torch.Tensor, seed: int, tensor: str, model: int, start: int) -> torch.Tensor:
    u = torch.from_numpy(della_uniforms(seed, tensor, model, start, probs.numel())).reshape(probs.shape)
    return u < probs.to(torch.float64)


def argsort_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ranks of ``|values|`` along dim 1 from torch's stable argsort (1-D: one row)."""
    x = values.reshape(1, -1) if values.dim() < 2 else values
    mags = x.abs().to(torch.float32)
    order = torch.argsort(mags, dim=1, stable=True)
    n = x.shape[1]
    steps = torch.arange(n).reshape((1, n) + (1,) * (x.dim() - 2)).expand(order.shape).contiguous()
    return torch.empty(order.shape, dtype=torch.int64).scatter_(1, order, steps).reshape(values.shape)


def kernel_ranks(values: torch.Tensor) -> torch.Tensor:
    flat = kernels.as_array(values, torch.float32)
    return torch.from_numpy(kernels.magnitude_ranks(flat, tuple(values.shape))).reshape(values.shape)


def tied(shape: tuple[int, ...], seed: int, levels: int = 7) -> torch.Tensor:
    """Values with many exact ties: a few magnitude levels, random signs, zeros of both signs."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, levels, shape, generator=g).to(torch.float32) * 0.25
    v = v * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)  # includes -0.0
    return v


def weights_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deltas of bfloat16 weights: heavily quantized, many ties, a range of exponents."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g) * 0.02
    x = b + torch.randn(shape, generator=g) * 0.002
    return x.to(torch.bfloat16).float() - b.to(torch.bfloat16).float()


SHAPES = [(1, 1), (1, 2), (1, 257), (257, 1), (5, 3), (9, 300), (4, 2049), (3, 50, 4), (2, 7, 3, 5), (1000,), (1,)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ranks_equal_stable_argsort(shape):
    for seed, make in enumerate((tied, weights_like)):
        values = make(shape, seed)
        assert torch.equal(kernel_ranks(values), argsort_ranks(values))
    g = torch.Generator().manual_seed(11)
    values = torch.randn(shape, generator=g)
    assert torch.equal(kernel_ranks(values), argsort_ranks(values))


def test_ranks_of_special_values():
    tiny = torch.finfo(torch.float32).tiny
    specials = torch.tensor([0.0, -0.0, tiny / 2, -tiny / 2, tiny / 4, 1e-45, -1e-45, tiny, -tiny, 1.0, -1.0,
                             float("inf"), float("-inf"), 3.0e38, 0.0, -0.0, tiny / 2], dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    row = specials[torch.randint(0, specials.numel(), (4, 500), generator=g)]
    assert torch.equal(kernel_ranks(row), argsort_ranks(row))
    # NaNs of any sign and payload sort last, as equals (torch's sort), in position order
    nans = torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], dtype=torch.int64).to(torch.int32)
    row = row.clone()
    row.view(torch.int32)[:, ::9] = nans[torch.randint(0, 4, row[:, ::9].shape, generator=g)]
    assert torch.equal(kernel_ranks(row), argsort_ranks(row))


@pytest.mark.parametrize("n", [2, 3, 255, 256, 2048, 2049, 5632, 70_000])
def test_ranks_of_every_digit_width(n):
    """Rows whose keys vary in 1 .. 31 bits: every pass count, digit width and skipped pass."""
    g = torch.Generator().manual_seed(n)
    bits = torch.randint(0, 2**31 - 2**23, (1, n), generator=g, dtype=torch.int64)
    for keep in (0x1, 0x3, 0x7FF, 0x800, 0xFFF, 0x3FF800, 0x7F800000, 0x7FFFFFFF, 0x7F8007FF):
        values = (bits & keep).to(torch.int32).view(torch.float32)
        assert torch.equal(kernel_ranks(values), argsort_ranks(values)), hex(keep)


@pytest.mark.parametrize("n", [2, 5, 2048, 5632])
def test_ranks_of_zeros_and_a_narrow_range(n):
    """Keys rewritten as offsets from the smallest nonzero key (``_offset_keys``): exact zeros
    beside nonzero magnitudes whose keys span ``steps`` multiples of ``2**lo`` (every span
    around a power of two, where the offsets' width and pass count change), with and
    without zeros, ties, and infinities and NaNs, which make the span too wide to offset."""
    g = torch.Generator().manual_seed(n)
    for lo in (0, 3, 16):
        for steps in (1, 2, 3, 15, 16, 17, 255, 256, 1023, 1024, 1025, 2047, 2048, 2049, 40000):
            start = 0x3A000000 + (0x5 << lo)
            bits = start + (torch.randint(0, steps + 1, (3, n), generator=g, dtype=torch.int64) << lo)
            bits[:, 0] = start  # the smallest nonzero key is in every row
            for zeros in (0.0, 0.3, 0.9):
                row = bits.clone()
                row[torch.rand(row.shape, generator=g) < zeros] = 0
                values = row.to(torch.int32).view(torch.float32)
                values = torch.where(torch.rand(values.shape, generator=g) < 0.5, -values, values)
                assert torch.equal(kernel_ranks(values), argsort_ranks(values)), (lo, steps, zeros)
            specials = values.clone()
            specials[:, 1::7] = float("inf")
            specials[:, 3::11] = float("nan")
            assert torch.equal(kernel_ranks(specials), argsort_ranks(specials)), (lo, steps)


ROW_KINDS = {  # keys varying in this many low bits (with the offsets: one, two or three passes)
    "one pass": 9, "two passes": 19, "three passes": 31, "one key": 0, "zeros and offsets": -1}


def row_of(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "zeros and offsets":  # bfloat16 deltas: zeros beside a narrow range of nonzero keys
        bits = 0x3A000000 + (torch.randint(0, 1500, (n,), generator=g, dtype=torch.int64) << 16)
        bits[torch.rand(n, generator=g) < 0.3] = 0
    else:
        width = ROW_KINDS[kind]
        bits = torch.randint(0, 2**width, (n,), generator=g, dtype=torch.int64) if width else torch.full((n,), 77)
        bits = bits & 0x7F7FFFFF  # no infinities or NaNs here
    return bits.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("n", [1, 2, 300, 2048, 5632])
def test_rows_ranked_in_pairs(n):
    """Contiguous rows are ranked two at a time (``_rank_pair``): side by side where both take
    the same one or two passes, each alone otherwise. Every ordered pair of row kinds, and an odd
    row left over, in the ranks kernel and in DELLA's keep rule (float32 and bfloat16 deltas)."""
    g = torch.Generator().manual_seed(n)
    kinds = list(ROW_KINDS)
    order = [k for a in kinds for b in kinds for k in (a, b)] + [kinds[1]]
    values = torch.stack([row_of(kind, n, g) for kind in order])
    values = torch.where(torch.rand(values.shape, generator=g) < 0.5, -values, values)
    assert torch.equal(kernel_ranks(values), argsort_ranks(values))
    rows = values.shape[0]
    c = ShardContext("t.weight", (rows, n), 0, rows, seed=9, expert_ids=(4,))
    for x in (values, values.to(torch.bfloat16)):  # deltas against a zero base
        terms, probs = DellaSampling().kernel_keep(0, x, torch.zeros_like(x), {"density": 0.5, "epsilon": 0.15}, c, None)
        want_probs = old_della_probabilities(x, 0.5, 0.15)
        assert torch.equal(probs.view(torch.int32), want_probs.view(torch.int32))
        want_mask = old_della_mask(want_probs, c.seed, c.tensor, 4, 0)
        assert np.array_equal(terms.mask, want_mask.reshape(-1).numpy())


CASES = [(0.5, 0.15), (0.3, 0.1), (0.9, 0.05)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_della_probabilities_bit_identical_to_torch(shape):
    for i, (density, epsilon) in enumerate(CASES):
        for delta in (tied(shape, i), weights_like(shape, i), torch.randn(shape, dtype=torch.float64)):
            want = old_della_probabilities(delta, density, epsilon)
            got = della_probabilities(delta, density, epsilon)
            assert got.dtype == want.dtype == torch.float32
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (64, 1), (9, 300), (3, 50, 4), (2, 7, 3, 5)], ids=str)
def test_della_kernel_keep_bit_identical_to_torch(shape, dtype):
    """The fused keep rule (merge and L1 round) equals the old ``keep``: mask and probabilities."""
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    x = (base.double() + torch.randn(shape, generator=g, dtype=torch.float64) * 0.002).to(dtype)
    x.reshape(-1)[::5] = base.reshape(-1)[::5]  # exact zeros and ties
    rows = shape[0]
    # a block of rows starting inside the tensor: the draws are positioned by element
    c = ShardContext("t.weight", (rows + 3, *shape[1:]), 3, rows + 3, seed=9, expert_ids=(4, 7))
    sparsifier = DellaSampling()
    for e, (density, epsilon) in enumerate(CASES[:2]):
        p = {"density": density, "epsilon": epsilon}
        terms, probs = sparsifier.kernel_keep(e, x, base, p, c, None)
        want_probs = old_della_probabilities(x - base, density, epsilon)
        want_mask = old_della_mask(want_probs, c.seed, c.tensor, c.expert_ids[e], c.element_start)
        assert isinstance(probs, torch.Tensor)
        assert torch.equal(probs.view(torch.int32), want_probs.view(torch.int32))
        assert terms.mask is not None
        assert np.array_equal(terms.mask, want_mask.reshape(-1).numpy())


def test_della_keep_draws_follow_the_element_position():
    """Each slab's draws start at its own element: the same mask whatever the row block."""
    shape = (12, 33)
    g = torch.Generator().manual_seed(1)
    base, x = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    key = stream_key(2, "t", 0)
    table = torch.linspace(0.2, 0.8, shape[1]).numpy()
    whole, _ = kernels.della_keep(*kernels.delta_arrays(base, x), shape, table, key, 0)
    parts = [kernels.della_keep(*kernels.delta_arrays(base[a:b], x[a:b]), (b - a, shape[1]), table, key, a * shape[1])[0]
             for a, b in ((0, 5), (5, 6), (6, 12))]
    assert np.array_equal(whole, np.concatenate(parts))


def coarse_rows(rows: int, n: int, odd: int, g: torch.Generator, *, zeros: bool, odd_spread: int,
                odd_first: bool = True) -> torch.Tensor:
    """Keys as deltas of bfloat16 weights taken in float32 give them: ~1500 values of the high
    16 bits over a few exponents, low bits 0, except ``odd`` keys per row whose low bits are
    set (``odd_spread`` distinct low parts, one of them a NaN where 3; 0: every odd key the
    same), among the row's first keys or its last."""
    high = 0x3A000000 + (torch.randint(0, 1500, (rows, n), generator=g, dtype=torch.int64) << 16)
    if zeros:
        high[torch.rand(high.shape, generator=g) < 0.2] = 0
    at = torch.arange(odd) if odd_first else torch.arange(n - odd, n)
    for r in range(rows):
        places = at if r % 2 else torch.randperm(n, generator=g)[:odd]
        if odd_spread:
            low = torch.randint(1, 1 + odd_spread, (odd,), generator=g, dtype=torch.int64)
        else:
            low = torch.full((odd,), 0x1234, dtype=torch.int64)
        high[r, places] = (high[r, places] | low) if odd_spread else (0x3A100000 | low)
        if odd > 2 and odd_spread == 3:
            high[r, places[1]] = 0x7FC00000  # a NaN: the largest key, too far above the rest
    values = high.to(torch.int32).view(torch.float32)
    return torch.where(torch.rand(values.shape, generator=g) < 0.5, -values, values)


@pytest.mark.parametrize("n", [300, 2048, 5632])
def test_ranks_of_keys_placed_by_their_high_bits(n):
    """``_coarse_rank``: keys with low bits set are few, ranked apart and given the places their
    high bits' buckets leave. Every count of such keys around the ways they are ordered (one,
    insertion up to ``SHORT``, radix passes beyond, all the same key) and around the share
    where the row goes back to the radix passes (``n / ODD_SHARE``: found by the first keys,
    or only by the whole row when they sit at its end), with and without zeros, in pairs of
    rows and in strided (3-D) blocks."""
    g = torch.Generator().manual_seed(n)
    limit = n // radix_ranks.ODD_SHARE
    for odd in sorted({1, 2, 3, radix_ranks.SHORT, radix_ranks.SHORT + 1, limit - 1, limit, limit + 1, 2 * limit}):
        for zeros in (False, True):
            for spread in (0, 3, 0xFFFF):
                for odd_first in (True, False):
                    values = coarse_rows(5, n, odd, g, zeros=zeros, odd_spread=spread, odd_first=odd_first)
                    assert torch.equal(kernel_ranks(values), argsort_ranks(values)), (odd, zeros, spread)
                    block = values[:4].reshape(2, 2, n).transpose(1, 2).contiguous()  # rows strided by 2
                    assert torch.equal(kernel_ranks(block), argsort_ranks(block)), (odd, zeros, spread)
