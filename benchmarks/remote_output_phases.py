"""Where the time of a merge into ``s3://`` goes: parts merged and uploaded, files completed, the
read-back verification, the small files.

    .venv/bin/python -m benchmarks.remote_output_phases --model-gb 0.5 --repeat 2

The task_arithmetic merge of ``bench_remote`` (local bf16 inputs, written if missing) into an S3
server on loopback (moto behind the counting proxy), Ray up before the first run. The phases are
timed by wrapping the output target's methods in this process; the last run is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from benchmarks.bench_remote import WORK, merge_config
from benchmarks.synthetic import write_family

SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - started
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-gb", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import distmerge.engine.finalize as finalize
    from distmerge.config import parse_config
    from distmerge.engine.cluster import connect
    from distmerge.engine.run import run_merge
    from distmerge.output.object_store import ObjectStoreOutput
    from distmerge.testing.s3_server import S3Server

    root = WORK / f"remote-{args.model_gb:g}GB"
    base, experts = write_family(root / "models", int(args.model_gb * 1e9), n_experts=2)
    names = {"base": str(base), "expert1": str(experts[0]), "expert2": str(experts[1])}
    finalize.verify_output = timed("verify (read back)", finalize.verify_output)
    ObjectStoreOutput.file_done = timed("complete files", ObjectStoreOutput.file_done)  # type: ignore[method-assign]
    ObjectStoreOutput.publish = timed("small files and index", ObjectStoreOutput.publish)  # type: ignore[method-assign]
    ObjectStoreOutput.examine = timed("examine (and --overwrite)", ObjectStoreOutput.examine)  # type: ignore[method-assign]
    with S3Server() as s3:
        s3.client().create_bucket(Bucket="bench-merges")
        os.environ.update(s3.env(), DISTMERGE_CACHE=str(root / "cache"))
        connect(None)
        for _ in range(args.repeat):
            SPENT.clear()
            started = time.perf_counter()
            report = run_merge(parse_config(merge_config(names)), "s3://bench-merges/phases", overwrite=True,
                               progress=False)
            total = time.perf_counter() - started
        rest = total - sum(SPENT.values())
        print(json.dumps({"total_s": round(total, 2), **{k: round(v, 2) for k, v in SPENT.items()},
                          "plan, merge and part uploads (the rest)": round(rest, 2),
                          "bytes_uploaded": report["bytes_uploaded"], "parts": sum(
                              n["parts_uploaded"] for n in report["nodes"].values())}, indent=1))


if __name__ == "__main__":
    main()
