"""The whole ``distmerge calibrate`` command as a user runs it: one stage in the command's own
process (``--executor local``, what ``auto`` picks on one machine without Ray) against the Ray
pipeline of one stage actor (``--executor ray``: a cold embedded Ray and its actor).

    .venv/bin/python -m benchmarks.bench_calibrate_command --repeat 3

Each run is a fresh process, timed from its start to its exit (imports, tokenizing, the forward,
the statistics file and the printed summary included); the two executors alternate within each
repeat, so both see the same machine load. The model is the demo's tiny bf16 Llama family
(``distmerge.testing.tiny.build_family``) or ``--model smollm2``/``gemma3`` (the real
checkpoints of ``distmerge.testing.real_models``). Both executors' statistics files must hold
identical tensors; the script fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

WORK = Path(__file__).parent / "_work" / "calibrate-command"


def model_dir(name: str) -> Path:
    """The base model to calibrate: the tiny family's base (built once) or a real checkpoint."""
    if name != "tiny":
        from distmerge.testing import real_models

        return Path(getattr(real_models, name)())
    from distmerge.testing.tiny import build_family

    base = WORK / "family" / "base"
    if not (base / "config.json").exists():
        build_family(WORK / "family", n_experts=1, dtype=torch.bfloat16)
    return base


def timed_calibrate(config: Path, executor: str, out: Path) -> float:
    """Seconds from the command's start to its exit; raises with its stderr if it fails."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "distmerge", "calibrate", str(config), "--executor", executor,
                          "--out", str(out), "--no-progress"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"calibrate --executor {executor} failed:\n{run.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2", "gemma3"), default="tiny")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="aim.calibration.n_samples")
    parser.add_argument("--block-size", type=int, default=512)
    args = parser.parse_args()
    from safetensors.torch import load_file

    base = model_dir(args.model)
    WORK.mkdir(parents=True, exist_ok=True)
    config = WORK / f"{args.model}.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(base), "parameters": {"weight": 1.0}}],  # calibrate reads the base only
        "aim": {"omega": 0.4, "calibration": {"dataset": "builtin", "n_samples": args.samples,
                                              "block_size": args.block_size}},
    }))
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for _ in range(args.repeat):
        for executor in times:
            times[executor].append(timed_calibrate(config, executor, WORK / f"{executor}.safetensors"))
    local, ray = (load_file(WORK / f"{e}.safetensors") for e in ("local", "ray"))
    if local.keys() != ray.keys() or not all(torch.equal(local[k], ray[k]) for k in local):
        raise SystemExit("the in-process and the Ray statistics differ")
    print(json.dumps({
        "model": args.model, "modules": len(local), "local_s": [round(t, 2) for t in times["local"]],
        "ray_s": [round(t, 2) for t in times["ray"]],
        "median_ratio_ray_to_local": round(statistics.median(times["ray"]) / statistics.median(times["local"]), 2),
        "statistics_identical": True,
    }))


if __name__ == "__main__":
    main()
