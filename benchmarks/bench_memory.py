"""Memory against size: the same linear merge at growing sizes, up to inputs larger than RAM.

    .venv/bin/python -m benchmarks.bench_memory --sizes 1,3,8.5

Peak anonymous RSS per worker and of the driver must stay flat as the model grows; the last
size should make the three inputs together larger than this machine's RAM. Each size's
checkpoints are deleted after its run to keep the disk free. Writes memory_vs_size.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

from benchmarks.bench_engine import merge_config, warm_workers
from benchmarks.bench_merge import timed_merge
from benchmarks.io_baseline import safetensors_files
from benchmarks.synthetic import write_family
from distmerge.engine.cluster import connect
from distmerge.sizes import parse_size

WORK = Path(__file__).parent / "_work"


def plot(rows: list[dict], path: Path, target_gb: float | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed; no plot written (pip install matplotlib)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["inputs_gb"] for r in rows]
    a.plot(x, [r["seconds"] for r in rows], "o-")
    a.set_xlabel("input GB (3 models)")
    a.set_ylabel("merge seconds")
    a.set_title("time against size")
    b.plot(x, [r["worker_peak_anon_gb"] for r in rows], "o-", label="worker peak anon RSS")
    b.plot(x, [r["driver_peak_anon_gb"] for r in rows], "s-", label="driver peak anon RSS")
    b.axvline(rows[0]["ram_gb"], color="grey", linestyle="--", label="machine RAM")
    if target_gb is not None:
        b.axhline(target_gb, color="red", linestyle=":", label="target per worker (2 x shard + 1 GB)")
    b.set_xlabel("input GB (3 models)")
    b.set_ylabel("GB")
    b.set_ylim(0, 1.15 * max([target_gb or 0.0] + [r["worker_peak_anon_gb"] for r in rows]))
    b.set_title("memory against size")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,3,8.5", help="GB per model")
    parser.add_argument("--shard-size", default="256MB")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    connect(None)
    warm_workers()
    ram = psutil.virtual_memory().total
    rows = []
    for size in [float(s) for s in args.sizes.split(",")]:
        root = WORK / f"memory-{size:g}GB"
        # Written by a child process, so this driver's memory figures are the merge's alone.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            base, experts = pool.submit(write_family, root, int(size * 1e9), 2).result()
        inputs = safetensors_files([base, *experts])
        in_bytes = sum(p.stat().st_size for p in inputs)
        seconds, report, driver_peak = timed_merge(merge_config("linear", base, experts), root / "out", args.shard_size, inputs)
        row = {"model_gb": size, "inputs_gb": round(in_bytes / 1e9, 2), "ram_gb": round(ram / 1e9, 1),
               "seconds": round(seconds, 1), "input_gb_per_s": round(in_bytes / 1e9 / seconds, 3),
               "worker_peak_anon_gb": round(max(w["peak_anon_rss"] for w in report["workers"]) / 1e9, 3),
               "driver_peak_anon_gb": round(driver_peak / 1e9, 3), "verify_ok": report["verify"]["ok"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(root)
    plot(rows, Path(__file__).parent / "memory_vs_size.png", (2 * parse_size(args.shard_size) + 10**9) / 1e9)


if __name__ == "__main__":
    main()
