"""The variance-across-models kernel (SCE's selection statistic) equals torch.var(dim=0,
unbiased=False) bit for bit, in every dtype, with infinities, NaNs, zeros and the largest finite
values, for any number of models and any shape."""

from __future__ import annotations

import warnings

import pytest
import torch

from distmerge.methods.kernels import variance_across


def _inputs(n: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, *shape), generator=g) * torch.rand(shape, generator=g) * 3).to(dtype)
    flat = x.view(-1)
    k = flat.numel()
    if k >= 400:
        flat[:20] = float("inf")
        flat[20:40] = float("nan")
        flat[40:60] = -float("inf")
        flat[60:120] = 0
        flat[120:160] = torch.finfo(dtype).max
        flat[160:200] = -torch.finfo(dtype).max
        flat[200:240] = torch.finfo(dtype).tiny / 4  # subnormal
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(37, 41), (1000,), (3, 5, 7), (0, 4)])
def test_equals_torch_var(dtype: torch.dtype, n: int, shape: tuple[int, ...]):
    x = _inputs(n, shape, dtype, seed=n * 7 + len(shape))
    _assert_same(variance_across(x), x)


def test_reads_a_non_contiguous_stack():
    _assert_same(variance_across(x := _inputs(3, (64, 80), torch.float32, seed=3)[:, :, ::2]), x)


def _assert_same(got: torch.Tensor, x: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns on an empty reduction
        want = torch.var(x, dim=0, unbiased=False)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.5), want.nan_to_num(0.5))
