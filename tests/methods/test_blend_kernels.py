"""SLERP's and model stock's fused loops give the floats of the torch/numpy formulation.

The summation orders (:mod:`distmerge.methods.kernels.sum_orders`) are checked against numpy's
``np.add.reduce`` and the lane order's definition in plain Python; the statistics and blends
against the torch formulations (and SLERP's it replaced, kept here as ``old_*``), bit for bit, for
every compute dtype, 1-D and 3-D tensors, zero and parallel vectors, and row shards; and the
merged results against the published formulas in float64 (``test_methods_catalogue``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from distmerge.methods import get_method, reductions
from distmerge.methods.base import ShardContext
from distmerge.methods.kernels import sum_orders
from distmerge.methods.kernels.blend_loops import slerp_blend, slerp_sums
from distmerge.methods.kernels.rounding import stored_array
from distmerge.methods.model_stock import _blend, _gram, blend_reference, gram_reference, stock_t
from distmerge.methods.slerp import blend_dtype, slerp_coefficients
from tests.methods.test_kernels import same_bits
from tests.methods.test_methods_catalogue import ctx, params_for
from tests.methods.test_methods_catalogue import reductions as run_rounds

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [0, 1, 3, 7, 8, 9, 127, 128, 129, 1000, 4097, 65537, (1 << 20) + 13]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The engine's workers run one torch thread; torch's sum order depends on the count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def wide_values(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    v = g.standard_normal(n) * np.exp(4 * g.standard_normal(n))
    v[::7] = -0.0
    return v


@pytest.mark.parametrize("n", SIZES)
def test_pairwise_order_is_numpys(n):
    v = wide_values(n, n)
    starts, sizes = sum_orders.pairwise_spans(n)
    assert int(sizes.sum()) == n and (n == 0 or np.array_equal(starts, np.concatenate([[0], np.cumsum(sizes)[:-1]])))
    leaf = np.array([sum_orders.pw_block(v[s:s + z], z) for s, z in zip(starts, sizes, strict=True)])
    got = sum_orders.pairwise_combine(n, leaf)
    want = np.add.reduce(v)
    assert got == want and math.copysign(1, got) == math.copysign(1, want)


@pytest.mark.parametrize("n", SIZES)
def test_lane_order(n):
    """``lane_sum`` adds as its definition says, written here as plain Python floats: lane by
    lane from +0.0, the lanes in order, then the tail; row by row for last-dim vectors."""
    v = wide_values(n, n + 1)
    lanes = sum_orders.LANES

    def by_hand(w):
        whole = len(w) - len(w) % lanes
        acc = [0.0] * lanes
        for i in range(whole):
            acc[i % lanes] += float(w[i])
        total = 0.0
        for a in acc:
            total += a
        for i in range(whole, len(w)):
            total += float(w[i])
        return total

    if n <= 70000:
        got = float(sum_orders.lane_sum(torch.from_numpy(v)))
        want = by_hand(v)
        assert got == want and math.copysign(1, got) == math.copysign(1, want)
    rows = v[: (n // 37) * 37].reshape(-1, 37)[:50]
    if rows.size:
        assert sum_orders.lane_sum(torch.from_numpy(rows)).tolist() == [by_hand(r) for r in rows]


def pair(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = a + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


# ---- SLERP ------------------------------------------------------------------------------------

def old_slerp_partial(base, v1):
    return reductions.dot(base, v1), reductions.dot(base, base), reductions.dot(v1, v1)


def old_slerp_blend(base, v1, s0, s1):
    acc = blend_dtype(base.dtype)
    return (base.to(acc) * s0).add_(v1.to(acc) * s1).to(base.dtype)


def kernel_slerp(base, v1, s0, s1):
    acc = blend_dtype(base.dtype)
    kind = np.float64 if acc == torch.float64 else np.float32
    out = np.empty(base.numel(), dtype=kind)
    slerp_blend(stored_array(base), stored_array(v1), kind(s0), kind(s1), out)
    return torch.from_numpy(out).reshape(base.shape).to(base.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1,), (5,), (37, 19), (3, 5, 4), (300, 1000)], ids=str)
def test_slerp_kernels_equal_the_old_formulation(shape, dtype):
    base, v1 = pair(shape, dtype, seed=len(shape))
    sums = np.empty(3)
    slerp_sums(stored_array(base), stored_array(v1), sums)
    assert tuple(sums) == old_slerp_partial(base, v1)
    s0, s1 = slerp_coefficients(0.3, *sums[:1], math.sqrt(sums[1]), math.sqrt(sums[2]), blend_dtype(dtype))
    assert same_bits(kernel_slerp(base, v1, s0, s1), old_slerp_blend(base, v1, s0, s1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["zero", "parallel", "antiparallel", "orthogonal"])
def test_slerp_edge_vectors(case, dtype):
    """Zero norms (left unnormalised), |cos| > 0.9995 (the linear fallback), 90 degrees; the
    merge equals the old formulation and the published formula in float64."""
    shape = (64, 33)
    base, v1 = pair(shape, dtype, seed=4)
    if case == "zero":
        base = torch.zeros(shape, dtype=dtype)
    elif case == "parallel":
        v1 = (base.double() * 1.5).to(dtype)
    elif case == "antiparallel":
        v1 = (-base.double()).to(dtype)
    else:
        base, v1 = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        base[:, 1] = 1.0
        v1[:, 0] = 1.0
    params = params_for("slerp", 1, {"t": 0.35})
    m = get_method("slerp")
    reduced = run_rounds("slerp", base, [v1], params)
    got = m.merge(base, [v1], params, ctx(shape, 0, shape[0], n=1), reduced)
    s0, s1 = slerp_coefficients(0.35, reduced.dot, reduced.norm0, reduced.norm1, blend_dtype(dtype))
    assert same_bits(got, old_slerp_blend(base, v1, s0, s1))
    a, b = base.double().reshape(-1), v1.double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    cos = max(-1.0, min(1.0, float(a @ b) / (na if na > 1e-8 else 1.0) / (nb if nb > 1e-8 else 1.0)))
    if abs(cos) > 0.9995:
        want = 0.65 * base.double() + 0.35 * v1.double()
    else:
        th = math.acos(cos)
        want = (math.sin(0.65 * th) * base.double() + math.sin(0.35 * th) * v1.double()) / math.sin(th)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol)


# ---- model stock -------------------------------------------------------------------------------

def family(shape, dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    shared = 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
    xs = [base + shared + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    xs[0].reshape(-1)[::9] = base.reshape(-1)[::9]  # zero task-vector elements
    return base.to(dtype), [x.to(dtype) for x in xs]


CTX = ShardContext("t", (), 0, 1)  # rows in their compute dtype (ctx.compute None): the helpers read nothing else

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1,), (7,), (16,), (37, 19), (3, 5, 4), (40, 3), (9, 1), (256, 1024)], ids=str)
def test_stock_kernels_equal_the_torch_formulation(shape, n, dtype):
    base, xs = family(shape, dtype, n, seed=n + len(shape))
    whole = _gram(base, xs, rows=False, ctx=CTX)
    assert torch.equal(whole, gram_reference(base, xs, rows=False))
    t = stock_t(whole, dtype)
    assert same_bits(_blend(base, xs, t, CTX), blend_reference(base, xs, t))
    if len(shape) >= 2:
        rows = _gram(base, xs, rows=True, ctx=CTX)
        assert torch.equal(rows, gram_reference(base, xs, rows=True))
        t = stock_t(rows, dtype)
        assert same_bits(_blend(base, xs, t, CTX), blend_reference(base, xs, t.unsqueeze(-1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_stock_zero_task_vectors_keep_the_base(dtype):
    """Experts equal to the base: a zero Gram matrix, cos 0, t 0: the base comes back."""
    base, _ = family((16, 12), dtype, 2, seed=1)
    xs = [base.clone(), base.clone()]
    assert torch.equal(_gram(base, xs, rows=False, ctx=CTX), torch.zeros(2, 2, dtype=torch.float64))
    t = stock_t(_gram(base, xs, rows=False, ctx=CTX), dtype)
    assert same_bits(_blend(base, xs, t, CTX), blend_reference(base, xs, t))
    assert torch.equal(_blend(base, xs, t, CTX), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method,filter_wise", [("slerp", False), ("model_stock", False), ("model_stock", True)])
def test_same_bytes_in_any_row_blocks(method, filter_wise, dtype):
    shape = (45, 77)
    base, xs = family(shape, dtype, 1 if method == "slerp" else 3, seed=5)
    glob = {"t": 0.6} if method == "slerp" else {"filter_wise": filter_wise}
    params = params_for(method, len(xs), glob)
    m = get_method(method)
    reduced = run_rounds(method, base, xs, params, chunk_rows=6)
    whole = m.merge(base, xs, params, ctx(shape, 0, shape[0], n=len(xs)), reduced)
    for step in (1, 2, 7, 44):
        parts = [m.merge(base[a:a + step], [x[a:a + step] for x in xs], params,
                         ctx(shape, a, min(a + step, shape[0]), n=len(xs)), reduced) for a in range(0, shape[0], step)]
        assert same_bits(torch.cat(parts), whole), step
    assert torch.isfinite(whole).all()
