"""NuSLERP's fused loops give the floats of its torch formulation on a whole flattened tensor.

The torch formulation (the unit vectors' product summed by ``scalars.total``; ``nuslerp_apply``
then ``+ base``) is what the loops replaced and what float16 and the column / last-dim modes
still run; it is itself checked against mergekit 0.1.5 (``test_methods_mergekit_015``,
``tests/compat``). Here the cosine round's float64 sum must be the same float and the blended
rows the same bits, for every compute dtype with a loop, with and without a base, colinear or
not, across numpy's pairwise leaf boundaries (128 elements and its splits).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distmerge.methods import scalars
from distmerge.methods.nuslerp import NuSlerp, NuSlerpReductions, _blend_coefficients, nuslerp_apply
from tests.methods.test_kernels import same_bits

SIZES = [1, 7, 128, 129, 1000, 4097, 65537]


def inputs(size: int, dtype: torch.dtype, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=g, dtype=torch.float64)
    xs = [base + 0.2 * torch.randn(size, generator=g, dtype=torch.float64) for _ in range(2)]
    shape = (size // 7, 7) if size % 7 == 0 and size > 7 else (size,)
    return base.to(dtype).reshape(shape), [x.to(dtype).reshape(shape) for x in xs]


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_fused_cosine_and_blend_equal_torch(dtype: torch.dtype, size: int, with_base: bool) -> None:
    base, xs = inputs(size, dtype)
    v0, v1 = (xs[0] - base, xs[1] - base) if with_base else (xs[0], xs[1])
    norms = tuple(scalars.sqrt_as(float((v.double() ** 2).sum()), dtype).clamp(min=1e-7) for v in (v0, v1))
    red = NuSlerpReductions(norms=(norms[0], norms[1]))
    want_sum = scalars.total((v0 / norms[0]) * (v1 / norms[1]))
    assert NuSlerp._fused_cosine(base if with_base else None, xs, red, xs[0].dtype) == want_sum
    # The reduced cosine, then cosines that take the colinear branch (1, -1, beyond) and the
    # spherical one near its edges.
    for cos_value in (want_sum, 1.0, -1.0, 1.5, 0.0, 0.999, -0.999):
        cos = scalars.as_dtype(cos_value, dtype)
        for t in (0.3, 0.5, 0.9):
            want = nuslerp_apply(t, v0, v1, cos)
            want = base + want if with_base else want
            got = NuSlerp._fused_blend(base if with_base else None, xs, *_blend_coefficients(t, cos, xs[0].dtype),
                                       xs[0].dtype)
            assert got.dtype == want.dtype and same_bits(got, want), (cos_value, t)


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("size", [0, *SIZES])
@pytest.mark.parametrize(("stored", "compute"), [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32), (torch.float64, torch.float64)], ids=str)
def test_fused_squares_equal_numpys_float64_sums(stored: torch.dtype, compute: torch.dtype, size: int,
                                                 with_base: bool) -> None:
    """Round 0 (both norms' sums of squares from one pass) gives numpy's float64 pairwise sum of
    each compute-dtype vector's squares: bf16 rows as stored under float32 compute (as the
    engine hands them), rows in the compute dtype otherwise; a NaN or Inf comes through."""
    base, xs = inputs(size, stored)
    for bad in ([], [(0, 3, math.nan), (1, 128, math.inf)]):
        if bad and size < 129:
            continue
        xs = [x.clone() for x in xs]
        for e, i, value in bad:
            xs[e].view(-1)[i] = value
        vectors = [x.to(compute) - base.to(compute) if with_base else x.to(compute) for x in xs]
        want = tuple(float(np.add.reduce(v.reshape(-1).double().numpy() ** 2)) for v in vectors)
        got = NuSlerp._fused_squares(base if with_base else None, xs, compute)
        assert np.array_equal(np.array(got), np.array(want), equal_nan=True), (got, want)
