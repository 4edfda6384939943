"""Multi-SLERP's fused loop gives the floats of its torch formulation, round by round.

The torch formulation (``MultiSlerp.replay``: mergekit's expressions on the rows) is what the
loop replaced and what float16 still runs; it is itself checked against a whole-tensor
transcription of mergekit and against mergekit 0.1.5 (``test_methods_mergekit_015``). Here each
round's float64 sums must be the same floats and the merged rows the same bits, for every
compute dtype with a loop, with and without a base, across numpy's pairwise leaf boundaries
(128 elements and its splits), for 2 and 3 models and unnormalized weights.
"""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import get_method
from distmerge.methods.base import ShardContext
from distmerge.methods.multislerp import ROUNDS, SumPartials
from tests.methods.test_kernels import same_bits
from tests.methods.test_methods_catalogue import params_for

SIZES = [1, 7, 129, 1000, 4097, 65537]
CASES = {
    "3-models": ({}, [{"weight": 0.3}, {"weight": 0.9}, {"weight": 0.5}]),
    "2-models-unnormalized": ({"normalize_weights": False, "eps": 1e-6}, [{"weight": 0.7}, {"weight": 1.3}]),
}


def inputs(size: int, n: int, dtype: torch.dtype, seed: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=g, dtype=torch.float64)
    xs = [base + 0.2 * torch.randn(size, generator=g, dtype=torch.float64) for _ in range(n)]
    shape = (size // 7, 7) if size % 7 == 0 and size > 7 else (size,)
    return base.to(dtype).reshape(shape), [x.to(dtype).reshape(shape) for x in xs]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_fused_rounds_and_merge_equal_the_torch_replay(dtype: torch.dtype, size: int, with_base: bool,
                                                       case: str) -> None:
    glob, models = CASES[case]
    method = get_method("multislerp")
    params = params_for("multislerp", len(models), glob, models)
    base, xs = inputs(size, len(models), dtype)
    base = base if with_base else None
    reduced = None
    for round_ in range(ROUNDS):
        fused = method._fused(base, xs, params, reduced, round_, xs[0].dtype)
        replayed = method.replay(base, xs, params, reduced, round_)
        assert fused == replayed, (round_, fused, replayed)  # the same float64 sums, exactly
        reduced = method.reduce([SumPartials(replayed, dtype)], params, tuple(xs[0].shape), round_, reduced)
        assert not reduced.linear
    merged = method._fused(base, xs, params, reduced, ROUNDS, xs[0].dtype)
    want = method.replay(base, xs, params, reduced, ROUNDS)
    assert merged.dtype == want.dtype == dtype and merged.shape == want.shape
    assert same_bits(merged, want)
    assert not torch.equal(merged, xs[0])  # a real blend, not a copy of an input


def test_float16_and_the_linear_fallback_take_the_torch_formulation() -> None:
    method = get_method("multislerp")
    params = params_for("multislerp", 2, {}, [{"weight": 1.0}, {"weight": 1.0}])
    _, xs = inputs(64, 2, torch.float16)
    assert method._fused(None, xs, params, None, 0, xs[0].dtype) is None
    a = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    reduced = None
    for round_ in range(2):
        sums = method.partial_reductions(None, [a, -a], params, ShardContext("t", (64,), 0, 1), round_, reduced)
        reduced = method.reduce([sums], params, (64,), round_, reduced)
    assert reduced.linear
    assert method._fused(None, [a, -a], params, reduced, ROUNDS, a.dtype) is None
