"""Sums over the models in torch's stacked order: ``stack_sums`` against torch itself, and every
method whose mergekit formula sums a stack (the task-vector family, sce, ram, ramplus_tl,
multislerp) against plain-torch transcriptions and against mergekit 0.1.5 with five to
eighteen models, where torch's order stops being left to right. Shapes whose element counts
are not multiples of torch's vector groups put elements in the tail, where the order differs.
"""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import sce as sce_module
from distmerge.methods import stack_sums
from distmerge.torch_threads import torch_threads
from tests.methods.test_methods_catalogue import params_for, torch_and_fused
from tests.methods.test_methods_mergekit_015 import (
    bits_equal,
    make_inputs,
    merge_sharded,
    mergekit_params,
    reduce_all,
    ref_multislerp,
    ref_ram,
    run,
    run_mergekit,
    ulps,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
COUNTS = (1, 2, 4, 5, 7, 17, 18, 21, 40)
NUMELS = (1, 2, 5, 8, 15, 16, 31, 33, 95, 1000, 40001)
SHAPES = [(37, 19), (29,), (3, 40), (1, 23), (1,)]
MANY = (5, 6, 9, 18)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaNs compare by their bits)."""
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _terms(n: int, numel: int, dtype: torch.dtype, g: torch.Generator) -> list[torch.Tensor]:
    return [(torch.randn(numel, generator=g, dtype=torch.float64)
             * torch.exp(3 * torch.randn(numel, generator=g, dtype=torch.float64))).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stack_sum_is_torchs_stacked_sum_whole_and_in_shards(dtype, threads):
    g = torch.Generator().manual_seed(11)
    with torch_threads(threads):
        for n in COUNTS:
            for numel in NUMELS:
                xs = _terms(n, numel, dtype, g)
                want = torch.stack(xs).sum(dim=0)
                assert torch.equal(_bits(stack_sums.stack_sum(xs, 0, numel)), _bits(want)), (n, numel)
                for cut in {1, numel // 3, numel - 1} - {0, numel}:
                    parts = [stack_sums.stack_sum([x[:cut] for x in xs], 0, numel),
                             stack_sums.stack_sum([x[cut:] for x in xs], cut, numel)]
                    assert torch.equal(_bits(torch.cat(parts)), _bits(want)), (n, numel, cut)


def test_the_order_differs_from_left_to_right_only_in_the_tail_from_five_models():
    """The cases above can fail: left to right, the tail of a 1000-element float32 stack of
    five differs from torch's, and the elements before it do not."""
    g = torch.Generator().manual_seed(3)
    xs = _terms(5, 1000, torch.float32, g)
    want = torch.stack(xs).sum(dim=0)
    left_to_right = torch.zeros(1000)
    for x in xs:
        left_to_right = left_to_right + x
    tail = stack_sums.tail_start(1000, torch.float32)
    assert 0 < tail < 1000
    assert torch.equal(left_to_right[:tail], want[:tail])
    assert not torch.equal(left_to_right[tail:], want[tail:])


def test_vector_width_is_found_and_tails_follow_it():
    assert stack_sums.vector_lanes() in (4, 8, 16)
    assert stack_sums.tail_start_for(703, torch.float32, 8) == 672  # whole groups of 4 x 8 floats
    assert stack_sums.tail_start_for(29, torch.float32, 8) == 0  # no whole group: all tail
    assert stack_sums.tail_start_for(7, torch.float32, 8) == 4  # under one vector: whole quads first
    assert stack_sums.tail_start_for(15, torch.bfloat16, 8) == 12  # a bfloat16 vector holds 16
    assert stack_sums.tail_start_for(100, torch.float64, 8) == 96  # groups of 4 x 4 doubles
    assert stack_sums.tail_start_for(100, torch.float32, 16) == 64
    assert stack_sums.tail_start_for(100, torch.float32, 0) == 100  # no known width: left to right


# ---- the methods, against transcriptions that sum with torch.stack(...).sum(dim=0) ----------

def _task_arithmetic(base, xs, consensus):
    """mergekit's generalized task arithmetic with weight 1 and density 1 (normalize on)."""
    deltas = torch.stack([x - base for x in xs])
    weights = torch.ones(len(xs), dtype=deltas.dtype).view(-1, *([1] * base.dim()))
    deltas = deltas * weights
    if not consensus:
        return base + deltas.sum(dim=0) / weights.sum()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    mask = deltas.sign() == majority
    mixed = (deltas * mask).sum(dim=0)
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + mixed / divisor


def _sce(base, xs, weights):
    """mergekit's sce merge (select_topk 1) with distmerge's reduced weights."""
    tvs = torch.stack([x - base for x in xs])
    majority = (tvs.sum(dim=0) >= 0) * 2 - 1
    w = weights.view(-1, *([1] * base.dim()))
    erased = w * (tvs.sign() == majority)
    return base + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


def _weights(n):
    return [0.3 + 0.1 * i for i in range(n)]


CASES = {
    "task_arithmetic": (dict(glob={"normalize": True}, model={"weight": 1.0})),
    "ties": (dict(glob={"normalize": True}, model={"weight": 1.0, "density": 1.0})),
    "sce": (dict(glob={}, model={})),
    "ram": (dict(glob={"epsilon": 0.05}, model={})),
    "multislerp": (dict(glob={}, model=None)),
}


def _params(method, n):
    case = CASES[method]
    model = [{"weight": w} for w in _weights(n)] if case["model"] is None else case["model"]
    return params_for(method, n, case["glob"], model)


def _transcription(method, base, xs, params, reduced):
    if method in ("task_arithmetic", "ties"):
        return _task_arithmetic(base, xs, method == "ties")
    if method == "sce":
        return _sce(base, xs, reduced.weights)
    if method == "ram":
        return ref_ram(base, xs, params.global_["epsilon"])
    g = params.global_
    return ref_multislerp(base, xs, _weights(len(xs)), g["normalize_weights"], g["eps"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", MANY)
@pytest.mark.parametrize("method", list(CASES))
def test_many_models_sum_as_torch_stacks_them(method, n, dtype):
    for shape in SHAPES:
        base, xs = make_inputs(shape, n, dtype, seed=n)
        params = _params(method, n)
        reduced = reduce_all(method, base, xs, params, chunk_rows=3)
        want = _transcription(method, base, xs, params, reduced)
        for step in (1, 2, shape[0]):
            bits_equal(merge_sharded(method, base, xs, params, reduced, step), want)


@pytest.mark.parametrize("method,glob,model", [
    ("dare_ties", {}, {"weight": 0.7, "density": 0.6}),
    ("breadcrumbs_ties", {}, {"weight": 0.7, "density": 0.8, "gamma": 0.05}),
    ("della", {}, {"weight": 0.7, "density": 0.6, "epsilon": 0.1}),
    ("ties", {"rescale": True}, {"weight": 0.7, "density": 0.5}),
])
def test_many_models_fused_equal_the_torch_formulation(method, glob, model, monkeypatch):
    """The kernel's re-ordered tail with sparsification, draws and rescales in play."""
    from distmerge.methods import task_vectors

    base, xs = make_inputs((37, 19), 6, torch.float32, seed=4)
    params = params_for(method, 6, glob, model)
    reduced = reduce_all(method, base, xs, params, chunk_rows=3)
    fused = merge_sharded(method, base, xs, params, reduced, 37)
    monkeypatch.setattr(task_vectors.kernels, "kernel_mode", lambda dtype: None)
    for step in (1, 5, 37):
        bits_equal(merge_sharded(method, base, xs, params, reduced, step), fused)


def test_sce_fuses_any_number_of_models(monkeypatch):
    base, xs = make_inputs((37, 19), 7, torch.float32, seed=2)
    params = params_for("sce", 7, {"select_topk": 0.4}, {})
    (red_t, merged_t), (red_f, merged_f) = torch_and_fused(sce_module, "sce", base, xs, params, 3, (1, 4, 37),
                                                           monkeypatch)
    assert torch.equal(red_t.weights, red_f.weights)
    for a, b in zip(merged_t, merged_f, strict=True):
        bits_equal(b, a)


# ---- against mergekit 0.1.5 itself -------------------------------------------------------------

MK_CASES = {"task_arithmetic": "task_arithmetic", "ties": "ties", "ram": "ram", "sce": "sce",
            "multislerp": "multislerp"}
# The ulps allowed as for fewer models (test_methods_mergekit_015.MK_ULPS): sce and multislerp
# take their whole-tensor scalars in float64, mergekit in the compute dtype.
MK_ULPS = {"task_arithmetic": 0, "ties": 0, "ram": 0, "sce": 2, "multislerp": 2}


@pytest.fixture(scope="module")
def many_model_outputs(tmp_path_factory):
    cases = {}
    for method in MK_CASES:
        for n in (5, 6):
            for shape in SHAPES:
                for dtype in (torch.float32, torch.bfloat16):
                    base, xs = make_inputs(shape, n, dtype, seed=20 + n)
                    case = CASES[method]
                    model = [{"weight": w} for w in _weights(n)] if case["model"] is None else case["model"]
                    cases[f"{method}|{n}|{shape}|{dtype}"] = (method, mergekit_params(method, case["glob"], model, n),
                                                             base, xs)
    return cases, run_mergekit(tmp_path_factory.mktemp("mergekit-many"), cases)


@pytest.mark.parametrize("method", list(MK_CASES))
def test_many_models_match_mergekit_015(many_model_outputs, method):
    cases, outputs = many_model_outputs
    for key, (_, _, base, xs) in cases.items():
        if key.split("|")[0] != method:
            continue
        got = run(method, base, xs, _params(method, len(xs)))
        if MK_ULPS[method] == 0:
            bits_equal(got, outputs[key])
        else:
            assert ulps(got, outputs[key], [base, *xs]) <= MK_ULPS[method], key


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stack_mean_is_torchs_stacked_mean(dtype):
    """bfloat16/float16: torch divides the float32 sum before rounding (not ``sum / n``)."""
    g = torch.Generator().manual_seed(13)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in (3, 6, 10, 21):
            for numel in (1, 5, 37, 100, 1000):
                xs = _terms(n, numel, dtype, g)
                want = torch.stack(xs).mean(dim=0)
                assert torch.equal(_bits(stack_sums.stack_mean(xs, 0, numel)), _bits(want)), (n, numel)
                cut = numel // 3
                if cut:
                    parts = [stack_sums.stack_mean([x[:cut] for x in xs], 0, numel),
                             stack_sums.stack_mean([x[cut:] for x in xs], cut, numel)]
                    assert torch.equal(_bits(torch.cat(parts)), _bits(want)), (n, numel)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [4, 5])
def test_model_stock_filter_wise_means_the_pairs_as_torch_over_the_whole_tensor(n, dtype):
    """filter_wise model_stock: one t per last-dim vector from the mean of the pairs' cosines,
    a stacked mean over the whole tensor's vectors (six pairs from four models on, so its tail
    is not left to right). Every sharding gives the whole tensor's t."""
    from distmerge.methods.model_stock import blend_reference, gram_reference, stock_t

    for shape in [(37, 19), (70, 5), (3, 40, 6)]:
        base, xs = make_inputs(shape, n, dtype, seed=n)
        params = params_for("model_stock", n, {"filter_wise": True}, {})
        t = stock_t(gram_reference(base, xs, rows=True), dtype)  # torch's own mean, whole tensor
        want = blend_reference(base, xs, t.unsqueeze(-1))
        for step in (1, 2, 5, shape[0]):
            bits_equal(merge_sharded("model_stock", base, xs, params, None, step), want)
