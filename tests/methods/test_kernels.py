"""The fused kernels reproduce the torch formulation bit for bit.

``TaskVectorMethod.merge`` runs one numba loop where the compute dtype has a kernel; the
torch op-by-op pipeline (``merge_reference``) is the formulation it must equal exactly, for
every task-vector method, switch and compute dtype. The catalogue tests check both against
the published math; these pin the two implementations to each other, including signed
zeros, so a merge gives the same bytes whichever path a dtype takes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distmerge.methods import get_method, kernels, selection
from distmerge.methods.linear import Linear
from tests.methods.test_methods_catalogue import ctx, params_for, reductions

COMPUTE = [torch.float32, torch.bfloat16, torch.float64]
CASES = [
    ("task_arithmetic", {}, {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}, {}),
    ("ties", {}, {"density": 0.4}),
    ("ties", {"normalize": False, "lambda": 1.3}, {"density": 0.6}),
    ("ties", {"rescale": True}, {"density": 0.3}),
    ("breadcrumbs", {}, {"density": 0.5, "gamma": 0.05}),
    ("breadcrumbs_ties", {"normalize": True}, {"density": 0.5, "gamma": 0.1}),
    ("dare_linear", {}, {"density": 0.5}),
    ("dare_linear", {"rescale_mode": "inverse_density"}, {"density": 0.3}),
    ("dare_ties", {"normalize": True}, {"density": 0.6}),
    ("dare_ties", {"rescale": False}, {"density": 0.6}),
    ("della", {}, {"density": 0.5, "epsilon": 0.2}),
    ("della_linear", {"rescale_mode": "inverse_density"}, {"density": 0.4, "epsilon": 0.1}),
]


def inputs(shape, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    xs = [base + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    # exact zeros and equal values: signed-zero and tie handling must agree too
    xs[0].reshape(-1)[::7] = base.reshape(-1)[::7]
    base.reshape(-1)[::11] = 0.0
    return base.to(dtype), [x.to(dtype) for x in xs]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN equals any NaN (torch's own NaN payloads vary)."""
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    ia = a.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()])
    ib = b.contiguous().view(ia.dtype)
    return torch.equal(ia[~nan], ib[~nan])


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
@pytest.mark.parametrize("name,glob,model", CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_fused_merge_equals_torch_formulation(name, glob, model, dtype):
    shape = (41, 23)
    base, xs = inputs(shape, 3, dtype, seed=len(name) + len(glob))
    weights = [{"weight": w} | model for w in (0.6, -0.35, 0.9)]
    params = params_for(name, 3, glob, weights)
    reduced = reductions(name, base, xs, params, seed=5)
    m = get_method(name)
    c = ctx(shape, 0, shape[0], 5, 3)
    got = m.merge(base, xs, params, c, reduced)
    want = m.merge_reference(base, xs, params, c, reduced)
    assert got.dtype == want.dtype == dtype
    assert same_bits(got, want), (got - want).abs().max()


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ties_consensus_of_one_to_four_experts_equals_torch(n, dtype):
    """TIES at its defaults fuses the consensus of up to three experts into one loop that
    reads three rows (missing experts' rows are zeros of weight 0); one, two, three and four
    experts (the general loops), with a negative weight among them, give torch's bits."""
    shape = (29, 31)
    base, xs = inputs(shape, n, dtype, seed=20 + n)
    params = params_for("ties", n, {}, [{"weight": w, "density": 0.5} for w in (0.6, -0.35, 0.9, 0.4)[:n]])
    reduced = reductions("ties", base, xs, params, seed=5)
    m = get_method("ties")
    c = ctx(shape, 0, shape[0], 5, n)
    got, want = m.merge(base, xs, params, c, reduced), m.merge_reference(base, xs, params, c, reduced)
    assert same_bits(got, want), (got - want).abs().max()


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
def test_fused_merge_propagates_nan_like_torch(dtype):
    base, xs = inputs((9, 5), 2, dtype, seed=1)
    xs[1][3, 2] = float("nan")
    xs[0][4, 1] = float("inf")
    params = params_for("ties", 2, {}, {"weight": 0.5, "density": 1.0})
    m = get_method("ties")
    c = ctx((9, 5), 0, 9, 0, 2)
    got, want = m.merge(base, xs, params, c, None), m.merge_reference(base, xs, params, c, None)
    assert torch.isnan(got[3, 2]) and same_bits(got, want)


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "dare_ties", "task_arithmetic"])
def test_sums_of_negative_zeros_are_positive_zero(name, dtype):
    """A -0.0 base weight whose deltas are all trimmed negatives: every kept term is -0.0, and
    torch's sums start from +0.0, so mergekit merges it to +0.0. The kernel and the reference
    both give that (they kept -0.0 before: a sum that started from its first term)."""
    base = torch.tensor([[-0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]], dtype=dtype)
    xs = [base + torch.tensor([[-1e-3, 0.5, -0.25, 0.125], [0.5, -0.5, 0.25, 1.0]], dtype=dtype),
          base + torch.tensor([[-2e-3, 0.25, 0.5, -1.0], [0.25, 0.5, -0.125, 0.75]], dtype=dtype)]
    xs[0][0, 0] = xs[0][0, 0].abs().neg()  # -1e-3 (bf16's -0.0 + -1e-3 is -1e-3)
    params = params_for(name, 2, {}, {"weight": 1.0, "density": 0.5} if name != "task_arithmetic" else {"weight": 1.0})
    reduced = reductions(name, base, xs, params, seed=3)
    m = get_method(name)
    c = ctx((2, 4), 0, 2, 3, 2)
    got, want = m.merge(base, xs, params, c, reduced), m.merge_reference(base, xs, params, c, reduced)
    assert same_bits(got, want)
    if name == "ties":  # trimmed at density 0.5: both deltas dropped
        assert got[0, 0].item() == 0.0 and not torch.signbit(got[0, 0])


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_linear_equals_torch_formulation(dtype, normalize):
    base, xs = inputs((33, 17), 3, dtype, seed=2)
    params = params_for("linear", 3, {"normalize": normalize}, [{"weight": w} for w in (0.3, 0.45, 0.61)])
    m = get_method("linear")
    assert isinstance(m, Linear)
    c = ctx((33, 17), 0, 33, 0, 3)
    assert same_bits(m.merge(None, xs, params, c), m.merge_reference(xs, params))


def test_bfloat16_rounding_equals_torch_conversion():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    edge = torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x3F808000, 0x3F818000, 0x00008000, 0x00018000, 0x80000000,
                         0x7F800000, -1], dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits, edge]).view(torch.float32)
    x = x[~torch.isnan(x)]
    got = kernels.round_array(x.numpy(), kernels.BFLOAT16)
    assert same_bits(torch.from_numpy(got), x.to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
def test_selection_kernels_equal_torch_keys(dtype):
    """Histogram and window counts of |x - base| keys equal counting torch's own keys."""
    base, (x,) = inputs((64, 31), 1, dtype, seed=3)
    keys = (x - base).abs().to(torch.float32).view(torch.int32).reshape(-1).to(torch.int64)
    kd = kernels.kernel_dtype(dtype)
    mode = kernels.kernel_mode(dtype)
    assert mode is not None
    b, xa = kernels.as_array(base, kd), kernels.as_array(x, kd)
    want_hist = torch.bincount(keys >> 16, minlength=selection.HIGH_BINS)
    assert torch.equal(kernels.key_histogram(b, xa, mode), want_hist)
    med = int(keys.median())
    for ranges in [[(med - 5000, med + 90000), (med + 20000, med + 400000)], [(0, 0)], [(med - 70000, med + 1)]]:
        hist, parts = kernels.histogram_and_windows(b, xa, mode, ranges)
        assert torch.equal(hist, want_hist) and len(parts) == len(ranges)
        for (lo, hi), (values, counts) in zip(ranges, parts, strict=True):
            want_values, want_counts = torch.unique(keys[(keys >= lo) & (keys < hi)] - lo, return_counts=True)
            assert torch.equal(values.to(torch.int64), want_values) and torch.equal(counts, want_counts)
            assert values.numel() > 0 or lo == hi


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
def test_speculative_counts_equal_torch_keys(dtype):
    """The speculative round's counts (keys above each range, the keys inside it) and the tie
    round's per-row counts equal counting torch's own keys."""
    base, (x,) = inputs((64, 301), 1, dtype, seed=5)  # rows not a multiple of the kernel's block
    keys = (x - base).abs().to(torch.float32).view(torch.int32).reshape(-1).to(torch.int64)
    kd, mode = kernels.kernel_dtype(dtype), kernels.kernel_mode(dtype)
    assert mode is not None
    b, xa = kernels.as_array(base, kd), kernels.as_array(x, kd)
    med = int(keys.median())
    # Windows whose every key is hit, over and over (the distinct keys' list fills its last slot).
    for ranges in [[(med - 5000, med + 90000), (med + 20000, med + 400000)], [(0, 0)], [(med - 70000, med + 1)],
                   [(med, med + 1), (med - 2, med + 3)]]:
        above, parts, nonfinite = kernels.above_and_windows(b, xa, mode, ranges)
        assert nonfinite == 0
        for (lo, hi), n, (values, counts) in zip(ranges, above, parts, strict=True):
            assert n == int((keys >= hi).sum())
            want_values, want_counts = torch.unique(keys[(keys >= lo) & (keys < hi)] - lo, return_counts=True)
            assert torch.equal(values.to(torch.int64), want_values) and torch.equal(counts, want_counts)
    for key in (med, int(keys.max()), -1):
        want = (keys.reshape(64, 301) == key).sum(1)
        assert torch.equal(torch.from_numpy(kernels.row_key_counts(b, xa, mode, 64, key)), want)


@pytest.mark.parametrize("numel", [1, 7, 8, 127, 129, 261, 1037])
def test_sparse_window_hits_are_counted_wherever_they_fall(numel):
    """The speculative pass gathers only the eight-key words of a block that hold a key inside
    a range: a lone key inside at each place of a block (first, last, each word's edges, a
    short last block that ends mid-word, after blocks whose flags were set), and ranges that
    hold every key or none, count as torch counts its own keys."""
    base = torch.zeros(numel)
    span = torch.arange(1, numel + 1, dtype=torch.float32)
    for inside_at in sorted({0, 7, 8, 63, 64, 127, 128, 135, 136, 255, 256, numel // 2, numel - 2, numel - 1}):
        if not 0 <= inside_at < numel:
            continue
        x = span * 1000.0  # every key far above the ranges but the one inside
        x[inside_at] = 3.0
        x[:inside_at:5] = 2.0  # keys below the ranges, scattered before it
        keys = x.view(torch.int32).to(torch.int64)
        k3, k2 = int(torch.tensor(3.0).view(torch.int32)), int(torch.tensor(2.0).view(torch.int32))
        arrays = kernels.as_array(base, torch.float32), kernels.as_array(x, torch.float32)
        for ranges in [[(k3, k3 + 1)], [(k3 - 7, k3 + 5), (k2, k2 + 1)], [(k2 + 1, k3)], [(k2, k3 + 1)]]:
            above, parts, nonfinite = kernels.above_and_windows(*arrays, kernels.kernel_mode(torch.float32), ranges)
            assert nonfinite == 0
            for (lo, hi), n, (values, counts) in zip(ranges, above, parts, strict=True):
                assert n == int((keys >= hi).sum()), (inside_at, lo, hi)
                want_values, want_counts = torch.unique(keys[(keys >= lo) & (keys < hi)] - lo, return_counts=True)
                assert torch.equal(values.to(torch.int64), want_values), (inside_at, lo, hi)
                assert torch.equal(counts, want_counts), (inside_at, lo, hi)


def test_a_window_over_the_top_bucket_counts_the_nan_keys_there():
    """A NaN whose payload fills its bits has the largest key, 2^31 - 1, in the top bucket, and
    a window placed there ends at 2^31, outside int32: the pass counts it as torch counts its
    own keys (it raised OverflowError before), and so does TIES' selection round that put the
    window there (one expert's bf16 NaN of bits 0xFFFF beside 63 finite deltas, density 1/64)."""
    x = torch.full((300,), 0.5)
    x.view(torch.int32)[[3, 299]] = -1  # bits 0xFFFFFFFF: |.| is 0x7FFFFFFF
    x.view(torch.int32)[200] = 0x7FC00000
    keys = x.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    ranges = [(0x7FFF0000, 1 << 31), (0x7FC00000, 0x7FC00001)]
    arrays = kernels.as_array(torch.zeros(300), torch.float32), kernels.as_array(x, torch.float32)
    above, parts, nonfinite = kernels.above_and_windows(*arrays, kernels.kernel_mode(torch.float32), ranges)
    assert nonfinite == 3
    for (lo, hi), n, (values, counts) in zip(ranges, above, parts, strict=True):
        assert n == int((keys >= hi).sum())
        want_values, want_counts = torch.unique(keys[(keys >= lo) & (keys < hi)] - lo, return_counts=True)
        assert torch.equal(values.to(torch.int64), want_values) and torch.equal(counts, want_counts)
    assert [p[1].tolist() for p in parts] == [[2], [1]]
    base, expert = torch.zeros(1, 64, dtype=torch.bfloat16), torch.full((1, 64), 0.5, dtype=torch.bfloat16)
    expert.view(torch.int16)[0, 43] = -1
    params = params_for("ties", 1, {}, [{"weight": 1.0, "density": 1 / 64}])
    reductions("ties", base, [expert], params, seed=0)


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
def test_the_speculative_pass_counts_every_nonfinite_delta(dtype):
    """The count that proves a chunk's rows finite (``Partials.inputs_finite``) equals torch's
    count of NaN/Inf deltas: NaN, +Inf and -Inf in the base or the model, at block edges and
    inside, Inf minus Inf, and a difference of finite values that overflows the dtype."""
    base, (x,) = inputs((64, 301), 1, dtype, seed=6)
    flat_b, flat_x = base.view(-1), x.view(-1)
    big = torch.finfo(dtype).max
    for i, (where, value) in enumerate([(flat_b, float("nan")), (flat_x, float("inf")), (flat_x, float("-inf")),
                                        (flat_b, float("inf"))]):
        where[[0, 127, 128, 4000 + i, flat_x.numel() - 1][i:i + 2]] = value
    flat_b[5000], flat_x[5000] = float("inf"), float("inf")  # inf - inf: NaN
    flat_b[6000], flat_x[6000] = -big, big  # finite rows whose difference overflows: counted, then scanned
    kd, mode = kernels.kernel_dtype(dtype), kernels.kernel_mode(dtype)
    assert mode is not None
    want = int((~torch.isfinite(x - base)).sum())
    assert want >= 8
    for ranges in [[(0, 0)], [(1 << 20, 1 << 30), (0x3F000000, 0x3F800000)], []]:
        _, _, nonfinite = kernels.above_and_windows(kernels.as_array(base, kd), kernels.as_array(x, kd), mode, ranges)
        assert nonfinite == want
    clean_b, (clean_x,) = inputs((64, 301), 1, dtype, seed=6)
    assert kernels.above_and_windows(kernels.as_array(clean_b, kd), kernels.as_array(clean_x, kd), mode, [])[2] == 0


def test_float16_compute_uses_the_torch_formulation():
    assert kernels.kernel_mode(torch.float16) is None
    base, xs = inputs((7, 3), 2, torch.float16, seed=4)
    params = params_for("ties", 2, {}, {"weight": 0.5, "density": 0.5})
    reduced = reductions("ties", base, xs, params)
    m = get_method("ties")
    c = ctx((7, 3), 0, 7, 0, 2)
    assert torch.equal(m.merge(base, xs, params, c, reduced), m.merge_reference(base, xs, params, c, reduced))


@pytest.mark.parametrize("start", [0, 1, 3, 4, 1_000_003, 2**40 + 2])
def test_philox_kernels_equal_their_references(start):
    from distmerge.methods.random_stream import bernoulli_mask, raw_draws, stream_key
    from tests.methods.test_stream_kernels import keep_stream_outputs

    key = stream_key(7, "model.layers.0.mlp.up_proj.weight", 2)
    counter = np.array([start // 4, 0, 0, 0], dtype=np.uint64)
    want = np.random.Philox(key=key, counter=counter).random_raw(start % 4 + 1001)[start % 4:]
    assert np.array_equal(raw_draws(7, "model.layers.0.mlp.up_proj.weight", 2, start, 1001), want)
    mask = bernoulli_mask(7, "model.layers.0.mlp.up_proj.weight", 2, start, (7, 143), 0.3)
    keep = keep_stream_outputs(key, start, 1001) < np.uint64(int(0.3 * 2.0**32))
    assert torch.equal(mask.reshape(-1), torch.from_numpy(keep))


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
@pytest.mark.parametrize("shape", [(37, 19), (23,), (0, 5)], ids=str)
def test_relax_kernel_equals_torch_formula(dtype, shape):
    """AIM's relaxation in one pass equals ``b + (m - b) * f`` as three torch ops (in float32
    for half types, rounded once), bit for bit, on whole tensors and on row shards."""
    from distmerge.aim import apply_relaxation, shard_factors

    g = torch.Generator().manual_seed(9)
    base = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    merged = (base.double() + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    factors = torch.rand(shape[-1], generator=g)
    compute = torch.promote_types(dtype, torch.float32)
    b = base.to(compute)
    want = (b + (merged.to(compute) - b) * factors.to(compute)).to(dtype)
    assert same_bits(apply_relaxation(base, merged, factors, 0.4), want)
    rows = shape[0]
    pieces = [apply_relaxation(base[r0:r1], merged[r0:r1], shard_factors(factors, shape, r0, r1), 0.4)
              for r0, r1 in [(0, rows // 3), (rows // 3, rows)]]
    assert same_bits(torch.cat(pieces), want)


@pytest.mark.parametrize("step", [1, 3, 16])
@pytest.mark.parametrize("n", [0, 5, 128, 3000, 40001])
def test_sampled_key_histogram_counts_one_block_per_span(n, step):
    """``key_histogram(..., step)`` counts, of each span of ``step`` blocks, the block at
    position ``span index % step``: every key when ``step`` is 1."""
    g = torch.Generator().manual_seed(n + step)
    base = torch.randn(n, generator=g)
    x = base + torch.randn(n, generator=g) / 8
    keys = (x - base).abs().view(torch.int32).to(torch.int64)
    block = kernels.histograms.SAMPLE_BLOCK
    span = block * step
    taken = [i for k, s in enumerate(range(0, n, span)) for i in range(s + (k % step) * block, min(n, s + (k % step) * block + block))]
    want = torch.bincount(keys[taken] >> 16, minlength=selection.HIGH_BINS) if taken else torch.zeros(selection.HIGH_BINS, dtype=torch.int64)
    got = kernels.key_histogram(base.numpy(), x.numpy(), kernels.NATIVE, step)
    assert torch.equal(got, want)
    assert int(got.sum()) == len(taken) and (step > 1 or len(taken) == n)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=str)
def test_selection_kernels_read_stored_bfloat16_rows(compute):
    """bfloat16 rows read as their bits (what the engine passes for float32 compute, and what
    bfloat16 compute reads) count exactly what their float32 copies count."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(97, 61, generator=g).to(torch.bfloat16)
    x = (base.float() + torch.randint(-5, 6, (97, 61), generator=g) / 64).to(torch.bfloat16)
    bits_b, bits_x, mode = kernels.delta_arrays(base, x, compute)
    assert bits_b.dtype == bits_x.dtype == np.uint16
    copy_b, copy_x = kernels.as_array(base, torch.float32), kernels.as_array(x, torch.float32)
    med = int(np.median(kernels.delta_keys(copy_b, copy_x, mode)))
    ranges = [(med - 3, med + 70000), (med + 9, med + 200000)]
    for fn, args in [(kernels.key_histogram, ()), (kernels.key_histogram, (16,)), (kernels.delta_keys, ()),
                     (kernels.row_key_counts, (97, med)), (kernels.histogram_and_windows, (ranges,)),
                     (kernels.above_and_windows, (ranges,))]:
        assert same_values(fn(bits_b, bits_x, mode, *args), fn(copy_b, copy_x, mode, *args)), fn.__name__


def same_values(a, b) -> bool:
    """Equal values, element for element, through nested tuples, lists, dicts and dataclasses
    of tensors and arrays."""
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same_values(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_values(p, q) for p, q in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b
