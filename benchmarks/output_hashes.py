"""SHA-256 of every merged model file, for every method, to prove a refactor changed no byte.

    .venv/bin/python -m benchmarks.output_hashes --out /tmp/hashes-new.json
    old/.venv/bin/python -m benchmarks.output_hashes --out /tmp/hashes-old.json   # old checkout
    diff /tmp/hashes-old.json /tmp/hashes-new.json

Merges the synthetic bf16 family (benchmarks.synthetic) with every method in float32 compute,
the kernel methods in bfloat16 compute too, the dare/della methods with a second seed, a small
shard size (many units per tensor) and gradients, plus TIES with AIM (activation and uniform
relaxation) on a tiny Llama family calibrated on the builtin set in two stages. Each result is
written as it comes, so an interrupted run continues where it stopped. Only the public ``run_merge`` is used, so the script runs
unchanged against any version of the package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.synthetic import write_family
from distmerge import run_merge
from distmerge.config import parse_config

METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
           "della", "della_linear", "slerp", "model_stock", "passthrough"]


def _params(method: str) -> tuple[dict, dict]:
    """(per-model parameters, global parameters) for a method."""
    if method == "slerp":
        return {}, {"t": [0.0, 0.3, 1.0]}
    if method in ("model_stock", "passthrough"):
        return {}, {}
    if method == "linear":
        return {"weight": [0.2, 0.7]}, {}
    if method.startswith("della"):
        return {"weight": 0.6, "density": 0.5, "epsilon": 0.1}, {"lambda": 0.9}
    if method == "task_arithmetic":
        return {"weight": [0.3, 0.8]}, {}
    return {"weight": 0.6, "density": 0.4}, {"lambda": 0.9}


def config_for(method: str, base: Path, experts: list[Path], dtype: str, seed: int) -> dict:
    model_params, global_params = _params(method)
    models = experts[:1] if method in ("passthrough", "slerp") else experts
    cfg: dict = {"merge_method": method, "dtype": dtype, "out_dtype": "bfloat16",
                 "models": [{"model": str(m), "parameters": dict(model_params)} for m in models],
                 "parameters": global_params, "execution": {"seed": seed}}
    if method == "linear":
        cfg["models"].insert(0, {"model": str(base), "parameters": dict(model_params)})
    elif method != "passthrough":
        cfg["base_model"] = str(base)
    return cfg


def digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("model-*.safetensors"))}


def tiny_family(root: Path) -> tuple[Path, list[Path]]:
    try:
        from distmerge.testing.tiny import build_family
    except ImportError:
        from distmerge.tiny import build_family  # before the redesign
    base, experts = build_family(root, n_experts=2)
    return Path(base), [Path(p) for p in experts]


def cases() -> list[tuple[str, str, int]]:
    """(method, compute dtype, seed), most telling first: every method in float32, the kernels'
    bfloat16 path, a second seed for the randomized methods."""
    out = [(m, "float32", 0) for m in METHODS]
    out += [(m, "bfloat16", 0) for m in ("ties", "linear", "dare_ties", "task_arithmetic", "breadcrumbs", "della")]
    out += [(m, "float32", 7) for m in ("dare_ties", "della", "dare_linear", "della_linear")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file; keys already in it are not merged again")
    parser.add_argument("--model-mb", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--aim-first", action="store_true", help="merge the AIM cases before the others")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    path = Path(args.out)
    results: dict[str, dict[str, str]] = json.loads(path.read_text()) if path.exists() else {}

    def record(key: str, out: Path) -> None:
        results[key] = digest(out)
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(key, file=sys.stderr, flush=True)

    def synthetic_cases(root: Path) -> None:
        base, experts = write_family(root / "synthetic", args.model_mb * 10**6, n_experts=2, dtype=torch.bfloat16)
        for method, dtype, seed in cases():
            key = f"{method}/{dtype}/seed{seed}"
            if key not in results:
                out = root / "out" / key.replace("/", "-")
                run_merge(parse_config(config_for(method, base, experts, dtype, seed)), out, shard_size=10**6,
                          workers=args.workers, progress=False)
                record(key, out)

    def aim_cases(root: Path) -> None:
        tbase, texperts = tiny_family(root / "tiny")
        for relaxation in ("activation", "uniform"):
            key = f"aim-{relaxation}/ties"
            if key not in results:
                cfg = config_for("ties", tbase, texperts, "float32", 0)
                cfg["out_dtype"] = None
                cfg["aim"] = {"omega": 0.4, "relaxation": relaxation, "stages": 2,
                              "calibration": {"dataset": "builtin", "n_samples": 8, "block_size": 512}}
                out = root / "out" / key.replace("/", "-")
                run_merge(parse_config(cfg), out, shard_size=10**5, workers=args.workers, progress=False)
                record(key, out)

    with tempfile.TemporaryDirectory() as tmp:
        for part in ([aim_cases, synthetic_cases] if args.aim_first else [synthetic_cases, aim_cases]):
            part(Path(tmp))


if __name__ == "__main__":
    main()
