"""Why arcee_fusion's sample is sorted: its quartile rounds' counts over a million picks of an
11.5M-element bf16 tensor (a 1B-class MLP matrix), picks in draw order against sorted, beside
what drawing and sorting them costs (once per tensor). One thread, best of 5.

    .venv/bin/python -m benchmarks.arcee_sample_order
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from distmerge.methods.kernels import fusion_loops
from distmerge.methods.kernels.rounding import value_arrays
from distmerge.methods.random_stream import stream_key

ROWS, COLS, DRAWS = 5632, 2048, 10**6


def best_ms(call: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    n = ROWS * COLS
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    x = (base.float() + torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16)
    b, xb = value_arrays([base, x], torch.float32)
    kl = np.random.default_rng(0).random(ROWS).astype(np.float32)
    key = stream_key(0, "arcee_sample_order", -1)
    drawn = np.empty(DRAWS, dtype=np.int64)
    draw = best_ms(lambda: fusion_loops._draw_positions(np.uint64(key[0]), np.uint64(key[1]), DRAWS, n, drawn))
    ordered = np.sort(drawn)
    none = np.zeros(0, dtype=np.int64)
    rows = [
        ("draw the sample (once per tensor)", draw),
        ("sort it (once per tensor)", best_ms(lambda: np.sort(drawn))),
        ("a round's counts, picks in draw order", best_ms(lambda: fusion_loops.fusion_counts(b, xb, kl, COLS, drawn, none))),
        ("a round's counts, picks sorted", best_ms(lambda: fusion_loops.fusion_counts(b, xb, kl, COLS, ordered, none))),
    ]
    print(f"| step ({DRAWS:,} picks of {n:,} elements) | ms |")
    print("|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
