"""What verification costs a finishing merge: every byte read back (full), a sample, or none.

    .venv/bin/python -m benchmarks.bench_verify --model-gb 1 --repeat 3

The task_arithmetic merge of three synthetic bf16 models (``benchmarks.synthetic``; 1 GB each
at ``--model-gb 1``) into a local directory and into ``gs://`` (the Cloud Storage test server,
in memory, on loopback), once per ``execution.verify`` setting in each repeat, interleaved, Ray
up before the first run, inputs in the page cache. Reported per output and setting, median of
the repeats: the whole ``run_merge`` call, the verification inside it (``verify_output``, timed
by wrapping it here), its share of the call, the bytes it read back, and the ratio of the call
to the same call with ``verify: full`` (what every merge paid before the sample).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

from benchmarks.bench_remote import WORK, merge_config
from benchmarks.remote_output_phases import SPENT, timed
from benchmarks.synthetic import write_family

MODES = ("full", "sample", "layout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import distmerge.engine.finalize as finalize
    from distmerge.config import parse_config
    from distmerge.engine.cluster import connect
    from distmerge.engine.run import run_merge
    from distmerge.testing.gcs_server import GcsServer

    root = WORK / f"verify-{args.model_gb:g}GB"
    base, experts = write_family(root / "models", int(args.model_gb * 1e9), n_experts=2)
    names = {"base": str(base), "expert1": str(experts[0]), "expert2": str(experts[1])}
    finalize.verify_output = timed("verify", finalize.verify_output)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with GcsServer() as gcs:
        gcs.create_bucket("bench-merges")
        os.environ.update(gcs.env(), DISTMERGE_CACHE=str(root / "cache"))
        connect(None)
        outputs = {"local": str(root / "out"), "gs": "gs://bench-merges/verify"}
        for _ in range(args.repeat):
            for output, location in outputs.items():
                for mode in MODES:
                    config = {**merge_config(names), "execution": {"verify": mode}}
                    SPENT.clear()
                    started = time.perf_counter()
                    report = run_merge(parse_config(config), location, overwrite=True, progress=False)
                    total = time.perf_counter() - started
                    row = {"total_s": total, "verify_s": SPENT["verify"],
                           "read_back_gb": report["verify"]["bytes_scanned"] / 1e9}
                    runs.setdefault((output, mode), []).append(row)
                    print(json.dumps({"output": output, "verify": mode, **{k: round(v, 3) for k, v in row.items()}}),
                          flush=True)
    table = []
    for (output, mode), rows in runs.items():
        median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        full = statistics.median(r["total_s"] for r in runs[(output, "full")])
        table.append({"output": output, "verify": mode, **{k: round(v, 3) for k, v in median.items()},
                      "verify_share": round(median["verify_s"] / median["total_s"], 3),
                      "total_vs_full": round(median["total_s"] / full, 3)})
    print("median:", json.dumps({"model_gb": args.model_gb, "repeat": args.repeat, "cpus": os.cpu_count(),
                                 "rows": table}, indent=1))


if __name__ == "__main__":
    main()
