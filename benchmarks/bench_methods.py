"""Every merge method through the engine benchmark: seconds, ratio to linear, ratio to I/O.

    .venv/bin/python -m benchmarks.bench_methods --model-gb 0.5

Runs :func:`benchmarks.bench_engine.run` once per method on the same synthetic bf16 family
(base + two experts) and prints a markdown table. Methods whose parameters the engine
benchmark's ``merge_config`` does not know (slerp, model_stock, passthrough, della's
epsilon) get theirs from :func:`method_config`. Target: TIES within 2x of linear.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmarks import bench_engine

METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
           "della", "della_linear", "slerp", "model_stock", "passthrough"]
_engine_config = bench_engine.merge_config


def method_config(method: str, base: Path, experts: list[Path], stats: str | None = None) -> dict:
    """The engine benchmark's config, with each method's own parameters where they differ."""
    if method in ("ties", "dare_linear", "dare_ties", "task_arithmetic", "linear"):
        return _engine_config(method, base, experts, stats)
    common = {"dtype": "float32", "out_dtype": "bfloat16", "merge_method": method, "base_model": str(base)}
    if method == "slerp":
        return common | {"models": [{"model": str(experts[0])}], "parameters": {"t": 0.4}}
    if method == "model_stock":
        return common | {"models": [{"model": str(e)} for e in experts]}
    if method == "passthrough":
        del common["base_model"]
        return common | {"models": [{"model": str(experts[0]), "parameters": {"scale": 1.0}}]}
    per_model = {"weight": 0.5, "density": 0.5}
    if method.startswith("breadcrumbs"):
        per_model["gamma"] = 0.01
    if method.startswith("della"):
        per_model["epsilon"] = 0.1
    return common | {"models": [{"model": str(e), "parameters": per_model} for e in experts]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-gb", type=float, default=1.0)
    parser.add_argument("--shard-size", default="256MB")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bench_engine.merge_config = method_config  # run() builds its config through this name
    # One untimed merge first: the session's first merge pays one-off costs (see RESULTS.md).
    bench_engine.run(args.methods.split(",")[0], args.model_gb, args.shard_size, args.workers, keep=False)
    rows = []
    for method in args.methods.split(","):
        r = bench_engine.run(method, args.model_gb, args.shard_size, args.workers, keep=False)
        print(json.dumps(r), flush=True)
        rows.append(r)
    linear = next((r["merge_s"] for r in rows if r["method"] == "linear"), None)
    print(f"\nmodel {rows[0]['model_gb']} GB bf16 x 3 inputs, shard {args.shard_size}, {rows[0]['cpus']} CPUs, "
          f"{rows[0]['workers']} workers\n")
    print("| method | seconds | ratio to linear | ratio to I/O bound |")
    print("|---|---:|---:|---:|")
    for r in rows:
        rel = f"{r['merge_s'] / linear:.2f}" if linear else "-"
        print(f"| {r['method']} | {r['merge_s']:.2f} | {rel} | {r['ratio_to_io']:.2f} |")


if __name__ == "__main__":
    main()
