"""The Karcher mean's fused loops give the floats of its torch formulation, round by round.

The torch formulation (``Karcher.replay_partials`` / ``replay_merge``: mergekit's expressions on
the rows) is what the loops replaced and what float16 still runs; it is itself checked against a
whole-tensor transcription of mergekit and against mergekit 0.1.5 (``test_methods_mergekit_015``).
Here every round's float64 sums must be the same floats and the merged rows the same bits, for
each compute dtype with a loop, across numpy's pairwise leaf boundaries, with and without a base,
through several iterations, with an input whose angle to the mean is below ``tol`` (no tangent
term), and for inputs that converge before ``max_iter``.
"""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import get_method
from distmerge.methods.karcher import MERGE, KarcherPartials, fused_pass
from tests.methods.test_kernels import same_bits
from tests.methods.test_methods_catalogue import params_for

SIZES = [7, 129, 1000, 65537]  # one element has a single direction: nothing to iterate


def inputs(size: int, n: int, dtype: torch.dtype, case: str, seed: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(size, generator=g, dtype=torch.float64)
    xs = [base + 0.3 * torch.randn(size, generator=g, dtype=torch.float64) for _ in range(n)]
    if case == "duplicate":  # two inputs on one direction: a zero angle once the mean is there
        xs[1] = xs[0].clone()
    shape = (size // 7, 7) if size % 7 == 0 and size > 7 else (size,)
    return [x.to(dtype).reshape(shape) for x in xs]


def run_rounds(method, tensors, params):  # type: ignore[no-untyped-def]
    """Every round: the fused sums against the replayed ones; returns the reduced values and
    how many rounds ran."""
    reduced, rounds = None, 0
    for round_ in range(method.reduction_rounds(params)):
        if reduced is not None and reduced.complete:
            break
        fused = fused_pass(tensors, reduced, round_, params.global_["tol"])
        replayed = method.replay_partials(tensors, params, round_, reduced)
        assert fused == replayed, (round_, fused, replayed)
        reduced = method.reduce([KarcherPartials(replayed, tensors[0].dtype)], params, tuple(tensors[0].shape),
                                round_, reduced)
        rounds += 1
    return reduced, rounds


@pytest.mark.parametrize("case", ["spread", "duplicate"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_fused_rounds_and_merge_equal_the_torch_replay(dtype: torch.dtype, size: int, case: str) -> None:
    method = get_method("karcher")
    params = params_for("karcher", 3, {"max_iter": 4, "tol": 1e-9})  # tight: every case iterates
    tensors = inputs(size, 3, dtype, case)
    reduced, rounds = run_rounds(method, tensors, params)
    assert rounds >= 5  # the norms, |m| and at least one whole iteration
    assert reduced.steps, "no iteration finished: the step replay went untested"
    merged = fused_pass(tensors, reduced, MERGE, params.global_["tol"])
    want = method.replay_merge(tensors, params, reduced)
    assert isinstance(merged, torch.Tensor) and merged.dtype == want.dtype == dtype and merged.shape == want.shape
    assert same_bits(merged, want)


def test_a_zero_angle_input_skips_its_tangent_term_and_a_converged_tensor_stops_early() -> None:
    """The duplicate case above reaches both branches: an input whose angle is below ``tol`` and
    a tangent norm below ``tol`` that ends the iterations before ``max_iter``."""
    method = get_method("karcher")
    params = params_for("karcher", 2, {"max_iter": 50, "tol": 1e-2})
    tensors = inputs(4097, 2, torch.bfloat16, "duplicate")
    skipped = []
    original = method.reduce

    def watching(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(*args, **kwargs)
        if out.pending is not None:
            skipped.extend(c is None for c in out.pending.coefs)
        return out

    method.reduce = watching  # type: ignore[method-assign]
    try:
        reduced, rounds = run_rounds(method, tensors, params)
    finally:
        del method.reduce
    assert any(skipped), "no input's angle fell below tol: the skipped-term branch went untested"
    assert reduced.complete and rounds < method.reduction_rounds(params)
    merged = fused_pass(tensors, reduced, MERGE, params.global_["tol"])
    assert same_bits(merged, method.replay_merge(tensors, params, reduced))


def test_float16_takes_the_torch_formulation() -> None:
    tensors = inputs(64, 2, torch.float16, "spread")
    assert fused_pass(tensors, None, 0, 1e-5) is None
