"""linear and task_arithmetic against whole-tensor references written here (no Ray, no I/O)."""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import get_method
from distmerge.methods.base import ShardContext, TensorParams


def _ctx(shape):
    return ShardContext("model.layers.0.mlp.up_proj.weight", shape, 0, shape[0])


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_weighted_average(normalize):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(7, 5, generator=g) for _ in range(3)]
    w = [0.5, 1.5, -0.25]
    params = TensorParams({"normalize": normalize}, tuple({"weight": v} for v in w))
    out = get_method("linear").merge(None, xs, params, _ctx((7, 5)))
    expected = xs[0] * w[0] + xs[1] * w[1] + xs[2] * w[2]
    if normalize:
        expected = expected / sum(w)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 1.0), (False, 0.7)])
def test_task_arithmetic_matches_formula(normalize, lam):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(9, 4, generator=g)
    xs = [base + 0.1 * torch.randn(9, 4, generator=g) for _ in range(2)]
    w = [0.3, 0.9]
    params = TensorParams({"normalize": normalize, "lambda": lam}, tuple({"weight": v} for v in w))
    out = get_method("task_arithmetic").merge(base, xs, params, _ctx((9, 4)))
    delta = w[0] * (xs[0] - base) + w[1] * (xs[1] - base)
    if normalize:
        delta = delta / (w[0] + w[1])
    torch.testing.assert_close(out, base + lam * delta, rtol=1e-6, atol=1e-6)
