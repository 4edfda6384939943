"""float16 and bfloat16 compute through the engine, against a reference that shares no code
with distmerge's methods: numpy float64 math with every operation rounded to the compute dtype,
in the order docs/methods.md gives.

The other method tests compare the fused kernels with the torch formulation
(``merge_reference``), which is the code the float16 path runs, so a float16 or bfloat16 bug in
that formulation would pass them. Here torch is used only to round (``Tensor.to``).

Rounding model (what torch's CPU float16/bfloat16 ops do, and what the kernels reproduce): an
op computes in float32 and rounds the result to the compute dtype; a Python scalar operand
(lambda) enters as float32. On top, mergekit 0.1.5's order of operations: weights rounded to the
compute dtype, sums over the models accumulated in float32 and rounded once, the L1 norms
rounded to the compute dtype before their quotient, linear accumulated in float32. The reference computes each op in
float64 and rounds to float32, then to the compute dtype (``_round``). That float32 step is
exactly float32 arithmetic: a 16-bit value times a float32 scalar is exact in float64 (11 + 24
bits), and for sums, differences and quotients of float32 values double rounding through
float64 is innocuous (53 >= 2 * 24 + 2). So the reference is op for op what torch computes,
and every assertion is bit equality, signed zeros included; no ulp is allowed.

The one whole-tensor float quantity here, DARE's L1 rescale factor, is an exactly rounded
``math.fsum`` in the reference and a float64 sum in a fixed block order in the engine; the two
can differ in the last float64 bit, which reaches the output only if it moves float32(factor),
and did not for any tensor of these models (a deterministic fact of this data, not a tolerance).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distmerge.config import parse_config
from distmerge.engine.run import run_merge
from tests.helpers import load_state
from tests.methods.keep_stream_reference import dare_keep

pytestmark = pytest.mark.usefixtures("ray_local")

# Weights chosen so that rounding them to the compute dtype changes their sum (float16:
# 0.1 + 0.2 -> 0.2998046875, bfloat16: -> 0.30078125), which a normalized merge divides by.
WEIGHTS = [0.1, 0.2]
SEED = 7
# case: (method, global parameters, per-model parameters, experts). With two experts the TIES
# divisor is a rounded sum (w_0 + 0 rounds w_0 anyway); with one it is the stored weight itself,
# so only the one-expert case sees whether the weights were rounded to the compute dtype.
CASES: dict[str, tuple[str, dict, dict, int]] = {
    "linear": ("linear", {}, {}, 2),
    "task_arithmetic": ("task_arithmetic", {"normalize": True, "lambda": 0.7}, {}, 2),
    "ties": ("ties", {}, {"density": 0.4}, 2),
    "ties_one_expert": ("ties", {}, {"density": 0.4}, 1),
    "dare_linear": ("dare_linear", {"normalize": True}, {"density": 0.5}, 2),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _round(values: np.ndarray | float, dtype: torch.dtype) -> np.ndarray:
    """float64 values rounded as a torch op in ``dtype`` rounds its result (via float32)."""
    t = torch.from_numpy(np.asarray(values, dtype=np.float64))
    return t.to(torch.float32).to(dtype).to(torch.float64).numpy()


def _dare_keep(seed: int, tensor: str, model: int, numel: int, density: float) -> np.ndarray:
    """DARE's keep mask: element j's draw is output j of the Philox4x32-10 stream keyed by
    blake2b(seed, tensor, model); kept iff the draw is below floor(density * 2^32)."""
    return dare_keep(seed, tensor, model, 0, numel, density)


def _ties_keep(delta: np.ndarray, density: float) -> np.ndarray:
    """TIES trim: keep exactly k = max(1, int(density * numel)) elements, the largest |delta|,
    equal magnitudes by lower flat index first (a stable sort of -|delta|)."""
    flat = np.abs(delta).reshape(-1)
    k = max(1, int(density * flat.size))
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(delta.shape)


def _f32(value: np.ndarray | float) -> np.ndarray:
    return np.asarray(value, dtype=np.float32).astype(np.float64)


def _sum_rounded(terms: list[np.ndarray], dtype: torch.dtype) -> np.ndarray:
    """torch's sum(dim=0) of ``dtype`` tensors: left to right in float32, rounded once."""
    out = _f32(terms[0])
    for t in terms[1:]:
        out = _f32(out + t)
    return _round(out, dtype)


def reference(case: str, name: str, base: np.ndarray | None, xs: list[np.ndarray],
              dtype: torch.dtype) -> np.ndarray:
    """One tensor of the merge, from inputs already rounded to the compute dtype."""
    method, glob, per_model, n = CASES[case]
    weights = WEIGHTS[:n]
    w_stored = [_round(w, dtype) for w in weights]  # the weights in the compute dtype
    if method == "linear":  # mergekit: addcmul_ (fma) into float32 from +0, / float32 weight sum
        acc = np.zeros_like(xs[0])
        for x, w in zip(xs, weights, strict=True):
            acc = _f32(acc + x * _f32(w))  # x * w is exact in float64 (11 + 24 bits)
        total = _f32(0.0)
        for w in weights:
            total = _f32(total + _f32(w))
        return _round(acc / total, dtype)
    assert base is not None
    weighted = []
    for e, x in enumerate(xs):
        d = _round(x - base, dtype)
        if method == "ties":
            d = d * _ties_keep(d, per_model["density"])
        elif method == "dare_linear":
            kept = d * _dare_keep(SEED, name, e, d.size, per_model["density"]).reshape(d.shape)
            before, after = math.fsum(np.abs(d).reshape(-1)), math.fsum(np.abs(kept).reshape(-1))
            before, after = _round(before, dtype), _round(after, dtype)  # norms in the compute dtype
            ratio = _round(before / after, dtype) if before >= 1e-7 and after >= 1e-7 else 1.0
            d = kept if ratio == 1.0 else _round(kept * ratio, dtype)
        weighted.append(_round(d * w_stored[e], dtype))  # the weight rounded to the compute dtype
    if method == "ties":  # sign consensus (total >= 0 elects +), normalized by the agreeing weights
        sign = np.where(_sum_rounded(weighted, dtype) >= 0, 1.0, -1.0)
        agreeing = [np.where(wd * sign < 0, 0.0, wd * sign) for wd in weighted]  # clamp(min=0) keeps -0.0
        mixed = _sum_rounded(agreeing, dtype) * sign
        divisor = _sum_rounded([np.where(a > 0, w, 0.0) for a, w in zip(agreeing, w_stored, strict=True)], dtype)
        mixed = _round(mixed / np.where(divisor == 0, 1.0, divisor), dtype)
    else:
        mixed = _sum_rounded(weighted, dtype)
        if glob.get("normalize"):
            total = _sum_rounded([np.float64(w) for w in w_stored], dtype)
            if abs(total) >= 1e-8:
                mixed = _round(mixed / total, dtype)
    if glob.get("lambda", 1.0) != 1.0:
        mixed = _round(mixed * float(np.float32(glob["lambda"])), dtype)
    return _round(base + mixed, dtype)


def _bits(values: torch.Tensor) -> np.ndarray:
    return values.contiguous().view(torch.int16).numpy()


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_reduced_precision_compute_matches_independent_reference(llama_family, tmp_path, case, dtype_name):
    """The engine's merged bytes in float16/bfloat16 equal the float64-and-round reference's."""
    base_dir, expert_dirs = llama_family
    dtype = DTYPES[dtype_name]
    method, glob, per_model, n = CASES[case]
    expert_dirs = expert_dirs[:n]
    cfg = parse_config({
        "merge_method": method,
        **({} if method == "linear" else {"base_model": str(base_dir)}),
        "models": [{"model": str(e), "parameters": {"weight": w, **per_model}} for e, w in zip(expert_dirs, WEIGHTS[:n], strict=True)],
        "parameters": glob,
        "dtype": dtype_name,
        "execution": {"seed": SEED},
    })
    out: Path = tmp_path / "out"
    report = run_merge(cfg, out, shard_size=60_000, progress=False)
    assert report["compute_dtype"] == {"float16": "F16", "bfloat16": "BF16"}[dtype_name]
    got = load_state(out)
    base = load_state(base_dir)
    experts = [load_state(e) for e in expert_dirs]
    assert len(got) == len(base) == 39
    differing = {}
    for name, b in base.items():
        assert got[name].dtype == dtype, name
        xs = [e[name].to(dtype).double().numpy() for e in experts]
        want = reference(case, name, b.to(dtype).double().numpy(), xs, dtype)
        expected = torch.from_numpy(want).to(dtype)
        bad = int((_bits(got[name]) != _bits(expected)).sum())
        if bad:
            differing[name] = f"{bad} of {expected.numel()}"
    assert not differing, f"{case} in {dtype_name}: elements not bit-identical to the reference: {differing}"
