"""Calibration benchmark: the staged AIM forward on Ray vs one whole-model forward with hooks.

    .venv/bin/python -m benchmarks.bench_calibration --layers 8 --hidden 512 --blocks 16

Same model, same tokens, same process tree. Reports wall time, tokens/s, the weight bytes each
stage holds (target: at most 1/S of the model, plus the embedding/head ends) and the peak RSS of
every stage actor, sampled while the run goes on, next to the whole-model run's peak RSS.

The target's baseline is one stage holding the whole model on one thread (distmerge's own
:class:`StageWorker` in this process, no Ray): the pipeline's target is ``staged tokens/s >= 0.8 x
S x`` that. ``transformers``' whole model with hooks runs too, on one thread and on every CPU
(what a user without distmerge would run; it computes the logits, which a stage skips). Each
includes loading the weights, as the staged run includes its actors' start and loading theirs. A staged run on a quarter of the
blocks goes first: the difference of the two staged runs is the pipeline's steady rate
(``staged_steady_tokens_per_s``), what a calibration of thousands of blocks runs at.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

import psutil
import torch

WORK = Path(__file__).parent / "_work"


class ProcessPeaks:
    """Peak RSS of processes whose command line starts with ``prefix``, sampled in a thread."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith(self.prefix) and p.info["memory_info"] is not None:
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), p.info["memory_info"].rss)

    def __enter__(self) -> ProcessPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def whole_model_statistics(model_dir: Path, blocks: torch.Tensor, micro_batch: int) -> dict[str, torch.Tensor]:
    """The reference: one from_pretrained model, forward hooks on every Linear and norm."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):  # noqa: ANN202
        def fn(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().abs().double()
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # heads of per-head q/k norms count as tokens
            sums[name] = sums.get(name, 0) + x.mean(dim=1).sum(dim=0)  # mean over tokens, sum over blocks
        return fn

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or "norm" in type(module).__name__.lower():
            module.register_forward_pre_hook(hook(name))
    with torch.inference_mode():
        for batch in torch.split(blocks, micro_batch):
            model(input_ids=batch)
    return {k: v.float() for k, v in sums.items()}


def one_stage_statistics(model_dir: Path, blocks: torch.Tensor, micro_batch: int) -> dict[str, torch.Tensor]:
    """One distmerge stage holding every layer, in this process: the pipeline's per-stage baseline."""
    from distmerge.aim.layout import open_base
    from distmerge.aim.stage_worker import StageWorker
    from distmerge.aim.wire import pack

    _, layout = open_base(model_dir)
    worker = StageWorker(model_dir, 0, len(layout.layers), True, True)
    for batch in torch.split(blocks, micro_batch):
        worker.forward({"input_ids": pack(batch)})
    return {k: v.float() for k, v in worker.statistics().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("tiny", "smollm2", "gemma3"), default="tiny",
                        help="tiny: a random llama of --layers x --hidden; smollm2, gemma3: the real checkpoints "
                             "(distmerge.testing.real_models fetches them once per machine)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(psutil.cpu_count())
    from distmerge.aim import calibrate_stages
    from distmerge.engine.cluster import connect
    from distmerge.testing.tiny import build_model

    model_dir = WORK / f"calib-l{args.layers}-h{args.hidden}"
    if args.model != "tiny":
        from distmerge.testing import real_models

        model_dir = Path(getattr(real_models, args.model)())
    elif not (model_dir / "config.json").exists():
        build_model(model_dir, "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                    num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                    max_position_embeddings=args.block_size, vocab_size=4096, max_shard_size="50MB")
    total_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    blocks = torch.randint(0, 260, (args.blocks, args.block_size), generator=torch.Generator().manual_seed(0))
    tokens = blocks.numel()

    whole_model_statistics(model_dir, blocks[:1], 1)  # imports and page cache warm for both whole runs
    torch.set_num_threads(1)
    one_stage_statistics(model_dir, blocks[:1], 1)
    start = time.perf_counter()
    one_stage_statistics(model_dir, blocks, args.micro_batch)
    one_stage_s = time.perf_counter() - start
    start = time.perf_counter()
    whole_model_statistics(model_dir, blocks, args.micro_batch)
    one_thread_s = time.perf_counter() - start
    torch.set_num_threads(psutil.cpu_count())
    start = time.perf_counter()
    before = psutil.Process().memory_info().rss
    ref = whole_model_statistics(model_dir, blocks, args.micro_batch)
    whole_s = time.perf_counter() - start
    whole_rss = psutil.Process().memory_info().rss - before

    connect(None)
    # A staged run on a quarter of the blocks first: the difference of the two runs is the
    # pipeline's steady rate, without the actors' start and weight loading both runs pay.
    start = time.perf_counter()
    calibrate_stages(model_dir, blocks[:args.blocks // 4], stages=args.stages, micro_batch_size=args.micro_batch,
                     progress=False)
    quarter_s = time.perf_counter() - start
    with ProcessPeaks("ray::StageActor") as peaks:
        start = time.perf_counter()
        stats, _ = calibrate_stages(model_dir, blocks, stages=args.stages, micro_batch_size=args.micro_batch,
                                    progress=False)
        staged_s = time.perf_counter() - start
    steady = (tokens - blocks[:args.blocks // 4].numel()) / max(1e-9, staged_s - quarter_s)
    one_stage_rate = tokens / one_stage_s
    worst = max(float(((stats[k] - ref[k]).abs().max() / ref[k].abs().max()).item()) for k in ref)
    result = {
        "model": args.model, "model_bytes": total_bytes, "tokens": tokens, "stages": args.stages,
        "one_stage_1_thread_s": round(one_stage_s, 2), "one_stage_1_thread_tokens_per_s": round(one_stage_rate),
        "staged_vs_S_x_one_stage": round((tokens / staged_s) / (args.stages * one_stage_rate), 3),
        "steady_vs_S_x_one_stage": round(steady / (args.stages * one_stage_rate), 3),
        "whole_model_1_thread_s": round(one_thread_s, 2),
        "whole_model_1_thread_tokens_per_s": round(tokens / one_thread_s),
        "staged_vs_S_x_one_thread": round((tokens / staged_s) / (args.stages * tokens / one_thread_s), 3),
        "whole_model_s": round(whole_s, 2), "whole_model_tokens_per_s": round(tokens / whole_s),
        "whole_model_rss_growth_gb": round(whole_rss / 1e9, 3),
        "staged_s": round(staged_s, 2), "staged_tokens_per_s": round(tokens / staged_s),
        "staged_quarter_s": round(quarter_s, 2), "staged_steady_tokens_per_s": round(steady),
        "steady_vs_S_x_one_thread": round(steady / (args.stages * tokens / one_thread_s), 3),
        "ratio_staged_to_whole": round(staged_s / whole_s, 2),
        "stage_peak_rss_gb": sorted(round(v / 1e9, 3) for v in peaks.peaks.values()),
        "max_relative_difference": worst,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
