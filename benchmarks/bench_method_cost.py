"""Per-core cost of each method relative to linear, in one process without Ray.

    .venv/bin/python -m benchmarks.bench_method_cost --model-gb 0.5 --repeat 3 --plot benchmarks/method_cost.png

Runs the engine's own schedule and worker functions (reduction rounds, merge-and-write of every
unit, each tensor read once where its rows fit the shard size) one task at a time on one thread over the synthetic checkpoints, page cache warm, alternating the
methods so background load hits them alike. On a shared machine this ratio is steadier than
wall-clock figures of the multi-process engine.

``--shard-mb 256,600`` runs every method at each shard size, alternated in each repeat (rows
``method@256MB``, each against linear at the same size): what reading a tensor once, rather
than once for its rounds and again for its merge, is worth per method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_engine import merge_config
from benchmarks.synthetic import Shape, write_family
from distmerge.config import parse_config
from distmerge.engine.executors import execute
from distmerge.engine.schedule import MergeSchedule
from distmerge.engine.worker import MergeJob
from distmerge.io.writes import create_file
from distmerge.output.writers import LocalFiles
from distmerge.plan import batches, build_plan
from distmerge.testing.method_cases import CASES

WORK = Path(__file__).parent / "_work"
WARM_UP_SHAPE = Shape(hidden=128, intermediate=256, vocab=512, heads=4, kv_heads=2)  # compiles, costs nothing


def one_merge(method: str, base: Path, experts: list[Path], out: Path, shard_size: int = 256 * 10**6) -> float:
    plan = build_plan(parse_config(merge_config(method, base, experts)), shard_size)
    out.mkdir(parents=True, exist_ok=True)
    for f in plan.files:
        create_file(out / f.name, f.header, f.size)
    job = MergeJob(plan.method.name, tuple(plan.tensors), LocalFiles(tuple(str(out / f.name) for f in plan.files)),
                   plan.compute_dtype, 0)
    started = time.perf_counter()
    schedule = MergeSchedule(plan, list(batches(plan.units, plan.shard_size, plan.read_once_tensors)))
    while (task := schedule.take()) is not None:  # the engine's order, one task at a time
        schedule.done(task, execute(job, task))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-gb", type=float, default=0.5)
    parser.add_argument("--methods", default=",".join(CASES), help="comma-separated; default: every method")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--shard-mb", default="256",
                        help="the merge's shard size in MB (default: distmerge's); comma-separated to compare several")
    parser.add_argument("--plot", type=Path, help="also draw each method's time against linear's into this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, experts = write_family(WORK / f"synthetic-{args.model_gb:g}GB", int(args.model_gb * 1e9))
    methods = args.methods.split(",")
    shards = [int(v) for v in args.shard_mb.split(",")]
    runs = [(m, mb) for m in methods for mb in shards]
    label = {(m, mb): m if len(shards) == 1 else f"{m}@{mb}MB" for m, mb in runs}
    times: dict[str, list[float]] = {label[r]: [] for r in runs}
    tiny_base, tiny_experts = write_family(WORK / "synthetic-warm-up", 10**6, shape=WARM_UP_SHAPE)
    for m in methods:  # compile (or load) every method's kernels before anything is timed
        one_merge(m, tiny_base, tiny_experts, WORK / "cost-warm-up")
    one_merge(methods[0], base, experts, WORK / "cost-out")  # warm the page cache
    for k in range(args.repeat):
        for m in methods:
            for mb in shards if k % 2 == 0 else shards[::-1]:  # neither size always first
                times[label[m, mb]].append(one_merge(m, base, experts, WORK / "cost-out", mb * 10**6))
    best = {name: min(v) for name, v in times.items()}
    median = {name: statistics.median(v) for name, v in times.items()}
    linear = {mb: label["linear", mb] for mb in shards} if "linear" in methods else {}
    print("| method | best seconds (1 thread) | median seconds | ratio to linear (best) | ratio (median) |")
    print("|---|---:|---:|---:|---:|")
    for m, mb in runs:
        name, base_name = label[m, mb], linear.get(mb)
        ratios = (f"{best[name] / best[base_name]:.2f} | {median[name] / median[base_name]:.2f}"
                  if base_name else "- | -")
        print(f"| {name} | {best[name]:.2f} | {median[name]:.2f} | {ratios} |")
    print(json.dumps(times))
    if args.plot and linear:
        plot_ratios({label[r]: best[label[r]] / best[linear[r[1]]] for r in runs}, args.plot, args.model_gb)


def plot_ratios(ratios: dict[str, float], path: Path, model_gb: float) -> None:
    """A bar per method: its time over linear's on one core, the 2x target drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(ratios, key=ratios.get)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(order) + 1.2))
    ax.barh(order, [ratios[m] for m in order], color=["#c44" if ratios[m] > 2.0 else "#4a7" for m in order])
    ax.axvline(2.0, color="k", linestyle="--", linewidth=1, label="target: 2x linear")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    for k, m in enumerate(order):
        ax.text(ratios[m] + 0.03, k, f"{ratios[m]:.2f}", va="center", fontsize=8)
    ax.set_xlabel(f"time / linear's time (one core, 3 x {model_gb:g} GB bf16, best of the repeats)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
