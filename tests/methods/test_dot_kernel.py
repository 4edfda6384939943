"""The fused float64 dot equals numpy's ``np.add.reduce`` of the float64 products (what
``reductions.dot`` computed before) bit for bit, at every length around numpy's pairwise block
and split points, in every dtype, with infinities, NaNs and non-contiguous operands."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distmerge.methods.kernels.dots import float64_dot


def _numpy_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.add.reduce(a.reshape(-1).to(torch.float64).numpy() * b.reshape(-1).to(torch.float64).numpy()))


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y and math.copysign(1, x) == math.copysign(1, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 127, 128, 129, 136, 255, 256, 1000, 4099, 1 << 20 | 13])
def test_equals_numpys_pairwise_sum(dtype: torch.dtype, n: int):
    g = torch.Generator().manual_seed(n)
    a = (torch.randn(n, generator=g) * 1e3).to(dtype)
    b = (torch.randn(n, generator=g) * torch.rand(n, generator=g)).to(dtype)
    assert _same(float64_dot(a, b), _numpy_dot(a, b))
    assert _same(float64_dot(a, a), _numpy_dot(a, a))


def test_specials_and_layouts():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(300, 40, generator=g)
    b = torch.randn(300, 40, generator=g)
    assert _same(float64_dot(a.t(), b.t()), _numpy_dot(a.t().contiguous(), b.t().contiguous()))
    a[3, 4] = float("inf")
    assert _same(float64_dot(a, b), _numpy_dot(a, b))
    b[7, 1] = float("nan")
    assert math.isnan(float64_dot(a, b))
    assert _same(float64_dot(-torch.zeros(3), torch.zeros(3)), _numpy_dot(-torch.zeros(3), torch.zeros(3)))
    with pytest.raises(ValueError):
        float64_dot(torch.ones(3), torch.ones(4))
