"""``MergeMethod.nonfinite_reaches_output``: the engine scans only the output of a method that
sets it (``engine.worker.output_scan_suffices``), so a NaN or Inf in any input that the merge
made finite would go unseen. For every method that sets the flag, every input NaN/Inf must
reach its output element: any weights (0 and negative too), normalize, lambda, a base that is
itself broken, every compute dtype, rows as stored or cast, and the output dtype's cast; and a
method with reduction rounds must take broken rows in them without failing (the engine no
longer scans the inputs there: the merge's output shows them)."""

from __future__ import annotations

import pytest
import torch

from distmerge.methods.registry import METHODS
from tests.methods.test_methods_catalogue import merge_sharded, params_for, reductions

FLAGGED = sorted(name for name, m in METHODS.items() if m.nonfinite_reaches_output)
SPECIALS = (float("nan"), float("inf"), float("-inf"))


def test_the_flag_is_set_where_the_engine_relies_on_it():
    assert FLAGGED == ["arcee_fusion", "linear", "passthrough", "task_arithmetic"]


def _inputs(g: torch.Generator, n_inputs: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rows of ``n_inputs`` models with NaN/+Inf/-Inf at random places (a few shared between
    models, so an Inf meets a -Inf), and where any model holds one."""
    rows = [torch.randn(37, 23, generator=g) for _ in range(n_inputs)]
    for x in rows:
        spots = torch.rand(x.shape, generator=g) < 0.04
        picks = torch.randint(0, len(SPECIALS), x.shape, generator=g)
        for k, v in enumerate(SPECIALS):
            x[spots & (picks == k)] = v
    rows[-1][3, :5] = float("inf")
    rows[0][3, :5] = float("-inf")
    rows = [x.to(dtype) for x in rows]
    poisoned = torch.zeros(rows[0].shape, dtype=torch.bool)
    for x in rows:
        poisoned |= ~torch.isfinite(x)
    return rows, poisoned


@pytest.mark.parametrize("name", FLAGGED)
@pytest.mark.parametrize("dtype,compute", [(torch.float32, None), (torch.bfloat16, None),
                                           (torch.bfloat16, torch.float32), (torch.float16, None)])
def test_every_input_nan_or_inf_reaches_the_output(name, dtype, compute):
    g = torch.Generator().manual_seed(hash((name, str(dtype), str(compute))) % 2**31)
    method = METHODS[name]
    checked = 0
    for trial in range(12):
        n = min(2 + trial % 3, method.max_experts or 4)
        rows, poisoned = _inputs(g, n + 1, dtype)
        base, experts = rows[0], rows[1:]
        if not method.uses_base:
            poisoned = torch.zeros_like(poisoned)
            for x in experts:
                poisoned |= ~torch.isfinite(x)
        weights = [[0.0, -0.7, 1.3, 0.5, 2.0][(trial + e) % 5] for e in range(n)]
        if trial % 4 == 0:
            weights = [0.0] * n  # every weight zero: 0 * Inf is NaN
        glob = {}
        if "normalize" in method.global_parameters:
            glob["normalize"] = bool(trial % 2) and sum(weights) != 0
        if "lambda" in method.global_parameters:
            glob["lambda"] = [1.0, 0.0, 0.5][trial % 3]
        per_model = [{"weight": w} for w in weights] if "weight" in method.model_parameters else None
        if "scale" in method.model_parameters:  # passthrough: the weights as its scale
            per_model = [{"scale": w} for w in weights]
        params = params_for(name, n, glob, per_model)
        reduced = reductions(name, base, experts, params, compute=compute)
        merged = merge_sharded(name, base, experts, params, reduced, 10, compute=compute)
        for out_dtype in (merged.dtype, torch.bfloat16, torch.float16):
            finite = torch.isfinite(merged.to(out_dtype))
            assert not (finite & poisoned).any(), (trial, weights, glob, out_dtype)
            # and no further: a clean block whose output is broken is blamed on the dtype or the
            # parameters, not on an input, so a broken input must not spread over the tensor
            assert (finite | poisoned).all(), (trial, weights, glob, out_dtype)
        checked += int(poisoned.sum())
    assert checked > (400 if method.max_experts == 1 else 500)  # one model (passthrough): fewer broken inputs


@pytest.mark.parametrize("name", FLAGGED)
def test_a_broken_vector_reaches_the_output_through_whole_tensor_rounds(name):
    """A 1-D tensor's statistics span the vector (arcee_fusion's softmax over all of it): one NaN
    or Inf makes them NaN, and still every broken element, and only those, is broken in the output."""
    method = METHODS[name]
    for dtype in (torch.float32, torch.bfloat16):
        for value in SPECIALS:
            g = torch.Generator().manual_seed(7)
            rows = [torch.randn(101, generator=g) for _ in range(1 + min(2, method.max_experts or 2))]
            rows[-1][5], rows[0][50] = value, value
            rows = [x.to(dtype) for x in rows]
            base, experts = rows[0], rows[1:]
            per_model = [{"weight": 0.5}] * len(experts) if "weight" in method.model_parameters else None
            params = params_for(name, len(experts), None, per_model)
            merged = merge_sharded(name, base, experts, params, reductions(name, base, experts, params), 10)
            broken = ~torch.isfinite(merged)
            assert broken[5] and (broken[50] or not method.uses_base) and int(broken.sum()) <= 2, (dtype, value)
