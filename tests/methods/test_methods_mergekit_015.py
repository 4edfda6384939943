"""The methods mergekit 0.1.5 added (sce, nuslerp, multislerp, karcher, nearswap, arcee_fusion,
ram, ramplus_tl): against plain-torch transcriptions of mergekit's formulas, bit-identical under
any row sharding and reduction chunking, and against mergekit 0.1.5 itself (run in its own
virtual environment; skipped when that environment is absent).

Tolerances (docs/methods.md says why): elementwise methods and every method against its
transcription are bit-identical; against mergekit itself, methods whose whole-tensor sums
mergekit takes in the compute dtype agree within the ulps stated per method in MK_ULPS.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.errors import ConfigError
from distmerge.methods import get_method
from distmerge.methods.base import ShardContext
from distmerge.testing import mergekit_reference
from tests.methods.test_methods_catalogue import _rows, params_for

NAME = "model.layers.1.mlp.down_proj.weight"
SHAPES = [(37, 19), (29,), (1, 23), (3, 5, 4)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}


# ---- harness: the engine's reduction rounds and row shards, without the engine -------------

def make_inputs(shape, n, dtype, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def _ctx(shape, a, b, n):
    return ShardContext(NAME, tuple(shape), a, b, 0, tuple(range(n)))


def reduce_all(name, base, xs, params, chunk_rows=4):
    m = get_method(name)
    shape = tuple(xs[0].shape)
    reduced = None
    for r in range(m.reduction_rounds(params, shape)):
        if reduced is not None and reduced.complete:
            break
        parts = []
        for a in range(0, _rows(shape), chunk_rows):
            b = min(_rows(shape), a + chunk_rows)
            rows = None if base is None else base[a:b]
            parts.append(m.partial_reductions(rows, [x[a:b] for x in xs], params, _ctx(shape, a, b, len(xs)),
                                              r, reduced))
        reduced = m.reduce(parts, params, shape, r, reduced)
    return reduced


def merge_sharded(name, base, xs, params, reduced, step):
    m = get_method(name)
    shape = tuple(xs[0].shape)
    out = []
    for a in range(0, _rows(shape), step):
        b = min(_rows(shape), a + step)
        rows = None if base is None else base[a:b]
        out.append(m.merge(rows, [x[a:b] for x in xs], params, _ctx(shape, a, b, len(xs)), reduced))
    return torch.cat(out) if shape else out[0]


def run(name, base, xs, params):
    reduced = reduce_all(name, base, xs, params)
    return merge_sharded(name, base, xs, params, reduced, _rows(tuple(xs[0].shape)))


def ulps(got, want, inputs=()):
    """Largest |got - want| in units of the last place of ``want`` in ``want``'s dtype; with
    ``inputs``, of the largest magnitude among ``want`` and the inputs at that element (a
    rounding difference in a whole-tensor scalar scales the inputs, and where they cancel in the
    output, its own ulp is far smaller than the error the scalar's last bit carries)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.double(), want.double()
    same = (g == w) | (g.isnan() & w.isnan())
    if bool(same.all()):
        return 0.0
    mag = w.abs()
    for x in inputs:
        mag = torch.maximum(mag, x.double().abs())
    _, e = torch.frexp(mag)
    tiny = torch.finfo(want.dtype).tiny
    spacing = torch.ldexp(torch.ones_like(w), (e - 1 - MANTISSA[want.dtype]).to(torch.int32)).clamp(
        min=tiny * 2.0 ** -MANTISSA[want.dtype])
    return float(((g - w).abs() / spacing)[~same].max())


def bits_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    assert ulps(got, want) == 0.0, ulps(got, want)


# ---- plain-torch transcriptions of mergekit 0.1.5's formulas (whole tensors) ---------------
# Whole-tensor sums that mergekit takes in the compute dtype are taken here in float64 and
# rounded once to the compute dtype (distmerge's documented rounding); everything else is
# mergekit's expression.

def f64_norm(x, dim=None):
    x = x.double()
    s = (x * x).sum() if dim is None else (x * x).sum(dim=dim, keepdim=True)
    return s.sqrt()


def ref_nearswap(t, a, b):
    absdiff = torch.abs(a - b)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def ref_ram(base, xs, eps, plus=None):
    tv = torch.stack([x - base for x in xs]).view(len(xs), -1)
    nz = tv.abs() > eps
    counts = nz.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    tvz = tv * nz
    if plus is None:
        merged = ((tvz * unique) + (tvz * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
        return base + merged.reshape_as(base)
    r, alpha = plus
    rho = (nz & overlap).sum(dim=1) / (nz & unique).sum(dim=1).clamp(min=eps)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    merged = ((tvz * unique * lam.unsqueeze(-1)) + (tvz * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)  # float32 lam: a float32 result (float64 for float64)


def ref_nuslerp(t, v0, v1, row_wise, flatten):
    shape, dtype = v0.shape, v0.dtype
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    n0 = f64_norm(v0, -1).to(dtype).clamp(min=1e-7)
    n1 = f64_norm(v1, -1).to(dtype).clamp(min=1e-7)
    cos = ((v0 / n0) * (v1 / n1)).double().sum(dim=-1, keepdim=True).to(dtype).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-8 ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def ref_multislerp(base, xs, weights, normalize, eps):
    if len(xs) == 1:
        return xs[0]
    tensors = torch.stack(xs)
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    dtype = flat.dtype
    w = torch.tensor(weights, dtype=dtype)
    if normalize:
        w = w / w.sum()
    norms = f64_norm(flat, -1).to(dtype)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = f64_norm(mean).to(dtype)
    if mean_norm < eps:
        res = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
        return res if base is None else res + base
    mean = mean / mean_norm
    dots = (units * mean).double().sum(-1, keepdim=True).to(dtype)
    tangent_result = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tn = f64_norm(tangent_result).to(dtype) + eps
    result = mean * torch.cos(tn) + tangent_result * (torch.sin(tn) / tn)
    result = (result * (norms.squeeze(-1) * w).sum()).view(tensors.shape[1:])
    return result if base is None else result + base


def ref_sce(base, xs, density):
    tvs = torch.stack([x - base for x in xs])
    if density < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * density)
        mask = torch.zeros_like(var)
        if k > 0:  # exactly k, ties at the k-th chosen as torch.topk on the whole tensor chooses
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs = tvs * mask.unsqueeze(0)
    sign = tvs.sign()
    erase = sign == ((tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1)
    w = torch.stack([sq.double().sum() / sq.numel() for sq in tvs.square()]).to(tvs.dtype)
    ws = torch.sum(w).item()
    w = torch.ones_like(w) / w.shape[0] if abs(ws) < 1e-6 else w / ws
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    return base + (tvs * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)


def ref_karcher(tensors, max_iter, tol):
    """mergekit's karcher_merge_tensors with every norm and dot a float64 sum rounded once."""
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    nd = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [f64_norm(t).to(nd) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    va = [alphas[i] for i in valid]
    na = [a / sum(va) for a in va]
    vu = [units[i] for i in valid]
    mean = torch.zeros_like(vu[0])
    for a, u in zip(na, vu, strict=True):
        mean += a * u
    mn = f64_norm(mean).to(nd)
    mean = vu[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(na, vu, strict=True):
            dot = torch.clamp((mean.double() * u.double()).sum().to(mean.dtype), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = f64_norm(tangent).to(nd)
        if tn.item() < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un = f64_norm(mean).to(nd)
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


def ref_arcee_fusion(base, x):
    """mergekit's arcee_fusion with exact quartiles (no sampling at these sizes); a 1-D tensor's
    softmax in float64 rounded once, its KL a float64 sum rounded once (distmerge's rounding)."""
    diff = (x - base).abs()
    if x.dim() >= 2:
        p = torch.nn.functional.softmax(x, dim=-1) + 1e-8
        q = torch.nn.functional.softmax(base, dim=-1) + 1e-8
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    else:
        p = torch.softmax(x.double(), dim=-1).to(x.dtype) + 1e-8
        q = torch.softmax(base.double(), dim=-1).to(x.dtype) + 1e-8
        kl = (p * torch.log(p / q)).double().sum().to(x.dtype)
    imp = diff * kl
    flat = torch.sort(imp.reshape(-1)).values
    q1, med, q3 = flat[(torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long()]
    mask = (imp >= med + 1.5 * (q3 - q1)).float()
    return base + (x - base) * mask  # a float32 mask: a float32 result (float64 for float64)


def nuslerp_t(w):
    return 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)


# ---- the cases: (method, global params, per-model params, n experts, with base) ----------

CASES = {
    "nearswap": ("nearswap", {"t": 0.05}, {}, 1, True),
    "ram": ("ram", {"epsilon": 0.05}, {}, 3, True),
    "ramplus_tl": ("ramplus_tl", {"epsilon": 0.05, "r": 0.5, "alpha": 0.7}, {}, 3, True),
    "nuslerp": ("nuslerp", {}, [{"weight": 0.3}, {"weight": 0.9}], 2, True),
    "nuslerp-nobase": ("nuslerp", {}, [{"weight": 0.3}, {"weight": 0.9}], 2, False),
    "nuslerp-rows": ("nuslerp", {"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 0.5}], 2, True),
    "nuslerp-cols": ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                     [{"weight": 1.0}, {"weight": 0.5}], 2, False),
    "multislerp": ("multislerp", {}, [{"weight": 0.3}, {"weight": 0.9}, {"weight": 0.5}], 3, True),
    "multislerp-nobase": ("multislerp", {"normalize_weights": False},
                          [{"weight": 0.3}, {"weight": 0.6}], 2, False),
    "multislerp-one": ("multislerp", {}, {"weight": 0.3}, 1, True),
    "sce": ("sce", {}, {}, 3, True),
    "sce-topk": ("sce", {"select_topk": 0.3}, {}, 3, True),
    "sce-topk-2": ("sce", {"select_topk": 0.7}, {}, 2, True),
    "karcher": ("karcher", {}, {}, 3, True),
    "karcher-nobase": ("karcher", {"max_iter": 3}, {}, 2, False),
    "karcher-one": ("karcher", {}, {}, 1, False),
    "arcee_fusion": ("arcee_fusion", {}, {}, 1, True),
}


def reference(case, base, xs):
    method, glob, model, n, _ = CASES[case]
    p = params_for(method, n, glob, model)
    g = p.global_
    if method == "nearswap":
        return ref_nearswap(g["t"], base, xs[0])
    if method == "ram":
        return ref_ram(base, xs, g["epsilon"])
    if method == "ramplus_tl":
        return ref_ram(base, xs, g["epsilon"], (g["r"], g["alpha"]))
    if method == "nuslerp":
        t = nuslerp_t([m["weight"] for m in p.experts])
        if base is None:
            return ref_nuslerp(t, xs[0], xs[1], g["nuslerp_row_wise"], g["nuslerp_flatten"])
        return base + ref_nuslerp(t, xs[0] - base, xs[1] - base, g["nuslerp_row_wise"], g["nuslerp_flatten"])
    if method == "multislerp":
        return ref_multislerp(base, xs, [m["weight"] for m in p.experts], g["normalize_weights"], g["eps"])
    if method == "sce":
        return ref_sce(base, xs, g["select_topk"])
    if method == "karcher":
        return ref_karcher(list(xs) + ([] if base is None else [base]), g["max_iter"], g["tol"])
    if method == "arcee_fusion":
        return ref_arcee_fusion(base, xs[0])
    raise AssertionError(case)


# Methods not computed as their transcription orders it, with the ulps (at the inputs' scale)
# allowed; none now (karcher sums |g| and |m| of the materialized vectors, as the transcription).
REF_ULPS: dict[str, int] = {}


def case_inputs(case, shape, dtype, seed=5):
    _, _, _, n, with_base = CASES[case]
    base, xs = make_inputs(shape, n, dtype, seed=seed)
    return (base if with_base else None), xs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transcription_and_is_shard_invariant(case, shape, dtype):
    method, glob, model, n, _ = CASES[case]
    base, xs = case_inputs(case, shape, dtype)
    params = params_for(method, n, glob, model)
    whole = run(method, base, xs, params)
    if method in REF_ULPS:  # not computed as the transcription orders it (see REF_ULPS)
        want = reference(case, base, xs)
        off = ulps(whole, want, ([] if base is None else [base]) + list(xs))
        print(f"{case} {shape} {dtype}: {off} ulp from the transcription")
        assert off <= REF_ULPS[method]
    else:
        bits_equal(whole, reference(case, base, xs))
    for chunk_rows in (1, 3, 4):
        reduced = reduce_all(method, base, xs, params, chunk_rows=chunk_rows)
        for step in (1, 2, 5):
            bits_equal(merge_sharded(method, base, xs, params, reduced, step), whole)


# ---- against mergekit 0.1.5 itself, in its own virtual environment ------------------------
# A deliberately small local helper (tensors and a JSON spec in, tensors out through files in
# tmp_path); a shared mergekit harness can replace it.

MERGEKIT_PYTHON = mergekit_reference.venv_path() / "bin" / "python"

MERGEKIT_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    folder = sys.argv[1]
    spec = json.load(open(folder + "/spec.json"))
    tensors = load_file(folder + "/in.safetensors")
    out = {}
    for key, case in spec.items():
        inputs = [tensors[f"{key}/x{i}"] for i in range(case["n"])]
        base_index = None
        if case["base"]:
            inputs.append(tensors[f"{key}/base"])  # mergekit's plan appends an unlisted base last
            base_index = len(inputs) - 1
        group = TensorGroup.from_tensors(inputs, base_index=base_index, name="w")
        try:
            out[key] = registry.get(case["method"])([group], parameters=case["params"],
                                                    dtype=getattr(torch, case["dtype"]))[0].contiguous()
        except ValueError as e:
            out[key + "/error"] = torch.zeros(1)
            print(key, "ValueError", e)
    save_file(out, folder + "/out.safetensors")
""")


def run_mergekit(folder: Path, cases: dict) -> dict:
    """``cases``: key -> (method, params for mergekit, base or None, experts); mergekit's outputs."""
    if os.environ.get(mergekit_reference.OPT_OUT_ENV) == "1":
        pytest.skip(f"{mergekit_reference.OPT_OUT_ENV}=1: mergekit comparison explicitly opted out")
    try:
        mergekit_reference.ensure_reference_env()
    except mergekit_reference.ReferenceUnavailable as e:
        pytest.fail(f"mergekit reference environment unavailable ({e})", pytrace=False)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, spec = {}, {}
    for key, (method, mk_params, base, xs) in cases.items():
        for i, x in enumerate(xs):
            tensors[f"{key}/x{i}"] = x.contiguous()
        if base is not None:
            tensors[f"{key}/base"] = base.contiguous()
        spec[key] = {"method": method, "params": mk_params, "n": len(xs), "base": base is not None,
                     "dtype": str(xs[0].dtype).removeprefix("torch.")}
    save_file(tensors, str(folder / "in.safetensors"))
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "run.py").write_text(MERGEKIT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(MERGEKIT_PYTHON), str(folder / "run.py"), str(folder)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(folder / "out.safetensors"))


def mergekit_params(method, glob, model, n):
    """distmerge's parameters as mergekit's call takes them (per-model values as a list)."""
    p = dict(glob)
    models = model if isinstance(model, list) else [model or {}] * n
    for k in (models[0] if models else {}):
        p[k] = [m[k] for m in models]
    return p


# Largest distance from mergekit's output allowed per method, in ulps of the compute dtype at
# the inputs' scale (see ``ulps``; measured values are in docs/methods.md); 0 = bit-identical.
MK_ULPS = {"nearswap": 0, "ram": 0, "ramplus_tl": 0, "nuslerp": 3, "multislerp": 2, "sce": 2, "karcher": 3, "arcee_fusion": 0}

MK_SHAPES = [(37, 19), (29,), (1, 23)]


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory):
    cases = {}
    for case, (method, glob, model, n, _) in CASES.items():
        for shape in MK_SHAPES:
            for dtype in DTYPES:
                base, xs = case_inputs(case, shape, dtype, seed=9)
                cases[f"{case}|{shape}|{dtype}"] = (method, mergekit_params(method, glob, model, n), base, xs)
    return cases, run_mergekit(tmp_path_factory.mktemp("mergekit"), cases)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit_015(mergekit_outputs, case):
    cases, outputs = mergekit_outputs
    method, glob, model, n, _ = CASES[case]
    worst = worst_scaled = 0.0
    for key, (_, _, base, xs) in cases.items():
        if key.split("|")[0] != case:
            continue
        got = run(method, base, xs, params_for(method, n, glob, model))
        assert got.dtype == outputs[key].dtype, (key, got.dtype, outputs[key].dtype)  # mergekit writes it as returned
        want = outputs[key]
        plain, scaled = ulps(got, want), ulps(got, want, ([] if base is None else [base]) + list(xs))
        worst, worst_scaled = max(worst, plain), max(worst_scaled, scaled)
        assert scaled <= MK_ULPS[method], (key, plain, scaled)
    print(f"{case}: at most {worst} ulp of the output, {worst_scaled} ulp of the inputs' scale from mergekit 0.1.5")


def test_arcee_fusion_samples_a_million_elements_from_the_stream():
    """Above 10**6 elements the quartiles come from a sample of 10**6 drawn with replacement
    (mergekit: torch.randint; distmerge: its counter stream), identical for any chunking."""
    from distmerge.methods.random_stream import uniforms
    base, xs = make_inputs((1001, 1000), 1, torch.float32, seed=3)
    params = params_for("arcee_fusion", 1)
    a = reduce_all("arcee_fusion", base, xs, params, chunk_rows=1001)
    b = reduce_all("arcee_fusion", base, xs, params, chunk_rows=400)
    assert torch.equal(a.threshold, b.threshold)
    p = torch.nn.functional.softmax(xs[0], dim=-1) + 1e-8
    q = torch.nn.functional.softmax(base, dim=-1) + 1e-8
    imp = ((xs[0] - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)).reshape(-1)
    picks = (torch.from_numpy(uniforms(0, NAME, -1, 0, 10**6)) * imp.numel()).to(torch.int64)
    sample = torch.sort(imp[picks]).values
    q1, med, q3 = sample[(torch.tensor([0.25, 0.5, 0.75]) * (10**6 - 1)).long()]
    assert torch.equal(a.threshold, med + 1.5 * (q3 - q1))


# ---- through the engine: plan (optional base), reduction rounds on Ray, any shard size -------

ENGINE_CASES = {
    "karcher": ({"max_iter": 4}, None),
    "multislerp": ({}, [{"weight": 0.3}, {"weight": 0.9}]),
    "nuslerp": ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{"weight": 0.3}, {"weight": 0.9}]),
    "sce": ({"select_topk": 0.4}, None),
    "ramplus_tl": ({"epsilon": 0.01}, None),
    "arcee_fusion": ({}, None),
}


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("method", list(ENGINE_CASES))
def test_engine_same_bytes_across_shard_sizes(llama_family, tmp_path, method):
    from distmerge.config import parse_config
    from distmerge.engine.run import run_merge
    from tests.helpers import file_bytes, load_state

    base, experts = llama_family
    glob, per_model = ENGINE_CASES[method]
    models = experts[:1] if method == "arcee_fusion" else experts
    config = {
        "merge_method": method, "base_model": str(base), "parameters": glob,
        "models": [{"model": str(e), **({"parameters": p} if per_model else {})}
                   for e, p in zip(models, per_model or [None] * len(models), strict=True)],
    }
    whole = run_merge(parse_config(config), tmp_path / "whole", shard_size=10**12, workers=1, progress=False)
    cut = run_merge(parse_config(config), tmp_path / "cut", shard_size=60_000, workers=3, progress=False)
    assert cut["units"] > whole["units"]
    assert file_bytes(tmp_path / "whole") == file_bytes(tmp_path / "cut")
    # the engine's output is the method's (the base passed where mergekit passes it)
    got, b = load_state(tmp_path / "whole"), load_state(base)
    xs = [load_state(e) for e in models]
    name = next(n for n in got if "mlp.up_proj" in n)
    params = params_for(method, len(models), glob, per_model)
    want = run(method, b[name].float(), [x[name].float() for x in xs], params)
    assert torch.equal(got[name].float(), want)


# ---- parameters, validation and edge cases -------------------------------------------------

def test_defaults_are_mergekits():
    d = {n: ({k: s.default for k, s in get_method(n).global_parameters.items()},
             {k: s.default for k, s in get_method(n).model_parameters.items()})
         for n in ("sce", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl")}
    assert d["sce"] == ({"select_topk": 1.0, "int8_mask": False}, {})
    assert d["nuslerp"] == ({"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": None})
    assert d["multislerp"] == ({"normalize_weights": True, "eps": 1e-8}, {"weight": None})
    assert d["karcher"] == ({"max_iter": 10, "tol": 1e-5}, {})
    assert d["nearswap"] == ({"t": None}, {})
    assert d["arcee_fusion"] == ({}, {})
    assert d["ram"] == ({"epsilon": 1e-5}, {})
    assert d["ramplus_tl"] == ({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {})
    counts = {n: (get_method(n).min_experts, get_method(n).max_experts) for n in d}
    assert counts["nuslerp"] == (2, 2) and counts["nearswap"] == (1, 1) and counts["arcee_fusion"] == (1, 1)
    assert all(get_method(n).base_optional for n in ("nuslerp", "multislerp", "karcher"))


# What mergekit 0.1.5's methods return, per compute dtype (measured by calling each registered
# method on bf16/fp16/fp32/fp64 inputs): only arcee_fusion (a ``.float()`` mask) and ramplus_tl
# (a float32 lambda) promote. mergekit writes that dtype when no out_dtype is set.
PROMOTING = {"arcee_fusion", "ramplus_tl"}


def test_result_dtype_is_what_mergekit_returns():
    from distmerge.methods.registry import METHODS

    for name, method in METHODS.items():
        for compute in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            want = (torch.float64 if compute == torch.float64 else torch.float32) if name in PROMOTING else compute
            assert method.result_dtype(compute) == want, (name, compute)


def test_written_dtype_is_out_dtype_else_the_result_dtype():
    from distmerge.config import parse_config

    cfg = parse_config({"merge_method": "ramplus_tl", "base_model": "b", "dtype": "bfloat16",
                        "models": [{"model": "x"}]})
    assert cfg.out_dtype_code("F32") == "F32"  # ramplus_tl's float32 result, as mergekit writes it
    assert parse_config({**cfg.model_dump(exclude_none=True), "out_dtype": "bfloat16"}).out_dtype_code("F32") == "BF16"


@pytest.mark.parametrize("method,key,value,allowed", [
    ("sce", "select_topk", 1.5, "0 <= value <= 1"),
    ("sce", "select_topk", -0.1, "0 <= value <= 1"),
    ("karcher", "max_iter", -1, "0 <= max_iter <= 1000"),
    ("karcher", "tol", -1e-3, "tol >= 0"),
    ("ramplus_tl", "epsilon", 0.0, "epsilon > 0"),
    ("ram", "epsilon", -1.0, "epsilon >= 0"),
    ("multislerp", "eps", -1.0, "eps >= 0"),
])
def test_out_of_range_parameters_name_the_range(method, key, value, allowed):
    with pytest.raises(ConfigError, match=rf"parameters\.{key}.*allowed: {allowed}"):
        get_method(method).global_parameters[key].validate(value, f"parameters.{key}")


def test_multislerp_weights_summing_to_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="normalize_weights"):
        params_for("multislerp", 2, {}, [{"weight": 1.0}, {"weight": -1.0}])


def test_multislerp_antipodal_two_models_blend_linearly_and_three_fail():
    from distmerge.methods.multislerp import MultiSlerpError
    a = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    params = params_for("multislerp", 2, {}, [{"weight": 1.0}, {"weight": 1.0}])
    got = run("multislerp", None, [a, -a], params)
    bits_equal(got, ref_multislerp(None, [a, -a], [1.0, 1.0], True, 1e-8))
    params = params_for("multislerp", 3, {}, [{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}])
    with pytest.raises(MultiSlerpError, match="weights"):
        run("multislerp", None, [a, -a, a * 0.5], params)


def test_karcher_stops_when_converged_and_is_bounded():
    a = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    params = params_for("karcher", 2, {"max_iter": 50})
    assert get_method("karcher").reduction_rounds(params, (9, 4)) == 2 + 3 * 50  # norms, |m|; dots, |g|, |m| per iteration
    red = reduce_all("karcher", None, [a, 2 * a], params)
    assert red.complete and red.steps == []  # parallel inputs: converged at the first iteration
    bits_equal(merge_sharded("karcher", None, [a, 2 * a], params, red, 9), ref_karcher([a, 2 * a], 50, 1e-5))
    zeros = [torch.zeros(9, 4), torch.zeros(9, 4)]
    assert torch.equal(run("karcher", None, zeros, params), torch.zeros(9, 4))


def test_nuslerp_colinear_vectors_blend_linearly():
    a = torch.randn(7, 3, generator=torch.Generator().manual_seed(4))
    params = params_for("nuslerp", 2, {}, [{"weight": 1.0}, {"weight": 3.0}])
    got = run("nuslerp", None, [a, 2 * a], params)
    bits_equal(got, ref_nuslerp(0.75, a, 2 * a, False, True))  # colinear only where cos rounds to 1
    torch.testing.assert_close(got, 0.25 * a + 0.75 * (2 * a))


def test_sce_select_topk_zero_keeps_the_base():
    base, xs = make_inputs((5, 6), 2, torch.float32)
    assert torch.equal(run("sce", base, xs, params_for("sce", 2, {"select_topk": 0.0})), base)


@pytest.mark.parametrize(("shape", "topk", "dtype"), [
    ((23, 11), 0.37, torch.float32),  # torch's topk: nth_element (64 k > n)
    ((23, 11), 0.01, torch.float32),  # partial_sort (64 k <= n)
    ((301, 203), 0.37, torch.float32),  # large enough for introselect's partitions
    ((301, 203), 0.004, torch.float32),
    ((301, 203), 0.37, torch.bfloat16),  # bf16 variances, widened for the selection
    ((301, 203), 0.37, torch.float64),  # float64 variances: torch.topk chooses
])
def test_sce_splits_ties_at_the_threshold_as_topk_does(shape, topk, dtype):
    """Variances with few distinct values: exactly k kept, the tied ones those torch.topk on the
    whole tensor keeps (mergekit's sorted topk; distmerge's selection picks the same set),
    under any chunking and sharding."""
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(shape, dtype=dtype)
    xs = [torch.randint(-2, 3, shape, generator=g).to(dtype) for _ in range(2)]
    params = params_for("sce", 2, {"select_topk": topk})
    want = ref_sce(base, xs, topk)
    rows = shape[0]
    for chunk_rows in (1, 4, rows):
        reduced = reduce_all("sce", base, xs, params, chunk_rows=chunk_rows)
        assert reduced.tie_kept is not None
        for step in (1, 5, rows):
            bits_equal(merge_sharded("sce", base, xs, params, reduced, step), want)


def test_sce_keeps_every_tie_of_a_tensor_too_large_to_gather(monkeypatch: pytest.MonkeyPatch):
    """Above the gather bound the driver never holds the tensor's variances: every element tied
    at the k-th largest variance is kept (more than k), the same under any chunking and sharding."""
    from distmerge.methods import sce

    g = torch.Generator().manual_seed(7)
    base = torch.zeros(23, 11)
    xs = [torch.randint(-2, 3, (23, 11), generator=g).float() for _ in range(2)]
    params = params_for("sce", 2, {"select_topk": 0.37})
    monkeypatch.setattr(sce, "TOPK_GATHER_MAX_ELEMENTS", 23 * 11 - 1)
    tvs = torch.stack([x - base for x in xs])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.tensor(int(torch.count_nonzero(var))) * 0.37)
    threshold = torch.sort(var.reshape(-1), descending=True).values[k - 1]
    keep = var >= threshold
    assert int(keep.sum()) > k  # the case has ties straddling the cut
    kept = tvs * keep
    w = torch.stack([t.square().mean() for t in kept])
    w = w / w.sum()
    sign = kept.sign()
    majority = (kept.sum(dim=0) >= 0).float() * 2 - 1
    erased = w.view(-1, 1, 1) * (sign == majority)
    want = base + (kept * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    results = []
    for chunk_rows in (1, 4, 23):
        reduced = reduce_all("sce", base, xs, params, chunk_rows=chunk_rows)
        assert reduced.tie_kept is None
        for step in (1, 5, 23):
            results.append(merge_sharded("sce", base, xs, params, reduced, step))
    for got in results:
        bits_equal(got, results[0])
    torch.testing.assert_close(results[0], want, rtol=1e-6, atol=1e-6)
