"""Engine benchmark: a merge of three synthetic Llama-shaped bf16 checkpoints against plain I/O.

    .venv/bin/python -m benchmarks.bench_engine --model-gb 1.0 --method linear

Prints wall time as a ratio to the sequential-I/O bound measured in the same script (inputs
evicted from the page cache before each run), and peak anonymous RSS of every worker against
the target of 2 x shard size + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

from benchmarks.io_baseline import evict, safetensors_files, sequential_io
from benchmarks.synthetic import write_family
from distmerge.config import parse_config
from distmerge.engine.cluster import connect
from distmerge.engine.run import run_merge
from distmerge.sizes import parse_size
from distmerge.testing.method_cases import method_config

WORK = Path(__file__).parent / "_work"


# Methods without a base_model that still take any number of models: the benchmark averages the
# base in as a third model, so that they read the same bytes as the methods with a base.
BASE_AS_MODEL = ("linear", "multislerp", "karcher")


def merge_config(method: str, base: Path, experts: list[Path], stats: str | None = None) -> dict:
    """The benchmark's config for ``method``: its case in ``distmerge.testing.method_cases``
    (every method of the registry), float32 compute unless the name says otherwise
    (``della@bfloat16``: the config's ``dtype``, as many mergekit configs set it), bfloat16
    output. Methods that take one expert (slerp, nearswap, arcee_fusion) read the base and the
    first expert; nuslerp without a base blends the two experts; passthrough copies the base."""
    method, _, dtype = method.partition("@")
    cfg = method_config(method, base, experts, dtype=dtype or "float32", out_dtype="bfloat16")
    if method in BASE_AS_MODEL:
        cfg["models"].insert(0, {**cfg["models"][0], "model": str(base)})
    if stats:
        cfg["base_model"] = str(base)
        cfg["aim"] = {"omega": 0.4, "stats": stats}
    return cfg


def warm_workers() -> None:
    """Start one worker per CPU, import torch and distmerge and load the compiled kernels in
    it, as a long merge would have (numba compiles a kernel once per machine, on first use)."""
    import ray

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import distmerge.engine.worker  # noqa: F401
        from distmerge.aim import relax_kernel
        from distmerge.methods import kernels

        kernels.warm_up()
        relax_kernel.warm_up()
        return os.getpid()

    ray.get([warm.remote() for _ in range(int(ray.cluster_resources()["CPU"]))])


def run(method: str, model_gb: float, shard: str, workers: int | None, keep: bool) -> dict:
    root = WORK / f"synthetic-{model_gb:g}GB"
    base, experts = write_family(root, int(model_gb * 1e9), n_experts=2)
    inputs = safetensors_files([base, *experts])
    in_bytes = sum(p.stat().st_size for p in inputs)
    out_bytes = sum(p.stat().st_size for p in safetensors_files([base]))
    evict(inputs)
    io_seconds = sequential_io(inputs, root / "io-baseline.bin", out_bytes)
    (root / "io-baseline.bin").unlink()
    evict(inputs)
    out = root / f"out-{method}"
    cfg = parse_config(merge_config(method, base, experts))
    ray_started = time.perf_counter()
    connect(None)  # Ray start-up and worker warm-up are timed apart: constants, not per-byte costs
    warm_workers()
    ray_seconds = time.perf_counter() - ray_started
    started = time.perf_counter()
    report = run_merge(cfg, out, shard_size=parse_size(shard), workers=workers, overwrite=True, progress=False)
    merge_seconds = time.perf_counter() - started
    if not keep:
        shutil.rmtree(out)
    shard_bytes = parse_size(shard)
    peak = max(w["peak_anon_rss"] for w in report["workers"])
    return {
        "method": method, "model_gb": round(out_bytes / 1e9, 3), "input_gb": round(in_bytes / 1e9, 3),
        "io_bound_s": round(io_seconds, 2), "merge_s": round(merge_seconds, 2), "ray_start_s": round(ray_seconds, 2),
        "ratio_to_io": round(merge_seconds / io_seconds, 2), "input_gb_per_s": round(in_bytes / 1e9 / merge_seconds, 3),
        "peak_worker_anon_rss_gb": round(peak / 1e9, 3), "rss_target_gb": round((2 * shard_bytes + 1e9) / 1e9, 3),
        "shard": shard, "workers": len(report["workers"]), "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-gb", type=float, default=1.0)
    parser.add_argument("--method", default="linear")
    parser.add_argument("--shard-size", default="256MB")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median ratio is reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs = [run(args.method, args.model_gb, args.shard_size, args.workers, args.keep) for _ in range(args.repeat)]
    for r in runs:
        print(json.dumps(r))
    best = sorted(runs, key=lambda r: r["ratio_to_io"])[len(runs) // 2]
    print("median:", json.dumps(best))


if __name__ == "__main__":
    main()
