"""Every merge method against an independent whole-tensor reference of its published math,
and bit-identical under any row sharding (reduction rounds over canonical chunks, then
merge() on arbitrary row shards). No Ray, no I/O."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from distmerge.errors import ConfigError
from distmerge.methods import METHODS, get_method
from distmerge.methods.base import ShardContext, TensorParams, chunk_read
from distmerge.methods.random_stream import raw_draws
from distmerge.methods.selection import DeltaKeys, dense_low, locate, magnitude_keys
from distmerge.methods.sparsification.rounds import Bound
from tests.methods.keep_stream_reference import dare_keep, della_uniforms

NAME = "model.layers.1.mlp.down_proj.weight"
SHAPES = [(37, 19), (5,), (1, 7), (3, 5, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHUNK_ROWS = 4  # the "canonical" reduction chunk of these tests (plan derives its own from the shape)


# ---- harness: what the engine does, without the engine -----------------------------------

def make_inputs(shape, n, dtype=torch.float32, seed=0, scale=0.1):
    """Base and ``n`` experts stored in ``dtype``, returned in the fp32 compute dtype."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype).float(), [x.to(dtype).float() for x in xs]


def params_for(name, n, glob=None, model=None):
    """Defaults, then ``glob`` (validated as the config's would be) and per-model values."""
    m = get_method(name)
    g = {k: s.default for k, s in m.global_parameters.items()} | (glob or {})
    for k, v in g.items():
        g[k] = m.global_parameters[k].validate(v, f"parameters.{k}")
    models = model if isinstance(model, list) else [model or {}] * n
    ex = tuple({k: s.default for k, s in m.model_parameters.items()} | mp for mp in models)
    p = TensorParams(g, ex)
    m.validate(p, "test")
    return p


def _rows(shape):
    return shape[0] if shape else 1


def ctx(shape, r0, r1, seed=0, n=2, compute=None):
    return ShardContext(NAME, shape, r0, r1, seed, tuple(range(n)), compute)


def reductions(name, base, xs, params, seed=0, chunk_rows=CHUNK_ROWS, every_chunk=False, reads=None, compute=None):
    """The reduction rounds over canonical chunks of ``chunk_rows`` rows. As the engine runs
    them, a round reads only the chunks the previous reduction names (``chunk_read``) and is
    skipped when it names none; ``every_chunk`` reads every chunk in every round instead (what
    the methods must tolerate). ``reads``, a list, receives each round read and its chunks.
    ``compute``: the compute dtype when the rows come as stored (``ShardContext.compute``)."""
    m = get_method(name)
    shape = tuple(base.shape)
    reduced = None
    for r in range(m.reduction_rounds(params)):
        parts = []
        chunks = [(a, min(_rows(shape), a + chunk_rows)) for a in range(0, _rows(shape), chunk_rows)]
        if not every_chunk:
            chunks = [(a, b) for a, b in chunks if chunk_read(reduced, r, a, b)]
        if not chunks:
            continue
        for a, b in chunks:
            parts.append(m.partial_reductions(base[a:b], [x[a:b] for x in xs], params,
                                              ctx(shape, a, b, seed, len(xs), compute), r, reduced))
        if reads is not None:
            reads.append((r, chunks))
        reduced = m.reduce(parts, params, shape, r, reduced)
    return reduced


def kth_largest_key(delta, rank):
    """Whole-tensor key of the ``rank``-th largest ``|delta|``: both selection rounds on one chunk."""
    keys = DeltaKeys(torch.zeros_like(delta), delta)
    bucket, residual = locate(keys.high_histogram(), rank)
    low, _ = locate(dense_low([keys.low_histogram(bucket)]), residual)
    return (bucket << 16) | low


def merge_sharded(name, base, xs, params, reduced, step, seed=0, compute=None):
    """merge() on row shards of ``step`` rows (the base is dropped for methods without one);
    ``compute`` as in :func:`reductions`."""
    m = get_method(name)
    shape = tuple(xs[0].shape)
    out = []
    for a in range(0, _rows(shape), step):
        b = min(_rows(shape), a + step)
        rows = base[a:b] if m.uses_base else None
        out.append(m.merge(rows, [x[a:b] for x in xs], params, ctx(shape, a, b, seed, len(xs), compute), reduced))
    return torch.cat(out)


def torch_and_fused(module, name, base, xs, params, chunk_rows, steps, monkeypatch):
    """(reductions, merges per step of ``steps`` rows) of method ``name`` by its torch
    formulation (``module._fused`` made False), then by its fused loops (``module._fused``)."""
    fused = module._fused
    out = []
    for choice in (lambda *rows_and_ctx: False, fused):
        monkeypatch.setattr(module, "_fused", choice)
        reduced = reductions(name, base, xs, params, chunk_rows=chunk_rows)
        out.append((reduced, [merge_sharded(name, base, xs, params, reduced, step) for step in steps]))
    return out


def run_method(name, base, xs, params, seed=0):
    """Reduction rounds over the test's canonical chunks, then one whole-tensor merge()."""
    reduced = reductions(name, base, xs, params, seed)
    return merge_sharded(name, base, xs, params, reduced, _rows(tuple(xs[0].shape)), seed)


# ---- independent references (whole tensors, plain torch, float64 where it helps) ------------

def rank_order(delta):
    """Flat indices by |delta| (as float32) descending, equal magnitudes by lower index first:
    the documented total order of magnitude selection."""
    return torch.sort(delta.abs().reshape(-1).float(), descending=True, stable=True).indices


def ref_topk_mask(delta, density):
    """Keep exactly k = max(1, int(density * numel)) elements, the first k of :func:`rank_order`."""
    flat = delta.abs().reshape(-1)
    k = max(1, int(density * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[rank_order(delta)[:k]] = True
    if len(torch.unique(flat)) == flat.numel():  # no ties: exactly torch.topk's elements
        top = torch.zeros(flat.numel(), dtype=torch.bool)
        top[torch.topk(flat, k).indices] = True
        assert torch.equal(mask, top)
    return mask.reshape(delta.shape)


def _breadcrumbs_counts(n, density, gamma):
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return target, n_top, n_bot


def ref_breadcrumbs_positional(delta, density, gamma):
    """mergekit's magnitude_outliers on an ascending sort, with n_top = 0 keeping the top."""
    n = delta.numel()
    _, n_top, n_bot = _breadcrumbs_counts(n, density, gamma)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot:n - n_top]] = True
    return mask.reshape(delta.shape)


def ref_breadcrumbs_mask(delta, density, gamma):
    """The documented rule: keep ranks n_top .. n_top + target - 1 (0-based) of :func:`rank_order`."""
    n = delta.numel()
    target, n_top, _ = _breadcrumbs_counts(n, density, gamma)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rank_order(delta)[n_top:n_top + target]] = True
    mask = mask.reshape(delta.shape)
    if delta.dtype == torch.float32 and len(torch.unique(delta.abs())) == n:
        assert torch.equal(mask, ref_breadcrumbs_positional(delta, density, gamma))
    return mask


def ref_dare_mask(delta, density, seed, model):
    return torch.from_numpy(dare_keep(seed, NAME, model, 0, delta.numel(), density)).reshape(delta.shape)


def ref_della_probs(delta, density, eps):
    x = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(x.abs(), dim=1, stable=True), dim=1).float() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return ((density - eps) + norm * 2 * eps).reshape(delta.shape)


def ref_della_mask(delta, density, eps, seed, model):
    u = della_uniforms(seed, NAME, model, 0, delta.numel())
    probs = ref_della_probs(delta, density, eps)
    return torch.from_numpy(u).reshape(delta.shape) < probs.double(), probs


def ref_task_vectors(base, xs, weights, kept, consensus, normalize, lam):
    wd = [k.double() * w for k, w in zip(kept, weights, strict=True)]
    if consensus:
        sign = torch.where(sum(wd) >= 0, 1.0, -1.0)
        masks = [torch.sign(d) == sign for d in wd]
        mixed = sum(d * m for d, m in zip(wd, masks, strict=True))
        div = sum(w * m.double() for w, m in zip(weights, masks, strict=True))
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed = sum(wd)
        div = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / div
    return base.double() + lam * mixed


def l1_rescale(delta, kept):
    before, after = delta.double().abs().sum(), kept.double().abs().sum()
    return kept.double() * (before / after) if before >= 1e-7 and after >= 1e-7 else kept.double()


def close(got, want):
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-5, atol=2e-6)


# ---- reference equality ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method,consensus", [("ties", True), ("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_magnitude_methods_match_reference(method, consensus, shape, dtype):
    base, xs = make_inputs(shape, 3, dtype, seed=3)
    weights, dens, gamma = [0.7, 0.4, -0.3], [0.5, 0.3, 0.8], 0.1
    model = [{"weight": w, "density": d} | ({"gamma": gamma} if "bread" in method else {})
             for w, d in zip(weights, dens, strict=True)]
    for normalize in (True, False):
        params = params_for(method, 3, {"normalize": normalize, "lambda": 0.9}, model)
        got = run_method(method, base, xs, params)
        deltas = [x - base for x in xs]
        if method == "ties":
            kept = [d * ref_topk_mask(d, p) for d, p in zip(deltas, dens, strict=True)]
        else:
            kept = [d * ref_breadcrumbs_mask(d, p, gamma) for d, p in zip(deltas, dens, strict=True)]
        close(got, ref_task_vectors(base, xs, weights, kept, consensus, normalize, 0.9))


def test_radix_threshold_equals_topk_on_continuous_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4099, generator=g) * torch.rand(4099, generator=g).pow(8)
    keys = magnitude_keys(x)
    for k in (1, 2, 17, 2048, 4098, 4099):
        thr = kth_largest_key(x, k)
        mask = keys >= thr
        top = torch.zeros(4099, dtype=torch.bool)
        top[torch.topk(x.abs(), k).indices] = True
        assert torch.equal(mask, top), k


def test_ties_keeps_exactly_k_ties_broken_by_position():
    """Documented rule: exactly k elements; of the ties at the k-th magnitude, the lowest flat
    indices are kept, whatever the sharding and chunking."""
    base = torch.zeros(6, 2)
    x = torch.tensor([[3.0, 1.0], [1.0, 1.0], [0.5, 2.0], [1.0, 0.1], [0.0, 0.2], [1.0, 0.3]])
    params = params_for("ties", 1, model={"weight": 1.0, "density": 0.25})  # k = 3: 3, 2, the first 1.0
    want = torch.zeros_like(x)
    want[0, 0], want[0, 1], want[2, 1] = 3.0, 1.0, 2.0
    for chunk in (1, 2, 6):
        reduced = reductions("ties", base, [x], params, chunk_rows=chunk)
        for step in (1, 2, 3, 6):
            assert torch.equal(merge_sharded("ties", base, [x], params, reduced, step), want), (chunk, step)


SELECTION_PATHS = ["speculative", "round0-threshold", "round1-threshold"]


def force_selection_path(path, monkeypatch):
    """Make the threshold known after the speculative round (as usual), or only after the
    radix rounds' round 0 (its windows) or round 1 (the low bits), as chunks unlike each other do."""
    if path != "speculative":
        monkeypatch.setattr("distmerge.methods.selection.resolve_windows", lambda parts, rank: None)
    if path == "round1-threshold":
        monkeypatch.setattr("distmerge.methods.selection.speculative_low", lambda parts, bucket: None)


@pytest.mark.parametrize("every_chunk", [False, True], ids=["engine-reads", "every-chunk"])
@pytest.mark.parametrize("path", SELECTION_PATHS)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
@pytest.mark.parametrize("shape", [(64, 48), (3001,)], ids=str)
def test_magnitude_keeps_exact_count_with_many_ties(method, shape, path, every_chunk, monkeypatch):
    """bfloat16 deltas repeat magnitudes often; the kept count is still exactly the configured
    one, and the kept set is the reference order's under every chunking and sharding, whether
    the threshold is known after the speculative round (ties counted in the cut's chunk only),
    after round 0 (ties counted in round 1) or after round 1 (ties counted in the TIES round),
    and whether the rounds read only the chunks they name or every chunk."""
    force_selection_path(path, monkeypatch)
    g = torch.Generator().manual_seed(9)
    base = torch.zeros(shape)
    x = (torch.randint(-6, 7, shape, generator=g).float() / 4).to(torch.bfloat16).float()
    model = {"weight": 1.0, "density": 0.3} | ({"gamma": 0.05} if method == "breadcrumbs" else {})
    params = params_for(method, 1, model=model)
    mask = ref_topk_mask(x, 0.3) if method == "ties" else ref_breadcrumbs_mask(x, 0.3, 0.05)
    want = x * mask
    for chunk in (1, 7, shape[0]):
        reduced = reductions(method, base, [x], params, chunk_rows=chunk, every_chunk=every_chunk)
        for step in (5, shape[0]):
            got = merge_sharded(method, base, [x], params, reduced, step)
            assert torch.equal(got, want), (chunk, step)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_speculative_thresholds_read_only_the_cut_chunks(method):
    """With the thresholds from the speculative round, the tie round reads the chunk where each
    cut falls and nothing else, and the radix rounds are skipped; the kept set is the reference's."""
    g = torch.Generator().manual_seed(12)
    base = torch.zeros(64, 4096)  # chunks of 64K elements: windows as narrow as a model's
    x = (torch.randn((64, 4096), generator=g) * 0.01).to(torch.bfloat16).float()  # bf16: ties at every value
    model = {"weight": 1.0, "density": 0.3} | ({"gamma": 0.05} if method == "breadcrumbs" else {})
    params = params_for(method, 1, model=model)
    want = x * (ref_topk_mask(x, 0.3) if method == "ties" else ref_breadcrumbs_mask(x, 0.3, 0.05))
    reads = []
    reduced = reductions(method, base, [x], params, chunk_rows=16, reads=reads)
    assert reduced.speculated and reduced.complete and reduced.tie_need[0]
    assert [r for r, _ in reads] == [0, 1]  # the speculative round, then the tie round
    assert len(reads[0][1]) == 4
    cut_chunks = {chunk[:2] for named in reduced.tie_chunks.values() for chunk in named.values()}
    assert set(reads[1][1]) == cut_chunks and 1 <= len(cut_chunks) <= (2 if method == "breadcrumbs" else 1)
    assert torch.equal(merge_sharded(method, base, [x], params, reduced, 5), want)


def test_a_cut_at_a_chunk_end_needs_no_tie_round():
    """When the ties inside end exactly where a chunk ends, the speculative round knows the cut."""
    big, tie, small = 1.03125, 1.0078125, 1.0  # adjacent bfloat16 values: keys a few buckets apart
    base = torch.zeros(4, 4)
    x = torch.tensor([[big, tie, small, small], [tie, tie, small, small], [tie, small, small, small],
                      [tie, small, small, small]])
    params = params_for("ties", 1, model={"weight": 1.0, "density": 0.25})  # k = 4: big and the first three ties
    reads = []
    reduced = reductions("ties", base, [x], params, chunk_rows=2, reads=reads)
    assert [r for r, _ in reads] == [0] and reduced.speculated and reduced.complete
    assert reduced.tie_cuts[0] == {Bound.LOW: (2, 0)}
    want = torch.zeros_like(x)
    want[0, 0], want[0, 1], want[1, 0], want[1, 1] = big, tie, tie, tie
    for step in (1, 3, 4):
        assert torch.equal(merge_sharded("ties", base, [x], params, reduced, step), want)


def test_breadcrumbs_with_zero_gamma_keeps_the_top():
    base, xs = make_inputs((10, 10), 1, seed=4)
    params = params_for("breadcrumbs", 1, model={"weight": 1.0, "density": 0.2, "gamma": 0.0})
    got = run_method("breadcrumbs", base, xs, params)
    delta = xs[0] - base
    assert int((got != base).sum()) == 20  # mergekit 0.1.x's [n_bot:-0] slice kept nothing
    close(got, base + delta * ref_topk_mask(delta, 0.2))


@pytest.mark.parametrize("rescale_mode", ["l1", "inverse_density"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
def test_dare_matches_reference(method, consensus, shape, dtype, rescale_mode):
    base, xs = make_inputs(shape, 2, dtype, seed=6)
    weights, dens = [0.6, 0.5], [0.4, 0.7]
    params = params_for(method, 2, {"rescale_mode": rescale_mode},
                        [{"weight": w, "density": d} for w, d in zip(weights, dens, strict=True)])
    got = run_method(method, base, xs, params, seed=11)
    kept = []
    for i, (x, d) in enumerate(zip(xs, dens, strict=True)):
        delta = x - base
        k = delta * ref_dare_mask(delta, d, 11, i)
        kept.append(l1_rescale(delta, k) if rescale_mode == "l1" else k.double() / d)
    close(got, ref_task_vectors(base, xs, weights, kept, consensus, False, 1.0))


@pytest.mark.parametrize("rescale_mode", ["l1", "inverse_density"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method,consensus", [("della", True), ("della_linear", False)])
def test_della_matches_reference(method, consensus, shape, dtype, rescale_mode):
    base, xs = make_inputs(shape, 2, dtype, seed=7)
    weights, dens, eps = [0.6, 0.5], [0.4, 0.6], [0.1, 0.3]
    params = params_for(method, 2, {"rescale_mode": rescale_mode, "lambda": 1.1},
                        [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, dens, eps, strict=True)])
    got = run_method(method, base, xs, params, seed=5)
    kept = []
    for i, (x, d, e) in enumerate(zip(xs, dens, eps, strict=True)):
        delta = x - base
        mask, probs = ref_della_mask(delta, d, e, 5, i)
        k = delta * mask
        kept.append(l1_rescale(delta, k) if rescale_mode == "l1" else k.double() / probs.double())
    close(got, ref_task_vectors(base, xs, weights, kept, consensus, method == "della", 1.1))


def test_della_1d_ranks_over_the_whole_vector():
    """A 1-D tensor is one row (as mergekit's unsqueeze): probabilities span the whole vector."""
    base, xs = make_inputs((50,), 1, seed=8)
    params = params_for("della_linear", 1, {"rescale": False}, {"weight": 1.0, "density": 0.5, "epsilon": 0.4})
    got = merge_sharded("della_linear", base, xs, params, reductions("della_linear", base, xs, params), 1)
    delta = xs[0] - base
    mask, probs = ref_della_mask(delta, 0.5, 0.4, 0, 0)
    assert float(probs.min()) == pytest.approx(0.1) and float(probs.max()) == pytest.approx(0.9)
    close(got, base + delta * mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_task_arithmetic_and_linear_match_reference(shape, dtype):
    base, xs = make_inputs(shape, 3, dtype, seed=9)
    w = [0.5, 1.5, -0.25]
    params = params_for("task_arithmetic", 3, {"normalize": True, "lambda": 0.8}, [{"weight": v} for v in w])
    close(run_method("task_arithmetic", base, xs, params),
          ref_task_vectors(base, xs, w, [x - base for x in xs], False, True, 0.8))
    params = params_for("linear", 3, {}, [{"weight": v} for v in w])
    close(run_method("linear", base, xs, params), sum(x.double() * v for x, v in zip(xs, w, strict=True)) / sum(w))


def ref_slerp(t, v0, v1):
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    dot = float(((a / na) * (b / nb)).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * v0.double() + t * v1.double()
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0.double() + math.sin(t * theta) * v1.double()) / math.sin(theta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_reference(shape, dtype, t):
    base, xs = make_inputs(shape, 1, dtype, seed=10, scale=1.0)  # a real angle
    params = params_for("slerp", 1, {"t": t})
    close(run_method("slerp", base, xs, params), ref_slerp(t, base, xs[0]))
    near = [base + 1e-4 * (xs[0] - base)]  # |cos| > 0.9995: linear interpolation
    close(run_method("slerp", base, near, params), (1 - t) * base.double() + t * near[0].double())


def ref_model_stock(base, xs, filter_wise):
    w0 = base.double()
    ws = [x.double() for x in xs]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    off = [w - w0 for w in ws]
    cos = []
    for i in range(len(off)):
        for j in range(i + 1, len(off)):
            c = (off[i] * off[j]).sum(-1) / (off[i].norm(dim=-1) * off[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(shape, dtype, filter_wise):
    base, xs = make_inputs(shape, 3, dtype, seed=12)
    g = torch.Generator().manual_seed(13)
    shared = 0.05 * torch.randn(shape, generator=g)  # correlated task vectors: a positive cosine
    xs = [(x + shared).to(dtype).float() for x in xs]
    params = params_for("model_stock", 3, {"filter_wise": filter_wise})
    close(run_method("model_stock", base, xs, params), ref_model_stock(base, xs, filter_wise))


def test_passthrough_scales_the_one_model():
    _, xs = make_inputs((4, 3), 1)
    params = params_for("passthrough", 1, model={"scale": 0.5})
    assert torch.equal(get_method("passthrough").merge(None, xs, params, ctx((4, 3), 0, 4, n=1)), xs[0] * 0.5)


# ---- shard invariance --------------------------------------------------------------------

CASES = [
    ("linear", {}, {"weight": 0.7}, 2),
    ("task_arithmetic", {"lambda": 0.7, "normalize": True}, {"weight": 0.6}, 2),
    ("ties", {}, {"weight": 0.6, "density": 0.35}, 3),
    ("ties", {"rescale": True}, {"weight": 0.6, "density": 0.35}, 2),
    ("dare_linear", {}, {"weight": 0.6, "density": 0.35}, 2),
    ("dare_ties", {"rescale_mode": "inverse_density"}, {"weight": 0.6, "density": 0.35}, 3),
    ("breadcrumbs", {}, {"weight": 0.6, "density": 0.35, "gamma": 0.05}, 2),
    ("breadcrumbs_ties", {"rescale": True}, {"weight": 0.6, "density": 0.35, "gamma": 0.05}, 2),
    ("della", {}, {"weight": 0.6, "density": 0.35, "epsilon": 0.2}, 2),
    ("della_linear", {"rescale": False}, {"weight": 0.6, "density": 0.35, "epsilon": 0.2}, 2),
    ("della_linear", {"rescale_mode": "inverse_density"}, {"weight": 0.6, "density": 0.35, "epsilon": 0.2}, 2),
    ("slerp", {"t": 0.35}, {}, 1),
    ("model_stock", {}, {}, 3),
    ("model_stock", {"filter_wise": True}, {}, 2),
    ("passthrough", {}, {"scale": 1.5}, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(64, 300)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "-" + "-".join(f"{k}={v}" for k, v in c[1].items()))
def test_bit_identical_across_shard_sizes(case, shape, dtype):
    name, glob, model, n = case
    base, xs = make_inputs(shape, n, dtype, seed=14, scale=0.3)
    params = params_for(name, n, glob, model)
    reduced = reductions(name, base, xs, params, seed=3)
    whole = merge_sharded(name, base, xs, params, reduced, _rows(shape), seed=3)
    for step in (1, 2, 3, 5, 7):
        assert torch.equal(merge_sharded(name, base, xs, params, reduced, step, seed=3), whole), (name, step)
    assert torch.isfinite(whole).all()


def test_integer_reductions_do_not_depend_on_the_chunking():
    base, xs = make_inputs((41, 13), 2, seed=15)
    params = params_for("breadcrumbs_ties", 2, {}, {"weight": 1.0, "density": 0.3, "gamma": 0.02})
    a = reductions("breadcrumbs_ties", base, xs, params, chunk_rows=1)
    b = reductions("breadcrumbs_ties", base, xs, params, chunk_rows=41)
    assert a.thresholds == b.thresholds


# ---- the random stream -------------------------------------------------------------------

def test_philox_offsets_are_element_positions():
    """numpy's Philox: advance(n) moves the counter by n blocks of 4 outputs; our jump is exact."""
    whole = raw_draws(7, NAME, 1, 0, 64)
    for start in (0, 1, 3, 4, 5, 33):
        assert np.array_equal(raw_draws(7, NAME, 1, start, 64 - start), whole[start:])
    key = np.frombuffer(hashlib.blake2b(f"distmerge\x00{7}\x00{NAME}\x00{1}".encode(), digest_size=16).digest(),
                        dtype="<u8").copy()
    gen = np.random.Philox(key=key)
    gen.advance(3)
    assert np.array_equal(gen.random_raw(4), whole[12:16])


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_random_masks_seeded_and_statistically_right(method):
    shape, density = (200, 150), 0.3
    base, xs = make_inputs(shape, 1, seed=16)
    extra = {"epsilon": 0.1} if "della" in method else {}
    params = params_for(method, 1, {"rescale": False}, {"weight": 1.0, "density": density} | extra)
    a = run_method(method, base, xs, params, seed=1)
    assert torch.equal(a, run_method(method, base, xs, params, seed=1))
    b = run_method(method, base, xs, params, seed=2)
    kept_a, kept_b = a != base, b != base
    assert not torch.equal(kept_a, kept_b)
    n = kept_a.numel()
    sigma = math.sqrt(density * (1 - density) / n)
    for kept in (kept_a, kept_b):
        assert abs(kept.float().mean().item() - density) < 5 * sigma
        assert abs(kept.float().mean().item() - (kept_a & kept_b).float().mean().item() / density) < 10 * sigma


@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
def test_dare_rescale_restores_magnitude(mode):
    base, xs = make_inputs((300, 200), 1, seed=17)
    delta = (xs[0] - base).double()
    params = params_for("dare_linear", 1, {"rescale_mode": mode}, {"weight": 1.0, "density": 0.2})
    got = (run_method("dare_linear", base, xs, params, seed=4) - base).double()
    ratio = float(got.abs().sum() / delta.abs().sum())
    if mode == "l1":
        assert ratio == pytest.approx(1.0, abs=1e-5)
    else:
        assert ratio == pytest.approx(1.0, abs=0.02)  # in expectation; 60k elements
        kept = got != 0
        torch.testing.assert_close(got[kept], delta[kept] / 0.2, rtol=1e-5, atol=1e-6)


# ---- parameters --------------------------------------------------------------------------

def test_mergekit_defaults():
    d = {n: ({k: s.default for k, s in m.global_parameters.items()}, {k: s.default for k, s in m.model_parameters.items()})
         for n, m in METHODS.items()}
    assert d["linear"][0]["normalize"] is True
    assert d["ties"][0]["normalize"] is True and d["ties"][0]["rescale"] is False
    assert d["della"][0] == {"normalize": True, "lambda": 1.0, "rescale": True, "rescale_mode": "l1"}
    for name in ("task_arithmetic", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della_linear"):
        assert d[name][0]["normalize"] is False and d[name][0]["lambda"] == 1.0
    for name in ("dare_linear", "dare_ties", "della_linear"):
        assert d[name][0]["rescale"] is True
    assert d["breadcrumbs"][1] == {"weight": None, "density": 1.0, "gamma": 0.01}
    assert d["della"][1] == {"weight": None, "density": 1.0, "epsilon": 0.15}
    assert (METHODS["slerp"].min_experts, METHODS["slerp"].max_experts) == (1, 1)
    assert METHODS["model_stock"].min_experts == 2


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range(density):
    spec = get_method("ties").model_parameters["density"]
    with pytest.raises(ConfigError, match=r"models\[1\].parameters.density of m1.*allowed"):
        spec.validate(density, "models[1].parameters.density of m1 (tensor x)")


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.5), (0.9, 0.15), (0.1, 0.2)])
def test_della_epsilon_must_keep_probabilities_inside(density, epsilon):
    with pytest.raises(ConfigError, match="model 2 besides the base.*epsilon"):
        params_for("della", 2, {}, [{"weight": 1.0, "density": 0.5, "epsilon": 0.1},
                                    {"weight": 1.0, "density": density, "epsilon": epsilon}])


def test_rescale_mode_choices():
    with pytest.raises(ConfigError, match="l1, inverse_density"):
        get_method("dare_ties").global_parameters["rescale_mode"].validate("l2", "parameters.rescale_mode")


def test_model_stock_computes_a_tensors_t_once(monkeypatch):
    """Every merge block of a tensor blends with the same t: it is computed once per compute
    dtype from the reduced Gram matrix, and the blocks equal one blend with that t."""
    from distmerge.methods import model_stock

    base, xs = make_inputs((40, 6), 3, torch.float32, seed=4)
    params = params_for("model_stock", 3)
    reduced = reductions("model_stock", base, xs, params)
    calls = []
    real = model_stock.stock_t
    monkeypatch.setattr(model_stock, "stock_t", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    merged = merge_sharded("model_stock", base, xs, params, reduced, step=3)
    assert calls == [(torch.float32,)]
    t = real(reduced.gram, torch.float32)
    assert torch.equal(merged, model_stock.blend_reference(base, xs, t))
    merge_sharded("model_stock", base, xs, params, reduced, step=7)
    merged_bf16 = merge_sharded("model_stock", base.bfloat16(), [x.bfloat16() for x in xs], params, reduced, step=5)
    assert calls == [(torch.float32,), (torch.bfloat16,)] and merged_bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["model_stock", "ramplus_tl", "nuslerp"])
def test_what_blocks_derive_from_the_reductions_is_computed_once(name):
    """``Reductions.derive``: the blocks of a tensor share one computed value (one entry), and
    merge the bits that blocks computing it afresh each give."""
    import dataclasses

    from distmerge.testing.method_cases import CASES

    n = 2 if name == "nuslerp" else 3
    _, glob, model = CASES[name]
    base, xs = make_inputs((40, 6), n, torch.float32, seed=8)
    params = params_for(name, n, glob, model)
    reduced = reductions(name, base, xs, params)
    shared = merge_sharded(name, base, xs, params, reduced, step=3)
    assert len(reduced.derived) == 1
    m = get_method(name)
    fresh = torch.cat([m.merge(base[a:a + 3] if m.uses_base else None, [x[a:a + 3] for x in xs], params,
                               ctx((40, 6), a, min(40, a + 3), 0, n), dataclasses.replace(reduced, derived={}))
                       for a in range(0, 40, 3)])
    assert torch.equal(shared.view(torch.int32), fresh.view(torch.int32))
