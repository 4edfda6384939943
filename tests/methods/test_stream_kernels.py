"""DARE's fused kernels against independent references: the SIMD Philox stream, the L1 sums.

:mod:`distmerge.methods.philox` runs many counters side by side. Its 64-bit stream must give
numpy's ``Philox(key=...).random_raw`` output for every position; its keep flags must be those
of Philox4x32-10 written from its definition (:mod:`tests.methods.keep_stream_reference`,
checked against Random123's published known answers), whatever block a position falls in. :mod:`distmerge.methods.kernels.l1_norms` sums ``CHAINS`` blocks side
by side; its sums must be those of the definition (each 1024-element block left to right from
+0.0, blocks in order), here computed with ``np.cumsum`` (a sequential float64 accumulation).
The merge that draws its mask block by block is checked against the torch formulation in
``test_kernels``; here, against the same merge cut into row blocks at awkward places.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distmerge.methods import get_method, kernels
from distmerge.methods.kernels.l1_norms import L1_BLOCK, abs_sums
from distmerge.methods.kernels.rounding import INF_KEY
from distmerge.methods.philox import (
    LANES,
    _batch32,
    fill_keep,
    fill_raw,
    fill_raw32,
    philox_scratch,
)
from distmerge.methods.random_stream import (
    _draws,
    _philox_block,
    bernoulli_mask,
    keep_stream,
    keep_threshold,
    keep_uniforms,
    stream_key,
)
from tests.methods.keep_stream_reference import (
    KNOWN_ANSWERS,
    WORD,
    della_uniforms,
    keep_outputs,
    philox4x32_block,
)
from tests.methods.test_kernels import same_bits
from tests.methods.test_methods_catalogue import ctx, params_for, reductions

KEY = stream_key(11, "model.layers.2.self_attn.q_proj.weight", 1)
BATCH = 4 * LANES  # draws per SIMD batch


def numpy_stream(start: int, count: int) -> np.ndarray:
    counter = np.array([start // 4, 0, 0, 0], dtype=np.uint64)
    return np.random.Philox(key=KEY, counter=counter).random_raw(start % 4 + count)[start % 4:]


def keep_stream_outputs(key: np.ndarray, start: int, count: int) -> np.ndarray:
    """The keep stream's 32-bit outputs ``start ..`` of the stream keyed ``key``."""
    return keep_outputs(int(key[0]), int(key[1]), start, count)


@pytest.mark.parametrize(("counter", "key", "want"), KNOWN_ANSWERS)
def test_philox4x32_gives_random123_known_answers(counter, key, want):
    """The reference, and the SIMD batch (counter words 0-1 are the block, 2-3 the stream key's
    second word), give the published outputs."""
    assert philox4x32_block(counter, key) == want
    state = philox_scratch()
    narrow = state.view(np.uint32)
    _batch32(np.uint64(key[0] | key[1] << 32), np.uint64(counter[2] | counter[3] << 32),
             np.uint64(counter[0] | counter[1] << 32), narrow)
    assert tuple(int(narrow[j, 0]) for j in range(4)) == want


@pytest.mark.parametrize("start", [0, 3, 2**32 * 4 - 5, 2**62 - 7])
def test_the_vectorized_reference_is_the_block_definition(start):
    """The tests' numpy formulation gives, element by element, the Python block's outputs (across
    a carry into the counter's high word too)."""
    k0, k1 = int(KEY[0]), int(KEY[1])
    got = keep_outputs(k0, k1, start, 37)
    for i in range(start, start + 37):
        n = i // 4
        block = philox4x32_block((n & WORD, n >> 32, k1 & WORD, k1 >> 32), (k0 & WORD, k0 >> 32))
        assert int(got[i - start]) == block[i % 4], i


@pytest.mark.parametrize("start", [0, 1, 2, 3, 5, BATCH - 1, BATCH, BATCH + 3, 10**6 + 1, 2**40 + 3, 2**62 - 7])
@pytest.mark.parametrize("count", [0, 1, 4, 7, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH + 5])
def test_philox_batches_equal_numpy(start, count):
    want = numpy_stream(start, count)
    raw = np.empty(count, dtype=np.uint64)
    fill_raw(KEY[0], KEY[1], start, raw, philox_scratch())
    assert np.array_equal(raw, want)


@pytest.mark.parametrize("start", [0, 1, 2, 3, 5, BATCH - 1, BATCH, BATCH + 3, 10**6 + 1, 2**40 + 3, 2**62 - 7])
@pytest.mark.parametrize("count", [0, 1, 4, 7, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH + 5])
def test_keep_flags_equal_the_philox4x32_reference(start, count):
    outputs = keep_stream_outputs(KEY, start, count)
    for p in (1e-9, 0.3, 0.5, 0.999999, 1.0):
        threshold = np.uint64(keep_threshold(p))
        keep = np.empty(count, dtype=np.bool_)
        fill_keep(KEY[0], KEY[1], np.uint64(start), threshold, keep, philox_scratch())  # uint64 start, as kernels pass it
        assert np.array_equal(keep, outputs < threshold)
        if p == 1.0:
            assert keep.all()


def test_philox_batch_equals_one_block_formulation():
    raw = np.empty(4 * 300, dtype=np.uint64)
    fill_raw(KEY[0], KEY[1], 0, raw, philox_scratch())
    for counter in (1, 2, 63, 64, 65, 300):
        block = _philox_block(np.uint64(counter), KEY[0], KEY[1])
        assert tuple(int(v) for v in block) == tuple(int(v) for v in raw[4 * (counter - 1):4 * counter])


def test_draws_keep_their_signature_and_outputs():
    """``random_stream._draws`` (called from other kernels) still fills raw outputs or flags."""
    raw = np.empty(1000, dtype=np.uint64)
    _draws(KEY[0], KEY[1], 77, np.uint64(0), False, raw, np.zeros(0, dtype=np.bool_))
    assert np.array_equal(raw, numpy_stream(77, 1000))
    keep = np.empty(1000, dtype=np.bool_)
    _draws(KEY[0], KEY[1], 77, np.uint64(2**31), True, np.zeros(0, dtype=np.uint64), keep)
    assert np.array_equal(keep, keep_stream_outputs(KEY, 77, 1000) < np.uint64(2**31))


def test_keep_flags_do_not_depend_on_the_block_cut():
    """Element i gets the same flag whichever block (and SIMD batch) it is drawn in."""
    threshold = np.uint64(keep_threshold(0.37))
    whole = np.empty(5000, dtype=np.bool_)
    fill_keep(KEY[0], KEY[1], 123, threshold, whole, philox_scratch())
    for cut in (1, 3, 255, 256, 257, 2048, 2049):
        pieces = np.empty_like(whole)
        state = philox_scratch()
        for s in range(0, whole.size, cut):
            fill_keep(KEY[0], KEY[1], 123 + s, threshold, pieces[s:s + cut], state)
        assert np.array_equal(pieces, whole), cut


def test_bernoulli_mask_is_the_stream_threshold_rule():
    shape = (37, 41)
    mask = bernoulli_mask(11, "model.layers.2.self_attn.q_proj.weight", 1, 999, shape, 0.42)
    want = keep_stream_outputs(KEY, 999, 37 * 41) < np.uint64(int(0.42 * 2.0**32))
    assert torch.equal(mask.reshape(-1), torch.from_numpy(want))
    st = keep_stream(11, "model.layers.2.self_attn.q_proj.weight", 1, 999, 37 * 41, 0.42)
    assert (st.key0, st.key1, st.start, st.threshold) == (int(KEY[0]), int(KEY[1]), 999, int(0.42 * 2.0**32))
    assert bernoulli_mask(11, "t", 1, 0, (5, 7), 1.0).all()
    assert keep_threshold(1.0) == keep_threshold(1.5) == 2**32 and keep_threshold(0.0) == 0


# ---- the L1 sums -------------------------------------------------------------------------------

def reference_abs_sums(delta: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """The definition: per 1024-element block, sequential float64 sums from +0.0; blocks in order."""
    mags = np.abs(delta.astype(np.float64))
    before = after = 0.0
    for s in range(0, mags.size, L1_BLOCK):
        block = mags[s:s + L1_BLOCK]
        before += float(np.cumsum(np.concatenate([[0.0], block]))[-1])
        after += float(np.cumsum(np.concatenate([[0.0], np.where(keep[s:s + L1_BLOCK], block, 0.0)]))[-1])
    return before, after


def deltas(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    x = base + torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(3 * torch.randn(n, generator=g,
                                                                                            dtype=torch.float64))
    x[::5] = base[::5]  # exact zeros
    return base.to(dtype), x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n", [0, 1, 1000, L1_BLOCK, 8 * L1_BLOCK, 8 * L1_BLOCK + 1, 3 * 8 * L1_BLOCK + 4321])
def test_abs_sums_equal_the_definition(n, dtype):
    base, x = deltas(n, dtype, seed=n % 97)
    delta = (x - base).to(torch.float64).numpy()  # the compute-dtype delta, exactly
    start = 3 * n + 1
    st = keep_stream(11, "model.layers.2.self_attn.q_proj.weight", 1, start, n, 0.3)
    keep = bernoulli_mask(11, "model.layers.2.self_attn.q_proj.weight", 1, start, (n,), 0.3).numpy()
    want = reference_abs_sums(delta, keep)
    args = kernels.delta_arrays(base, x)
    assert abs_sums(*args, kernels.NO_LOW, kernels.NO_HIGH, None, st) == want
    assert abs_sums(*args, kernels.NO_LOW, kernels.NO_HIGH, keep) == want
    everything = reference_abs_sums(delta, np.ones(n, dtype=np.bool_))
    assert abs_sums(*args, kernels.NO_LOW, kernels.NO_HIGH, None) == everything


def test_abs_sums_key_window_and_nonfinite():
    """TIES' key window ([lo, hi) on the float32 bits of |d|) and NaN/inf add as in the definition."""
    base, x = deltas(3 * 8 * L1_BLOCK + 17, torch.float32, seed=3)
    x[100] = float("inf")
    x[20000] = float("nan")
    delta = (x - base).numpy()
    keys = np.abs(delta).view(np.int32).astype(np.int64)
    lo, hi = int(np.quantile(keys, 0.3)), int(np.quantile(keys, 0.9))
    got = abs_sums(*kernels.delta_arrays(base, x), lo, hi, None)
    want = reference_abs_sums(delta, (keys >= lo) & (keys < hi))
    assert np.isnan(got[0]) and np.isnan(want[0])
    assert got[1] == want[1]  # the NaN key is above hi: not kept


EDGE_KEYS = [0, 1, 0x3C000000, 0x3C000001, 0x7F7FFFFF, INF_KEY, 0x7FC00000, 0x7FFFFFFF]
EDGE_BOUNDS = [kernels.NO_LOW, 0, 1, 0x3C000000, 0x3C000001, INF_KEY, 0x7FC00000, 0x7FFFFFFF,
               1 << 31, kernels.NO_HIGH, kernels.KEEP_NOTHING]


@pytest.mark.parametrize("lo", EDGE_BOUNDS)
def test_key_windows_at_every_edge_keep_what_python_ints_keep(lo):
    """The loops test keys against int32 bounds (``rounding.key_bounds``), the thresholds are
    Python ints beyond int32 at "no bound": every ``[lo, hi)`` keeps exactly the keys the
    64-bit comparison keeps, at zero, at and beside a key, at +Inf's key, at NaN keys (the
    largest, 0x7FFFFFFF, included) and with no key inside. Checked in the task-vector merge
    (kept deltas reach the output, the rest are multiplied by 0) and in the L1 sums."""
    keys = np.array(EDGE_KEYS * 300, dtype=np.uint32)
    base = np.random.default_rng(lo % 1009).standard_normal(keys.size).astype(np.float32)
    signs = np.where(np.arange(keys.size) % 2 == 0, 0, 0x80000000).astype(np.uint32)
    delta = (keys | signs).view(np.float32)
    x = base + delta
    d = x - base  # the kernel's delta (NaN payloads and roundings included); its keys decide
    got_keys = np.abs(d).view(np.int32).astype(np.int64)
    one, scalar_one = np.ones(1, dtype=np.float32), np.array(1.0, dtype=np.float32)
    for hi in EDGE_BOUNDS:
        keep = (got_keys >= lo) & (got_keys < hi)
        out = kernels.task_vectors(base, [x], kernels.NATIVE, low=[lo], high=[hi], masks=[None],
                                   rescale_kind=[kernels.RESCALE_NONE], rescale=one, probs=[None], weights=one,
                                   consensus=False, normalize=False, total_weight=scalar_one, lam=scalar_one)
        with np.errstate(invalid="ignore"):  # Inf and NaN deltas times 0, as the kernel multiplies
            want = base + (np.float32(0.0) + d * keep.astype(np.float32))
        assert same_bits(torch.from_numpy(out), torch.from_numpy(want)), (hex(lo), hex(hi))
        sums = abs_sums(base, x, kernels.NATIVE, lo, hi, None)
        assert np.array_equal(sums, reference_abs_sums(d, keep), equal_nan=True), (hex(lo), hex(hi))


# ---- the merge, drawing its mask block by block -----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name,glob", [("dare_linear", {}), ("dare_ties", {"rescale_mode": "inverse_density"}),
                                       ("dare_ties", {"rescale": False})])
def test_dare_merge_same_bytes_in_any_row_blocks(name, glob, dtype):
    """Row blocks that cut the kernel's 2048-element blocks and the 256-draw SIMD batches at
    odd places give the bytes of one whole-tensor merge, equal to the torch formulation."""
    shape = (29, 333)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = [(base.double() + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(2)]
    params = params_for(name, 2, glob, [{"weight": 0.7, "density": 0.35}, {"weight": 0.4, "density": 0.8}])
    reduced = reductions(name, base, xs, params, seed=9)
    m = get_method(name)
    whole = m.merge(base, xs, params, ctx(shape, 0, shape[0], 9, 2), reduced)
    assert same_bits(whole, m.merge_reference(base, xs, params, ctx(shape, 0, shape[0], 9, 2), reduced))
    for step in (1, 4, 7, 13):
        parts = [m.merge(base[a:a + step], [x[a:a + step] for x in xs], params,
                         ctx(shape, a, min(a + step, shape[0]), 9, 2), reduced) for a in range(0, shape[0], step)]
        assert same_bits(torch.cat(parts), whole), step


def test_dare_one_dimensional_tensor():
    base, x = deltas(5000, torch.float32, seed=1)
    params = params_for("dare_linear", 1, {}, {"weight": 1.0, "density": 0.25})
    reduced = reductions("dare_linear", base, [x], params, seed=2)
    m = get_method("dare_linear")
    c = ctx((5000,), 0, 5000, 2, 1)
    assert same_bits(m.merge(base, [x], params, c, reduced), m.merge_reference(base, [x], params, c, reduced))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9])
def test_keep_flags_are_independent_bernoulli_draws(p):
    """Over 2^20 elements: the kept share is p; neighbours (in one block and across blocks), two
    models' streams and two seeds' streams are kept together p^2 of the time (each within 6
    standard errors)."""
    n = 1 << 20
    flags = {}
    for seed, model in ((0, 0), (0, 1), (1, 0)):
        flags[seed, model] = bernoulli_mask(seed, "model.layers.0.mlp.up_proj.weight", model, 0, (n,), p).numpy()
    a = flags[0, 0]

    def check(share: float, want: float, count: int) -> None:
        assert abs(share - want) < 6 * np.sqrt(want * (1 - want) / count), (share, want)

    check(a.mean(), p, n)
    for lag in (1, 4, 256):  # the next output of a block, the next block, the next SIMD batch
        check((a[:-lag] & a[lag:]).mean(), p * p, n - lag)
    check((a & flags[0, 1]).mean(), p * p, n)
    check((a & flags[1, 0]).mean(), p * p, n)


@pytest.mark.parametrize("start", [0, 1, 3, BATCH - 1, BATCH + 3, 10**6 + 1, 2**62 - 7])
@pytest.mark.parametrize("count", [0, 1, 7, BATCH, 3 * BATCH + 5])
def test_della_uniforms_are_the_keep_streams_outputs(start, count):
    """DELLA's draws: the keep stream's 32-bit outputs (the SIMD fill) times 2**-32."""
    raw = np.empty(count, dtype=np.uint32)
    fill_raw32(KEY[0], KEY[1], np.uint64(start), raw, philox_scratch())
    assert np.array_equal(raw.astype(np.uint64), keep_stream_outputs(KEY, start, count))
    name = "model.layers.2.self_attn.q_proj.weight"
    got = keep_uniforms(11, name, 1, start, count)
    assert got.dtype == np.float64 and np.array_equal(got, della_uniforms(11, name, 1, start, count))


def test_keys_may_come_as_python_ints():
    """A key passed as a Python int (int64 in numba) gives the uint64 key's draws: mixed with
    uint64 arithmetic it would have become float64 and not compiled."""
    k0, k1 = int(KEY[0]) >> 2, int(KEY[1]) >> 2  # below 2**63: a Python int numba takes as int64
    got = np.empty(300, dtype=np.uint32)
    fill_raw32(k0, k1, 5, got, philox_scratch())
    assert np.array_equal(got.astype(np.uint64), keep_outputs(k0, k1, 5, 300))
    keep = np.empty(300, dtype=np.bool_)
    fill_keep(k0, k1, 5, 2**31, keep, philox_scratch())
    assert np.array_equal(keep, keep_outputs(k0, k1, 5, 300) < np.uint64(2**31))
