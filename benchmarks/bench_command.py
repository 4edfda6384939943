"""The whole command as a user runs it: ``distmerge merge`` from process start to exit.

    .venv/bin/python -m benchmarks.bench_command --model-gb 1 --repeat 3 --methods linear --executors local,ray

Three synthetic bf16 models (``benchmarks.synthetic``; base + 2 experts of ``--model-gb`` each)
are merged by the CLI in a fresh process each time (imports, planning, the executor's start:
nothing for ``local``, a cold embedded Ray and its workers importing torch and numba for
``ray``; merging, verification, fsync, exit), inputs in the page cache
(each repeat reads them once first), next to two baselines measured in the same repeat: the
plain sequential I/O bound (read every input byte, write the output bytes, fsync) and mergekit
0.1.5's own whole command (``mergekit-yaml``, from its reference environment; skipped with a
warning where it cannot be made). The first distmerge run of the script is reported apart: on a
fresh machine it compiles the numba kernels (cached afterwards). ``--verify`` runs distmerge
once per ``execution.verify`` setting in each repeat (``full``: every byte read back, what every
merge did before the sampled verification), and once per ``--executors`` entry. Each run's
phases (``phases_s`` of its report) are printed too; the time outside them is imports before
and the interpreter's exit (with Ray's shutdown) after. Configs: ``bench_engine.merge_config``
(float32 compute, bfloat16 output), identical for both tools; the two outputs are compared
as the compatibility suite compares them (largest ulp distance, share of identical elements).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.bench_engine import merge_config
from benchmarks.io_baseline import safetensors_files, sequential_io
from benchmarks.mergekit_runner import run_mergekit
from benchmarks.synthetic import write_family
from distmerge.testing.compare import compare_tensors, load_folder

WORK = Path(__file__).parent / "_work"


def config(method: str, base: Path, experts: list[Path], verify: str | None = None) -> dict:
    data = merge_config(method, base, experts)
    if verify is not None:
        data["execution"] = {"verify": verify}
    return data


def distmerge_command(cfg: Path, out: Path, executor: str = "auto") -> tuple[float, dict[str, float]]:
    shutil.rmtree(out, ignore_errors=True)
    exe = Path(sys.executable).with_name("distmerge")
    started = time.perf_counter()
    run = subprocess.run([str(exe), "merge", str(cfg), str(out), "--no-progress", "--executor", executor],
                         capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"distmerge failed: {run.stderr[-2000:]}")
    return seconds, json.loads((out / "merge_report.json").read_text()).get("phases_s", {})


def agreement(theirs: Path, ours: Path) -> dict[str, float]:
    """How the two outputs compare, as the compatibility suite compares them (tests/compat):
    the largest distance in units in the last place, and the share of identical elements."""
    cmp = compare_tensors(load_folder(theirs), load_folder(ours))
    if cmp.structure_problems():
        raise SystemExit(f"outputs differ in structure: {cmp.structure_problems()[:3]}")
    return {"max_ulp_vs_mergekit": cmp.max_ulp, "identical_share_vs_mergekit": cmp.identical_share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default="linear")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--verify", default="sample", help="comma-separated execution.verify settings to run")
    parser.add_argument("--executors", default="local,ray", help="comma-separated --executor values to run")
    args = parser.parse_args()
    root = WORK / f"command-{args.model_gb:g}GB"
    base, experts = write_family(root / "models", int(args.model_gb * 1e9), n_experts=2)
    inputs = safetensors_files([base, *experts])
    out_bytes = sum(p.stat().st_size for p in safetensors_files([base]))
    rows: dict[str, list[dict[str, float]]] = {}
    first: float | None = None
    for _ in range(args.repeat):
        for method in args.methods.split(","):
            bound = sequential_io(inputs, root / "bound.bin", out_bytes)  # also puts the inputs in the page cache
            row = {"io_bound_s": bound}
            variants = [(e, v) for e in args.executors.split(",") for v in args.verify.split(",")]
            for executor, verify in variants:
                cfg = root / f"{method}-{verify}.yml"
                cfg.write_text(yaml.safe_dump(config(method, base, experts, verify)))
                seconds, phases = distmerge_command(cfg, root / "out", executor)
                if first is None:
                    first = seconds
                    seconds, phases = distmerge_command(cfg, root / "out", executor)  # the kernels are compiled now
                name = f"{executor}_{verify}"
                row.update({f"distmerge_{name}_s": seconds, f"distmerge_{name}_vs_bound": seconds / bound,
                            f"outside_phases_{name}_s": seconds - sum(phases.values()),
                            **{f"{name}:{phase}_s": s for phase, s in phases.items()}})
            seconds = row[f"distmerge_{variants[0][0]}_{variants[0][1]}_s"]
            if not args.no_mergekit:
                shutil.rmtree(root / "out-mergekit", ignore_errors=True)
                mk = run_mergekit(config(method, base, experts), root / "out-mergekit", root)
                if mk is not None:
                    row.update(mergekit_s=mk["seconds"], distmerge_vs_mergekit=seconds / mk["seconds"],
                               **agreement(root / "out-mergekit", root / "out"))
            rows.setdefault(method, []).append(row)
            print(json.dumps({"method": method, **{k: round(v, 3) for k, v in row.items()}}), flush=True)
    summary = {m: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for m, rs in rows.items()}
    print("median:", json.dumps({"model_gb": args.model_gb, "repeat": args.repeat, "cpus": os.cpu_count(),
                                 "first_distmerge_run_s": round(first or 0, 2), "methods": summary}, indent=1))


if __name__ == "__main__":
    main()
