"""The one command: pretrain, fine-tune, calibrate, merge every combination, evaluate, report.

    .venv/bin/python -m benchmarks.quality.run --seeds 3 --out benchmarks/_work/quality

Each seed runs the whole pipeline (base init and data order, experts, DARE draws); held-out
prompts and the train/calibration/test document split are fixed so seeds are comparable.
Checkpoints are cached by their training spec and every evaluated merge is appended to
``results.jsonl`` as it finishes, so a rerun skips finished work and an interrupted run still
leaves a usable table. Seeds run one after the other, each to completion, for the same reason.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import data, model
from benchmarks.quality.evaluate import evaluate
from benchmarks.quality.skills import SKILLS, held_out_prompts

log = logging.getLogger("quality")

METHODS: dict[str, dict[str, Any]] = {
    # Per-expert parameters; each expert gets weight 1 (plain task-vector sum for TA/DARE,
    # TIES' default normalisation averages the agreeing deltas). density 0.5 for the sparsifiers.
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    "dare_linear": {"weight": 1.0, "density": 0.5},
}
COMBOS: list[tuple[str, ...]] = [c for k in (2, 3) for c in itertools.combinations(SKILLS, k)]
OMEGAS = (0.2, 0.4, 0.6)
SHUFFLED_OMEGAS = (0.4,)  # the second control only at the headline omega: it answers its question there


@dataclass(frozen=True)
class Scale:
    """Step counts and evaluation sizes; ``--quick`` shrinks them for a smoke run."""

    pretrain_steps: int = 1100
    expert_steps: int = 300          # rev and sort; add gets twice as many
    batch: int = 32
    block: int = 64
    pretrain_task_rows: int = 6      # of ``batch``: partial skills in the base
    expert_generic_rows: int = 6     # of ``batch``: ~19% generic text keeps perplexity near the base's
    n_prompts: int = 300
    n_test_blocks: int = 200
    n_cal_blocks: int = 256
    cal_block: int = 128


QUICK = Scale(pretrain_steps=30, expert_steps=10, n_prompts=50, n_test_blocks=20, n_cal_blocks=16)


def corpus(out: Path) -> data.Corpus:
    """The docstring corpus, cached (parsing the stdlib takes a while on a busy machine)."""
    path = out / "corpus.json"
    if path.is_file():
        return data.Corpus(**json.loads(path.read_text()))
    c = data.load_corpus()
    path.write_text(json.dumps({"train": c.train, "calibration": c.calibration, "test": c.test}))
    return c


def trained(path: Path, spec: model.TrainSpec, init: Path | None, stream: Any, held: set[str]) -> Path:
    """The checkpoint for ``spec`` (from ``init`` or scratch): cached or trained now."""
    if model.cached(path, spec):
        log.info("cached: %s", path)
        return path
    m = model.new_model(spec.seed)
    if init is not None:
        model.load_weights(m, init)
    model.train(m, spec, stream, held, on_log=lambda s, loss: log.info("%s step %d loss %.3f", path.name, s, loss))
    return model.save(m, path, spec)


def merge_config(method: str, base: Path, experts: list[Path], seed: int, aim: dict[str, Any] | None) -> Any:
    from distmerge.config import parse_config

    cfg: dict[str, Any] = {
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(e), "parameters": dict(METHODS[method])} for e in experts],
        "dtype": "float32", "execution": {"seed": seed, "verify": False},
    }
    if aim is not None:
        cfg["aim"] = aim
    return parse_config(cfg, f"{method} merge")


def aim_diagnostics(stats_path: Path) -> dict[str, Any]:
    """How heavy-tailed the per-channel statistics are, and how far AIM's factors are from
    uniform at omega 0.4 (:func:`distmerge.aim.stats_summary.summarize`, per module)."""
    from dataclasses import asdict

    from distmerge.aim import load_statistics
    from distmerge.aim.stats_summary import summarize

    stats, _ = load_statistics(stats_path)
    return {m.name: asdict(m) for m in summarize(stats, 0.4)}


def shuffled_statistics(stats_path: Path, out: Path, seed: int) -> Path:
    """A second control: each module's statistic with its channels randomly permuted.

    The uniform control removes all per-channel variation; this one keeps AIM's exact
    distribution of factors per module but breaks their alignment with the channels that are
    actually active. If AIM only wins through a non-uniform shrink, it ties with this control;
    if the activation information matters, AIM beats it.
    """
    from distmerge.aim import load_statistics, save_statistics

    if out.is_file():
        return out
    stats, meta = load_statistics(stats_path)
    shuffled = {}
    for i, (name, a) in enumerate(sorted(stats.items())):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        shuffled[name] = a[torch.randperm(a.numel(), generator=gen)]
    save_statistics(shuffled, out, {**meta, "shuffled_seed": str(seed)})
    return out


def run_seed(seed: int, scale: Scale, out: Path, methods: list[str], threads: int) -> None:
    """One seed of the whole pipeline; results appended to ``out/results.jsonl``."""
    from distmerge.aim import calibrate
    from distmerge.config import AimConfig, CalibrationConfig
    from distmerge.engine.run import run_merge

    torch.manual_seed(seed)
    root = out / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    c = corpus(out)
    train_stream, test_stream = data.to_bytes(c.train), data.to_bytes(c.test)
    test_blocks = data.fixed_blocks(test_stream, scale.n_test_blocks, 128)
    held = held_out_prompts(scale.n_prompts)
    results_path = root / "results.jsonl"
    done = set()
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done.add(row["key"])

    def record(key: str, ckpt: Path, evaluator: torch.nn.Module, **fields: Any) -> None:
        if key in done:
            return
        t = time.time()
        res = evaluate(model.load_weights(evaluator, ckpt), test_blocks, scale.n_prompts)
        row = {"key": key, "seed": seed, **fields, **res}
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.add(key)
        log.info("%s: %s (eval %.1fs)", key, {k: round(v, 3) for k, v in res.items()}, time.time() - t)

    base_spec = model.TrainSpec(steps=scale.pretrain_steps, lr=2e-3, batch=scale.batch, block=scale.block,
                                weight_decay=0.1, task_rows=scale.pretrain_task_rows, skills=SKILLS, seed=seed)
    base = trained(root / "base", base_spec, None, train_stream, held)
    experts: dict[str, Path] = {}
    for i, skill in enumerate(SKILLS):
        steps = scale.expert_steps * (2 if skill == "add" else 1)
        spec = model.TrainSpec(steps=steps, lr=5e-4, batch=scale.batch, block=scale.block, warmup=20,
                               task_rows=scale.batch - scale.expert_generic_rows, answer_only=True,
                               skills=(skill,), seed=seed * 100 + i + 1)
        experts[skill] = trained(root / f"expert_{skill}", spec, base, train_stream, held)

    evaluator = model.new_model(0)
    record(f"{seed}/base", base, evaluator, kind="base", method="-", combo="-", variant="base", omega=None)
    for skill, path in experts.items():
        record(f"{seed}/expert/{skill}", path, evaluator, kind="expert", method="-", combo=skill,
               variant="expert", omega=None)

    from distmerge.engine.cluster import connect

    connect(num_cpus=2)  # only now: training needs no Ray, and parallel seeds then overlap less
    cal_path = data.write_calibration(data.to_bytes(c.calibration), scale.n_cal_blocks, scale.cal_block,
                                      root / "calibration.parquet")
    stats_path = root / "aim_stats.safetensors"
    if not stats_path.is_file():
        cal = CalibrationConfig(dataset=str(cal_path), n_samples=scale.n_cal_blocks, block_size=scale.cal_block,
                                seed=seed)
        calibrate(base, AimConfig(calibration=cal), stats_path, progress=False)
    (root / "aim_diagnostics.json").write_text(json.dumps(aim_diagnostics(stats_path), indent=1))
    shuffled_path = shuffled_statistics(stats_path, root / "aim_stats_shuffled.safetensors", seed)

    merged = root / "merged"
    # omega 0.4 (the paper's default) for every method and combination first, then the other
    # omegas: a run cut short by its time budget still has the complete headline table.
    groups: list[list[tuple[str, float | None]]] = [
        ([("none", None)] if w == 0.4 else []) +
        [(v, w) for v in ("aim", "uniform", "shuffled") if v != "shuffled" or w in SHUFFLED_OMEGAS]
        for w in (0.4, *[o for o in OMEGAS if o != 0.4])]
    for variants in groups:
        for method, combo in itertools.product(methods, COMBOS):
            for variant, omega in variants:
                key = f"{seed}/{method}/{'+'.join(combo)}/{variant}/{omega}"
                if key in done:
                    continue
                aim = None if omega is None else {
                    "omega": omega, "stats": str(shuffled_path if variant == "shuffled" else stats_path),
                    "relaxation": "uniform" if variant == "uniform" else "activation"}
                t = time.time()
                cfg = merge_config(method, base, [experts[s] for s in combo], seed, aim)
                run_merge(cfg, merged, shard_size=1 << 30, workers=2, overwrite=True, progress=False)
                log.info("merge %s in %.1fs", key, time.time() - t)
                record(key, merged, evaluator, kind="merge", method=method, combo="+".join(combo),
                       variant=variant, omega=omega)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds of the whole pipeline (0, 1, ...)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/_work/quality"))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny step counts and evaluation sets")
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--expert-steps", type=int)
    p.add_argument("--expert-generic-rows", type=int)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; 1 is faster when other jobs load the machine (2 threads spin-wait)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once, each in its own process with --threads 1 (2 suits 2 cores)")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("distmerge", "ray"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else Scale()
    if args.pretrain_steps:
        scale = replace(scale, pretrain_steps=args.pretrain_steps)
    if args.expert_steps:
        scale = replace(scale, expert_steps=args.expert_steps)
    if args.expert_generic_rows is not None:
        scale = replace(scale, expert_generic_rows=args.expert_generic_rows)
    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(scale.__dict__, indent=1))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    started = time.time()
    if args.jobs > 1 and len(seeds) > 1:
        run_parallel(seeds, args, argv, out)
    else:
        for seed in seeds:
            t = time.time()
            run_seed(seed, scale, out, methods, args.threads)
            log.info("seed %d done in %.0fs", seed, time.time() - t)
    log.info("%d seed(s) done in %.0fs", len(seeds), time.time() - started)
    if not args.no_report:
        from benchmarks.quality.report import write_report

        write_report(out)


def run_parallel(seeds: list[int], args: argparse.Namespace, argv: list[str] | None, out: Path) -> None:
    """Each seed in its own process (one torch thread each), ``args.jobs`` at a time.

    Small models do not use two cores well from one process (training steps are short and
    synchronous); two single-threaded seeds side by side do. Each process logs to
    ``out/log_seed{K}.txt`` and appends to its own ``seed{K}/results.jsonl``.
    """
    import subprocess
    import sys

    corpus(out)  # parse the stdlib once, before the children race to cache it
    passthrough = list(argv or sys.argv[1:])
    skip = {"--seeds", "--first-seed", "--jobs", "--threads"}
    kept: list[str] = []
    i = 0
    while i < len(passthrough):
        a = passthrough[i]
        name = a.split("=", 1)[0]
        if name in skip:
            i += 1 if "=" in a else 2
            continue
        if name == "--no-report":
            i += 1
            continue
        kept.append(a)
        i += 1
    pending = list(seeds)
    running: list[tuple[int, subprocess.Popen, Any]] = []
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            logf = (out / f"log_seed{seed}.txt").open("w")
            cmd = [sys.executable, "-m", "benchmarks.quality.run", *kept, "--first-seed", str(seed), "--seeds", "1",
                   "--threads", "1", "--no-report"]
            running.append((seed, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), logf))
            log.info("seed %d started (log: %s)", seed, logf.name)
        time.sleep(2)
        for item in list(running):
            seed, proc, logf = item
            if proc.poll() is not None:
                running.remove(item)
                logf.close()
                log.info("seed %d finished (exit %d)", seed, proc.returncode)
                if proc.returncode:
                    failed.append(seed)
    if failed:
        raise SystemExit(f"seeds {failed} failed; see their logs in {out}")


if __name__ == "__main__":
    main()
