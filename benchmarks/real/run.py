"""The one command: fine-tune SmolLM2 experts, calibrate, merge every combination, evaluate, report.

    .venv/bin/python -m benchmarks.real.run --out benchmarks/_work/real

Per seed, one expert per skill is fine-tuned (every parameter) from SmolLM2-135M-Instruct.
The base is calibrated once (its statistics do not depend on the seed) through distmerge's own
staged calibration on Ray. Every pair and the triple of experts is merged with
task_arithmetic, TIES and dare_ties, without AIM, with AIM and the uniform control at omega
0.2 / 0.4 / 0.6, and with the shuffled-channel control at omega 0.4; each merge is written by
``run_merge`` in bf16 (the experts' dtype, as users merge) and scored by
:mod:`benchmarks.real.evaluate`. Experts are cached by their training spec and each scored
model is appended to ``results.jsonl`` as it finishes, so an interrupted run resumes where it
stopped and a partial run still reports. The headline group (omega 0.4, every seed) runs first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality.run import aim_diagnostics, shuffled_statistics
from benchmarks.real import model
from benchmarks.real.evaluate import evaluate
from benchmarks.real.skills import test_set, training_stream

log = logging.getLogger("real")

SKILLS = ("reverse", "shift", "sort")
METHODS: dict[str, dict[str, Any]] = {
    # Per-expert parameters, as in the toy experiment (benchmarks/quality): weight 1 each (the
    # task-vector sum for task_arithmetic and dare_ties, TIES averages agreeing deltas), density
    # 0.5 for the sparsifiers.
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
}
COMBOS: list[tuple[str, ...]] = [c for k in (2, 3) for c in itertools.combinations(SKILLS, k)]
OMEGAS = (0.2, 0.4, 0.6)
HEADLINE_OMEGA = 0.4
SHUFFLED_OMEGAS = (0.4,)


@dataclass(frozen=True)
class Scale:
    """Step counts and evaluation sizes, sized so the whole command takes about 1.5-2 hours."""

    expert_steps: int = 30
    batch: int = 16
    lr: float = 1e-4
    n_prompts: int = 64          # per skill, fixed held-out prompts
    n_ppl_blocks: int = 6        # 256-token blocks of pydoc_data prose
    n_cal_samples: int = 128     # builtin calibration set, 256-token blocks
    cal_block: int = 256


QUICK = Scale(expert_steps=3, batch=4, n_prompts=8, n_ppl_blocks=1, n_cal_samples=4, cal_block=64)


def perplexity_blocks(tok: Any, n: int, width: int = 256) -> torch.Tensor:
    """``n`` fixed blocks of natural English: CPython's pydoc_data topics (not in the builtin set)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text[: 400 * width * n], add_special_tokens=False)["input_ids"]
    stride = len(ids) // n
    return torch.tensor([ids[i * stride: i * stride + width] for i in range(n)])


def merge_config(method: str, base: Path, experts: list[Path], seed: int, aim: dict[str, Any] | None) -> Any:
    from distmerge.config import parse_config

    cfg: dict[str, Any] = {
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(e), "parameters": dict(METHODS[method])} for e in experts],
        "execution": {"seed": seed, "verify": False},
    }
    if aim is not None:
        cfg["aim"] = aim
    return parse_config(cfg, f"{method} merge")


class Results:
    """``results.jsonl``: one scored model per line, keyed; what is there is never redone."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = {json.loads(line)["key"] for line in path.read_text().splitlines()} if path.is_file() else set()

    def record(self, key: str, folder: Path, score: Any, **fields: Any) -> None:
        if key in self.done:
            return
        t = time.time()
        row = {"key": key, **fields, **score(folder)}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.done.add(key)
        log.info("%s: %s (eval %.1fs)", key, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)},
                 time.time() - t)


def run(out: Path, scale: Scale, seeds: list[int], methods: list[str]) -> None:
    from distmerge.aim import calibrate
    from distmerge.config import AimConfig, CalibrationConfig
    from distmerge.engine.cluster import connect
    from distmerge.engine.run import run_merge
    from distmerge.testing import real_models

    base = real_models.converted(real_models.SMOLLM2, "bfloat16")
    tok = model.tokenizer(base)
    blocks = perplexity_blocks(tok, scale.n_ppl_blocks)
    held = {s: {q for q, _ in test_set(s, scale.n_prompts)} for s in SKILLS}
    results = Results(out / "results.jsonl")

    def score(folder: Path, skills: tuple[str, ...] = SKILLS) -> Any:
        return evaluate(model.load(folder), tok, list(skills), scale.n_prompts, blocks)

    # 1. Experts: every seed's, before any merge (the merges then interleave seeds).
    experts: dict[tuple[int, str], Path] = {}
    results.record("base", base, score, kind="base", seed=None, method="-", combo="-", variant="base", omega=None)
    for seed in seeds:
        for i, skill in enumerate(SKILLS):
            spec = model.TrainSpec(skill=skill, seed=seed * 100 + i, steps=scale.expert_steps, batch=scale.batch,
                                   lr=scale.lr)
            draw = training_stream(skill, spec.seed, held[skill])
            path = model.train(base, out / f"seed{seed}" / f"expert_{skill}", spec, draw)
            experts[(seed, skill)] = path
            results.record(f"{seed}/expert/{skill}", path, score, kind="expert", seed=seed, method="-", combo=skill,
                           variant="expert", omega=None)

    # 2. The base's statistics, once, through distmerge's staged calibration on Ray.
    connect(num_cpus=2)
    stats_path = out / "aim_stats.safetensors"
    if not stats_path.is_file():
        t = time.time()
        cal = CalibrationConfig(dataset="builtin", n_samples=scale.n_cal_samples, block_size=scale.cal_block, seed=0)
        calibrate(base, AimConfig(calibration=cal, stages=2), stats_path, progress=False)
        log.info("calibrated the base in %.0fs", time.time() - t)
    (out / "aim_diagnostics.json").write_text(json.dumps(aim_diagnostics(stats_path), indent=1))

    # 3. Merges: the headline omega for every seed first, then the other omegas.
    merged = out / "merged"
    groups = [[("none", None)] * (w == HEADLINE_OMEGA)
              + [(v, w) for v in ("aim", "uniform", "shuffled") if v != "shuffled" or w in SHUFFLED_OMEGAS]
              for w in (HEADLINE_OMEGA, *[o for o in OMEGAS if o != HEADLINE_OMEGA])]
    for variants in groups:
        for seed in seeds:
            shuffled = shuffled_statistics(stats_path, out / f"seed{seed}" / "aim_stats_shuffled.safetensors", seed)
            for method, combo, (variant, omega) in itertools.product(methods, COMBOS, variants):
                key = f"{seed}/{method}/{'+'.join(combo)}/{variant}/{omega}"
                if key in results.done:
                    continue
                aim = None if omega is None else {
                    "omega": omega, "stats": str(shuffled if variant == "shuffled" else stats_path),
                    "relaxation": "uniform" if variant == "uniform" else "activation"}
                t = time.time()
                cfg = merge_config(method, base, [experts[(seed, s)] for s in combo], seed, aim)
                run_merge(cfg, merged, workers=2, overwrite=True, progress=False)
                log.info("merge %s in %.1fs", key, time.time() - t)
                results.record(key, merged, lambda f, c=combo: score(f, c), kind="merge", seed=seed, method=method,
                               combo="+".join(combo), variant=variant, omega=omega)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/_work/real"))
    p.add_argument("--seeds", type=int, default=2, help="seeds of expert training (0, 1, ...)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny step counts and evaluation sets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("distmerge", "ray", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else Scale()
    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {', '.join(METHODS)}")
    settings = {"scale": asdict(scale), "seeds": args.seeds, "methods": methods, "skills": SKILLS}
    (out / "settings.json").write_text(json.dumps(settings, indent=1))
    started = time.time()
    run(out, scale, list(range(args.seeds)), methods)
    log.info("done in %.0fs", time.time() - started)
    if not args.no_report:
        from benchmarks.real.report import write_report

        write_report(out)


if __name__ == "__main__":
    main()
