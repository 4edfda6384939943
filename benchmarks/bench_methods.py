"""Every merge method through the engine benchmark: seconds, ratio to linear, ratio to I/O.

    .venv/bin/python -m benchmarks.bench_methods --model-gb 0.5

Runs :func:`benchmarks.bench_engine.run` once per method on the same synthetic bf16 family
(base + two experts) and prints a markdown table; each method's config is
:func:`benchmarks.bench_engine.merge_config` (its case in ``distmerge.testing.method_cases``).
Targets (issue 17): TIES within 1.5x of linear, every other method within 2x.
"""

from __future__ import annotations

import argparse
import json
import logging

from benchmarks import bench_engine
from distmerge.testing.method_cases import CASES

METHODS = list(CASES)  # every method of the registry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-gb", type=float, default=1.0)
    parser.add_argument("--shard-size", default="256MB")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
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
