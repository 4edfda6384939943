"""Nanoseconds per element of the hot kernels, beside linear's weighted sum in the same run.

    .venv/bin/python -m benchmarks.kernel_costs

Each kernel runs on 2^22 elements of bfloat16-valued rows (as stored: bf16 bits, float32
compute), two experts where a method takes several (three in one TIES row), best of 7 calls after a warm-up call, on
one thread. This is where a loop that stopped vectorizing shows (docs: the rules in
``distmerge/methods/kernels/__init__.py``); ``bench_method_cost`` gives what a method costs as a
whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from distmerge.methods import selection
from distmerge.methods.kernels import (
    blend_loops,
    dots,
    fusion_loops,
    histograms,
    linear_loop,
    ram_loops,
    ranks,
    sce_loops,
)
from distmerge.methods.kernels import task_vector_loop as tv
from distmerge.methods.kernels.rounding import NATIVE, mode_tag, stored_array, value_arrays
from distmerge.methods.kernels.topk_select import PackedMagnitudes
from distmerge.methods.philox import fill_keep, fill_raw, philox_scratch
from distmerge.methods.random_stream import stream_key

N = 1 << 22
COLS = 1536  # a last-dim vector (arcee_fusion's KL, DELLA's ranked rows)


def best_ns(call: Callable[[], object], elements: int, repeat: int = 7) -> float:
    call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times) / elements * 1e9


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(N, generator=g) * 0.02).to(torch.bfloat16)
    experts = [(base.float() + torch.randn(N, generator=g) * 1e-3).to(torch.bfloat16) for _ in range(3)]
    b, x0, x1, x2 = value_arrays([base, *experts], torch.float32)
    kl = np.random.default_rng(0).random(N // COLS + 1).astype(np.float32)
    # a tensor's sample as the rounds visit it: drawn from the stream, ordered by span
    picks = fusion_loops.sample_positions(stream_key(0, "kernel_costs", -1), 1 << 20, N, 0, N)
    one = np.array(1.0, dtype=np.float32)
    # SCE's gathered |variance| (bf16-valued task vectors: many ties) and its selection's k
    variances = sce_loops.sce_counts(b, [x0, x1], sce_loops.MAGNITUDES)[1]
    k = int(np.count_nonzero(variances) * 0.5)
    drawn = np.minimum((np.random.default_rng(1).random(1 << 20) * N).astype(np.int64), N - 1)

    def task_vectors(consensus: bool, xs: tuple[np.ndarray, ...] = (x0, x1)) -> Callable[[], object]:
        n = len(xs)
        return lambda: tv.task_vectors(
            b, list(xs), 0, low=[900_000_000] * n, high=[tv.NO_HIGH] * n, masks=[None] * n, rescale_kind=[0] * n,
            rescale=np.ones(n, dtype=np.float32), probs=[None] * n, weights=np.full(n, 0.5, np.float32),
            consensus=consensus, normalize=True, total_weight=one, lam=one)

    # TIES' speculative statistics pass: the window where the engine expects density 0.4's
    # threshold, over these deltas (few keys inside, in most blocks) and over
    # deltas of a few ulps (9% of the keys inside: a fine-tune's heavy ties)
    ulps = torch.randint(-3, 4, (N,), generator=g, dtype=torch.int16)
    x_ulps = stored_array((base.view(torch.int16) + ulps).view(torch.bfloat16))

    def window(x: np.ndarray) -> list[tuple[int, int]]:  # the engine's placement for a whole-tensor chunk
        first, count = selection.local_estimate(histograms.key_histogram(b, x, NATIVE), int(0.4 * N), N, N)
        return [(first << 16, (first + count) << 16)]

    window_x0, window_ulps = window(x0), window(x_ulps)

    out = np.empty(N, dtype=np.float32)
    flags = np.empty(N, dtype=np.bool_)
    draws = np.empty(N, dtype=np.uint64)
    state = philox_scratch()
    key = stream_key(0, "kernel_costs", 1)
    rows = (N // COLS, COLS)
    table = np.linspace(0.3, 0.7, COLS).astype(np.float32)
    cases: list[tuple[str, Callable[[], object], int]] = [
        ("linear: weighted sum of 3 rows (baseline)", lambda: linear_loop.weighted_sum([b, x0, x1], np.array([0.3, 0.3, 0.4], np.float32), None), N),
        ("DARE keep flags (Philox4x32-10; DELLA draws from it too)", lambda: fill_keep(key[0], key[1], 3, np.uint64(1 << 31), flags, state), N),
        ("64-bit draws (Philox4x64-10: arcee_fusion's sample; DARE and DELLA before 0.2)", lambda: fill_raw(key[0], key[1], 3, draws, state), N),
        ("float64 dot (bf16 bits)", lambda: dots.float64_dot(base, experts[0]), N),
        ("TIES statistics: speculative pass (keys above, window counts)", lambda: histograms.above_and_windows(b, x0, NATIVE, window_x0), N),
        ("the same over deltas of a few ulps (heavy ties)", lambda: histograms.above_and_windows(b, x_ulps, NATIVE, window_ulps), N),
        ("TIES merge, 2 experts (per output)", task_vectors(True), N),
        ("TIES merge, 3 experts (per output)", task_vectors(True, (x0, x1, x2)), N),
        ("thresholded task-vector sum, 2 experts (per output)", task_vectors(False), N),
        ("model stock Gram matrix, 2 experts (lane order)", lambda: blend_loops.stock_grams(b, (x0, x1), mode_tag(NATIVE), N, np.empty((1, 2, 2))), N),
        ("model stock blend, 2 experts", lambda: blend_loops.stock_blend(b, (x0, x1), mode_tag(NATIVE), np.array([0.6], np.float32), np.array([0.4], np.float32), np.float32(2.0), out), N),
        ("RAM+ counts, 2 experts (with the NaN/Inf count)", lambda: ram_loops.ram_counts(b, (x0, x1), 0.0, np.array([1e-5], np.float32), np.zeros(2, np.int64), np.zeros(2, np.int64)), N),
        ("RAM+ merge, 2 experts (per output)", lambda: ram_loops.ram_merge(b, (x0, x1), 0.0, np.array([1e-5], np.float32), np.array([1.2, 0.8], np.float32), True, N, out), N),
        ("arcee_fusion merge", lambda: fusion_loops.fusion_merge(b, x0, kl, COLS, 1e-4), N),
        ("arcee_fusion counts, every element", lambda: fusion_loops.fusion_counts(b, x0, kl, COLS, None, np.zeros(0, np.int64)), N),
        ("arcee_fusion counts, per sampled pick", lambda: fusion_loops.fusion_counts(b, x0, kl, COLS, picks, np.zeros(0, np.int64)), picks.size),
        ("SCE variances and their magnitudes (a gathering round)", lambda: sce_loops.sce_counts(b, [x0, x1], sce_loops.MAGNITUDES), N),
        ("SCE selection: pack, topk of half (nth_element), ties kept", lambda: PackedMagnitudes(variances).top(k), N),
        ("arcee_fusion sample: sorting 2^20 drawn positions (per position)", lambda: fusion_loops._sort_positions(drawn.copy(), N), drawn.size),
        ("the same positions by np.sort (per position)", lambda: np.sort(drawn), drawn.size),
        ("DELLA keep rule (ranks, draws)", lambda: ranks.della_keep(b[: rows[0] * COLS], x0[: rows[0] * COLS], torch.float32, rows, table, np.array([1, 2], np.uint64), 0), rows[0] * COLS),
    ]
    linear = None
    print("| kernel | ns per element | against linear's |")
    print("|---|---:|---:|")
    for name, call, elements in cases:
        ns = best_ns(call, elements)
        linear = linear or ns
        print(f"| {name} | {ns:.2f} | {ns / linear:.1f}x |")


if __name__ == "__main__":
    main()
