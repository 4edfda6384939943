"""The 70B calibration plan on paper: stages, memory per stage, tokens/s per stage, wall time.

    .venv/bin/python -m benchmarks.plan_70b

Runs distmerge's own stage planner (:func:`distmerge.aim.stage_split.place_stages`, the one
``aim.stages: auto`` uses) on a Llama-3-70B-shaped model for a few clusters, and estimates
the paper's calibration (256 x 512 tokens) from a forward pass's 2 FLOPs per parameter per
token. The CPU rate is measured here (float32 matmuls on this machine's cores, scaled to the
node's cores); the GPU rate is an assumption (stated, not measured: no GPU was lent). With at
least as many micro-batches in flight as stages, the pipeline runs at its slowest stage's rate.
"""

from __future__ import annotations

import argparse
import time

import torch

from distmerge.aim.stage_plan import stage_overhead
from distmerge.aim.stage_split import NodeMemory, place_stages

LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256}
TOKENS = 256 * 512
GB = 1000**3


def layer_params(c: dict) -> int:
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h


def sizes(c: dict, itemsize: int) -> list[int]:
    """Weight bytes per layer, embeddings on the first, final norm and (untied) head on the last."""
    s = [layer_params(c) * itemsize] * c["num_hidden_layers"]
    s[0] += c["vocab_size"] * c["hidden_size"] * itemsize
    s[-1] += (c["vocab_size"] * c["hidden_size"] + c["hidden_size"]) * itemsize
    return s


def cpu_flops_per_core(seconds: float = 2.0) -> float:
    """float32 matmul FLOP/s of one core here (a 2048 x 2048 product, repeated)."""
    torch.set_num_threads(1)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - t)


def plan(name: str, nodes: list[NodeMemory], itemsize: int, flops_per_stage: float, load_gbps: float) -> list[str]:
    s = sizes(LLAMA_70B, itemsize)
    overhead = stage_overhead(LLAMA_70B, 4, 512, itemsize)
    stages = place_stages(s, overhead, nodes)
    lines = [f"#### {name}", "", f"{len(stages)} stages; per stage: layers, memory asked of the node, "
             "weights, tokens/s at the stated rate", "", "| stage | layers | node | memory (GB) | weights (GB) | tokens/s |",
             "|---|---|---|---|---|---|"]
    rates = []
    for k, p in enumerate(stages):
        weights = sum(s[p.layers[0]:p.layers[1]])
        rate = flops_per_stage / (2 * weights / itemsize)
        rates.append(rate)
        lines.append(f"| {k} | {p.layers[0]}-{p.layers[1] - 1} | {p.address} | {p.memory / GB:.1f} | "
                     f"{weights / GB:.1f} | {rate:.1f} |")
    load = max(sum(s[p.layers[0]:p.layers[1]]) for p in stages) / (load_gbps * GB)
    forward = TOKENS / min(rates)
    lines += ["", f"256 x 512 tokens at the slowest stage's {min(rates):.1f} tokens/s: {forward / 60:.1f} min, "
              f"plus loading the largest stage's weights at {load_gbps:g} GB/s: {load / 60:.1f} min "
              f"(stages load in parallel) = **{(forward + load) / 60:.1f} min**", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cores-per-node", type=int, default=64)
    p.add_argument("--gpu-tflops", type=float, default=400.0,
                   help="assumed sustained bf16 TFLOP/s of one GPU in a stage (H100/H200: ~40%% of 989 peak)")
    args = p.parse_args(argv)
    per_core = cpu_flops_per_core()
    params = sum(sizes(LLAMA_70B, 1))
    out = [f"Llama-3-70B shape: {params / 1e9:.1f}B parameters, {LLAMA_70B['num_hidden_layers']} layers. "
           f"CPU rate measured here: {per_core / 1e9:.1f} GFLOP/s per core (float32 matmul), x "
           f"{args.cores_per_node} cores per node. GPU rate assumed: {args.gpu_tflops:g} TFLOP/s bf16 per GPU.", ""]
    cpu_nodes = [NodeMemory(f"cpu{i}", f"cpu-node-{i}", 200 * GB) for i in range(4)]
    out += plan("CPU, float32 (distmerge's CPU default): 4 nodes offering Ray 200 GB each", cpu_nodes, 4,
                per_core * args.cores_per_node, 1.0)
    out += plan("CPU, float32: 8 nodes offering 64 GB each", [NodeMemory(f"c{i}", f"cpu-node-{i}", 64 * GB)
                                                              for i in range(8)], 4, per_core * args.cores_per_node, 1.0)
    gpus = [NodeMemory(f"gpu{i}", f"gpu-{i} (80 GB)", 80 * GB) for i in range(8)]
    out += plan("GPU, bf16 (the checkpoint's dtype on GPU): stages sized to 80 GB GPUs (H100), one per GPU",
                gpus, 2, args.gpu_tflops * 1e12, 2.0)
    print("\n".join(out))


if __name__ == "__main__":
    main()
