"""NearSwap's fused loop gives mergekit's torch expression bit for bit: float32 and float64
rows, bfloat16 rows as stored under float32 compute, awkward values (NaN, infinities, signed
zeros, differences at and around the 1e-6 clamp) and every kind of ``t``; shards of any rows
give the whole tensor's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmerge.methods import get_method
from distmerge.methods.base import TensorParams
from distmerge.methods.kernels.nearswap_loop import nearswap_blend
from distmerge.methods.kernels.rounding import stored_array
from distmerge.methods.nearswap import nearswap_reference
from tests.methods.test_methods_catalogue import ctx

INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}
TS = [0.05, 1e-7, 0.0, -0.0, 1.0, 2.5, -0.3, 1e-6, 3.0e-38, float("inf"), float("nan")]


def bitwise_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bits everywhere a value is a number (signed zeros included), NaN where NaN."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    keep = ~a.isnan()
    return torch.equal(a[keep].view(INT_OF[a.dtype]), b[keep].view(INT_OF[b.dtype]))


def awkward_rows(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and an expert whose differences sweep the clamp, with special values mixed in."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    scale = 10.0 ** torch.randint(-9, 1, (n,), generator=g, dtype=torch.float64)
    x = base + scale * torch.randn(n, generator=g, dtype=torch.float64)
    x[::7] = base[::7]  # equal: |base - x| = 0, clamped
    x[3::11] = base[3::11] + 1e-6  # at the clamp
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40],
                            dtype=torch.float64)
    pick = torch.randint(0, len(specials), (n // 13,), generator=g)
    where = torch.randperm(n, generator=g)[: n // 13]
    base[where[: n // 26]] = specials[pick[: n // 26]]
    x[where[n // 26:]] = specials[pick[n // 26:]]
    return base.to(dtype), x.to(dtype)


def fused(t: float, base: torch.Tensor, x: torch.Tensor, kind) -> torch.Tensor:
    out = np.empty(base.numel(), dtype=kind)
    nearswap_blend(stored_array(base), stored_array(x), kind(t), out)
    return torch.from_numpy(out)


@pytest.mark.parametrize(("seed", "t"), list(enumerate(TS)))
@pytest.mark.parametrize(("dtype", "kind"), [(torch.float32, np.float32), (torch.float64, np.float64)])
def test_fused_loop_is_the_torch_expression(seed, t, dtype, kind):
    base, x = awkward_rows(5003, dtype, seed=seed)
    assert bitwise_same(fused(t, base, x, kind), nearswap_reference(t, base, x))


@pytest.mark.parametrize("t", TS)
def test_bfloat16_rows_as_stored_are_the_cast_rows(t):
    base, x = awkward_rows(4099, torch.bfloat16, seed=3)
    want = nearswap_reference(t, base.float(), x.float())
    assert bitwise_same(fused(t, base, x, np.float32), want)


@pytest.mark.parametrize(("rows", "compute"), [
    (torch.float32, None), (torch.float64, None), (torch.bfloat16, torch.float32),
    (torch.bfloat16, None), (torch.float16, None),
])
def test_merge_of_any_shard_is_the_whole_tensor_expression(rows, compute):
    """Through ``NearSwap.merge``: fused where the compute dtype is float32 or float64, the torch
    expression for bfloat16 and float16 compute; shards of 1, 3 and all rows."""
    shape = (12, 37)
    base, x = awkward_rows(12 * 37, torch.float64, seed=11)
    base, x = base.reshape(shape).to(rows), x.reshape(shape).to(rows)
    want_dtype = compute or rows
    want = nearswap_reference(0.05, base.to(want_dtype), x.to(want_dtype))
    method = get_method("nearswap")
    params = TensorParams({"t": 0.05}, [{}])
    for step in (1, 3, 12):
        parts = [method.merge(base[r:r + step], [x[r:r + step]], params, ctx(shape, r, min(12, r + step), n=1,
                                                                         compute=compute))
                 for r in range(0, 12, step)]
        got = torch.cat(parts)
        assert got.dtype == want_dtype
        if want_dtype in INT_OF:
            assert bitwise_same(got, want)
        else:
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_loop_is_not_the_identity():
    """The check can fail: a near element takes the expert's value, a far one keeps the base's."""
    base = torch.tensor([1.0, 1.0, 1.0])
    x = torch.tensor([1.01, 2.0, 1.0 + 1e-8])
    got = fused(0.05, base, x, np.float32)
    assert got[0] == pytest.approx(1.0 + 0.01 * 1.0, abs=1e-6) and got[1] == pytest.approx(1.05, abs=1e-6)
    assert got[2] == x[2]
