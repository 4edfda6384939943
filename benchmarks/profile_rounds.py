"""Where one method's per-core time goes: the reduction rounds' reads and casts, their math
(``partial_reductions`` and ``reduce``), and the merge's reads and math.

    .venv/bin/python -m benchmarks.profile_rounds --model-gb 0.5 --methods linear,ties,della

The same worker steps :mod:`benchmarks.bench_method_cost` times as a whole, each timed apart on
one thread (no writes, no Ray), after every kernel is compiled on a tiny family. It says whether
a method's cost over linear is its extra reads (what reading a tensor once would save) or the
arithmetic of its rounds (what only a change of the method's rounds would save).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from benchmarks.bench_engine import merge_config
from benchmarks.bench_method_cost import WARM_UP_SHAPE, WORK, one_merge
from benchmarks.synthetic import write_family
from distmerge.config import parse_config
from distmerge.engine.memory import retain_freed_memory
from distmerge.engine.worker import MergeJob, chunk_partials, compute_rows, merge_block, read_block
from distmerge.methods.base import Partials, Reductions, chunk_read
from distmerge.plan import MergePlan, build_plan


def profile(plan: MergePlan) -> dict[str, float]:
    """Seconds per step of one merge of ``plan`` (no output written)."""
    job = MergeJob(plan.method.name, tuple(plan.tensors), None, plan.compute_dtype, 0)  # type: ignore[arg-type]
    seconds: dict[str, float] = defaultdict(float)
    reduced: dict[int, Reductions] = {}

    def timed(step: str, fn, *args):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        out = fn(*args)
        seconds[step] += time.perf_counter() - started
        return out

    for round_ in range(plan.reduction_rounds):
        partials: dict[int, list[Partials]] = defaultdict(list)
        for u in plan.reduction_units(round_):
            if not chunk_read(reduced.get(u.tensor), round_, u.row_start, u.row_end):
                continue
            raw = timed("rounds: read", read_block, job, u)
            rows = timed("rounds: cast", compute_rows, job, u, raw)
            partials[u.tensor].append(timed("rounds: partials", chunk_partials, job, u, rows, round_,
                                            reduced.get(u.tensor)))
        for i, parts in partials.items():
            t = plan.tensors[i]
            reduced[i] = timed("rounds: reduce", plan.method.reduce, parts, t.params, t.shape, round_, reduced.get(i))
    for u in plan.units:
        raw = timed("merge: read", read_block, job, u)
        timed("merge: cast and math", merge_block, job, u, raw, reduced.get(u.tensor))
    return dict(seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-gb", type=float, default=0.5)
    parser.add_argument("--methods", default="linear,ties,della,multislerp,karcher,arcee_fusion")
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()  # as the engine's workers do: casts reuse their buffers
    base, experts = write_family(WORK / f"synthetic-{args.model_gb:g}GB", int(args.model_gb * 1e9))
    tiny_base, tiny_experts = write_family(WORK / "synthetic-warm-up", 10**6, shape=WARM_UP_SHAPE)
    methods = args.methods.split(",")
    for m in methods:
        one_merge(m, tiny_base, tiny_experts, WORK / "cost-warm-up")
    print("| method | rounds | " + " | ".join(STEPS) + " | total |")
    print("|---|---:|" + "---:|" * (len(STEPS) + 1))
    results = {}
    for m in methods:
        plan = build_plan(parse_config(merge_config(m, base, experts)), 256 * 10**6)
        seconds = profile(plan)
        results[m] = seconds
        cells = " | ".join(f"{seconds.get(s, 0.0):.2f}" for s in STEPS)
        print(f"| {m} | {plan.reduction_rounds} | {cells} | {sum(seconds.values()):.2f} |", flush=True)
    print(json.dumps(results))


STEPS = ("rounds: read", "rounds: cast", "rounds: partials", "rounds: reduce", "merge: read", "merge: cast and math")

if __name__ == "__main__":
    main()
