"""How often TIES's speculative round gives the thresholds on real checkpoints.

    .venv/bin/python -m benchmarks.speculative_selection --models smollm2,gemma3 --densities 0.1,0.5,0.9

For each 2-D tensor of the real base model and a fine-tuning-like bf16 expert of it
(:mod:`distmerge.testing.experts`), the speculative round runs on the engine's canonical chunks
at each density; the table gives the share of elements (and tensors) whose threshold resolved
there, so that only the cut chunks are read again. A miss falls back to the radix rounds
(exact, one read more); the fallback is what this measures the rarity of.
"""

from __future__ import annotations

import argparse

import torch
from safetensors import safe_open

from distmerge.methods import selection
from distmerge.plan import REDUCTION_CHUNK_ELEMENTS
from distmerge.testing import real_models
from distmerge.testing.experts import fine_tuned

MODELS = {"smollm2": real_models.smollm2, "gemma3": real_models.gemma3}


def resolved_share(model: str, density: float) -> tuple[float, int, int, list[str]]:
    """(share of elements resolved, tensors resolved, tensors, names of the misses)."""
    folder = MODELS[model]()
    g = torch.Generator().manual_seed(1)
    done = total = tensors = resolved_tensors = 0
    misses = []
    with safe_open(str(folder / real_models.WEIGHTS_FILE), "pt") as f:
        for name in sorted(f.keys()):
            w = f.get_tensor(name)
            if w.dim() != 2:
                continue
            base, expert = w.float(), fine_tuned(w, g).float()
            numel, rank = base.numel(), max(1, int(density * base.numel()))
            rows = max(1, REDUCTION_CHUNK_ELEMENTS // base.shape[1])
            parts = [selection.DeltaKeys(base[a:a + rows], expert[a:a + rows]).speculate({"t": rank}, numel)["t"]
                     for a in range(0, base.shape[0], rows)]
            ok = selection.resolve_windows(parts, rank) is not None
            tensors += 1
            total += numel
            if ok:
                resolved_tensors += 1
                done += numel
            else:
                misses.append(f"{name} ({len(parts)} chunks)")
    return done / total, resolved_tensors, tensors, misses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--densities", default="0.1,0.5,0.9")
    args = parser.parse_args()
    print("| model | density | elements resolved | tensors resolved | misses |")
    print("|---|---:|---:|---:|---|")
    for model in args.models.split(","):
        for density in (float(d) for d in args.densities.split(",")):
            share, ok, n, misses = resolved_share(model, density)
            print(f"| {model} | {density} | {share:.1%} | {ok} of {n} | {', '.join(misses) or '-'} |")


if __name__ == "__main__":
    main()
