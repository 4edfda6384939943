"""What a first merge pays for compiling, and what ``distmerge warm-up`` takes away.

    .venv/bin/python -m benchmarks.bench_warm_up [--methods linear,ties,...] [--speed]

Every number is a whole command in a fresh process (``python -m distmerge.cli ...``, start to
exit), each against its own empty numba cache folder (``NUMBA_CACHE_DIR``) so nothing this
machine compiled before counts:

1. ``distmerge warm-up`` into an empty cache (every method, bf16/fp16/fp32, 2 and 3 experts),
   then again into the cache it filled;
2. per method, one merge of tiny bf16 models (``--executor local``): the first one on a new
   machine (an empty cache) against the same merge after the warm-up;
3. the cache key: a warm-up with the CPU pinned (``NUMBA_CPU_NAME=x86-64-v3``, empty
   ``NUMBA_CPU_FEATURES``, as cluster/Dockerfile sets them) serves a merge with the same pin and
   not one keyed to this machine's CPU (standing for a node of another model);
4. with ``--speed``: the pinned kernels' per-core speed against this CPU's own, in
   ``bench_method_cost`` at 0.5 GB, alternating the two.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from distmerge.testing.method_cases import CASES, method_config

WORK = Path(__file__).parent / "_work" / "warm-up"
ROOT = Path(__file__).resolve().parents[1]
PINNED = {"NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": ""}
COUNTING = ("import sys\nfrom distmerge.warm_up import counting_compiles\nfrom distmerge.cli import main\n"
            "with counting_compiles() as c:\n    code = main(sys.argv[1:])\nprint('compiled:', len(c))\nsys.exit(code)\n")


def command(args: list[str], cache: Path, extra_env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run ``distmerge ARGS`` in a fresh process with numba's cache in ``cache``; seconds and stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    env.update({"NUMBA_CACHE_DIR": str(cache), **(extra_env or {})})
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COUNTING, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"distmerge {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def compiled(stdout: str) -> int:
    return int(re.findall(r"compiled: (\d+)", stdout)[-1])


def fresh(name: str) -> Path:
    path = WORK / name
    shutil.rmtree(path, ignore_errors=True)
    return path


def merge_args(method: str, models: tuple[Path, list[Path]], name: str) -> list[str]:
    config = WORK / f"{name}.yml"
    config.write_text(yaml.safe_dump(method_config(method, *models)))
    out = fresh(f"out-{name}")
    return ["merge", str(config), str(out), "--executor", "local", "--no-progress"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default=",".join(CASES), help="comma-separated; default: every method")
    parser.add_argument("--speed", action="store_true", help="also the pinned CPU's per-core speed (minutes)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    import torch

    from distmerge.testing.tiny import build_family

    models = build_family(fresh("models"), n_experts=2, dtype=torch.bfloat16, num_hidden_layers=1)

    warm = fresh("cache-warm")
    cold_s, out = command(["warm-up", "--no-progress"], warm)
    print(f"warm-up into an empty cache: {cold_s:.1f} s, {compiled(out)} functions compiled")
    again_s, out = command(["warm-up", "--no-progress"], warm)
    print(f"warm-up again (cache filled): {again_s:.1f} s, {compiled(out)} compiled")

    print("\n| method | first merge, empty cache (s) | functions compiled | after warm-up (s) | compiled |")
    print("|---|---:|---:|---:|---:|")
    totals = [0.0, 0.0]
    for m in methods:
        first_s, first = command(merge_args(m, models, m), fresh(f"cache-{m}"))
        after_s, after = command(merge_args(m, models, m), warm)
        totals[0] += first_s
        totals[1] += after_s
        print(f"| {m} | {first_s:.1f} | {compiled(first)} | {after_s:.1f} | {compiled(after)} |")
    print(f"| all {len(methods)} | {totals[0]:.1f} | | {totals[1]:.1f} | |")

    pinned = fresh("cache-pinned")
    pin_s, out = command(["warm-up", "--no-progress", "--methods", "ties", "--dtypes", "bfloat16"], pinned, PINNED)
    _, same = command(merge_args("ties", models, "ties-pinned"), pinned, PINNED)
    _, host = command(merge_args("ties", models, "ties-host"), pinned)
    print(f"\npinned CPU: warm-up of ties {pin_s:.1f} s ({compiled(out)} compiled); a ties merge with the same pin "
          f"compiles {compiled(same)}, one keyed to this machine's CPU compiles {compiled(host)}")

    if args.speed:
        speed(["linear", "ties", "dare_ties", "della", "sce", "slerp", "model_stock"])


def speed(methods: list[str]) -> None:
    """``bench_method_cost`` with the pinned CPU and with this machine's, alternated twice."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(2):
        for label, extra in (("this CPU", {}), ("x86-64-v3", PINNED)):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_method_cost", "--model-gb", "0.5",
                                   "--repeat", "2", "--methods", ",".join(methods)],
                                  capture_output=True, text=True, env={**env, **extra}, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            for line in proc.stdout.splitlines():
                cells = [c.strip() for c in line.strip("|").split("|")]
                if cells and cells[0] in methods:
                    rows.setdefault(cells[0], {}).setdefault(label, []).append(float(cells[1]))
    print("\n| method (one core, 3 x 0.5 GB bf16) | this CPU, best (s) | x86-64-v3, best (s) | pinned / this CPU |")
    print("|---|---:|---:|---:|")
    for m in methods:
        own, pin = min(rows[m]["this CPU"]), min(rows[m]["x86-64-v3"])
        print(f"| {m} | {own:.2f} | {pin:.2f} | {pin / own:.2f} |")


if __name__ == "__main__":
    main()
