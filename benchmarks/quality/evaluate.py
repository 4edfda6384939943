"""Greedy exact match per skill and perplexity per byte, in one batched forward each.

Exact match uses a teacher-forced check that is *identical* to greedy decoding: the greedy
text up to the first newline equals the answer iff, with the correct prefix fed in, the argmax
at every answer position (and at the newline after it) is the expected byte. So a single
forward pass over ``prompt + answer + "\\n"`` replaces an autoregressive loop, with no KV cache
or left padding needed; right padding never reaches earlier positions under a causal mask.
"""

from __future__ import annotations

import math

import torch

from benchmarks.quality.skills import SKILLS, test_set

PAD = 256


@torch.no_grad()
def exact_match(model: torch.nn.Module, pairs: list[tuple[str, str]], batch_size: int = 512) -> float:
    """Share of ``(prompt, answer)`` pairs the model answers exactly (greedy, up to the newline)."""
    model.eval()
    correct = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        seqs = [(list(p.encode()), list((a + "\n").encode())) for p, a in chunk]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
        target = torch.full((len(seqs), width), -1, dtype=torch.long)
        for r, (p, a) in enumerate(seqs):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            # logits at position t predict token t+1: answer bytes sit at len(p)..len(p)+len(a)-1
            target[r, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a)
        pred = model(input_ids=ids).logits.argmax(-1)
        ok = ((pred == target) | (target < 0)).all(dim=1)
        correct += int(ok.sum())
    return correct / len(pairs)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """Perplexity per byte on held-out generic text (byte-level, so per token = per byte)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def evaluate(model: torch.nn.Module, test_blocks: torch.Tensor, n_prompts: int) -> dict[str, float]:
    """Accuracy on each skill's held-out prompts and generic perplexity per byte."""
    out = {s: exact_match(model, test_set(s, n_prompts)) for s in SKILLS}
    out["ppl"] = perplexity(model, test_blocks)
    return out
