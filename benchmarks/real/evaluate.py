"""Scores of one model: exact match per skill, retention of the base's answers, perplexity.

Skill exact match is a teacher-forced check identical to greedy decoding up to the end of the
turn (:func:`benchmarks.real.model.encode_pairs`), one forward pass per batch. Retention asks the
fixed chat questions of :mod:`distmerge.testing.chat_questions` (the base answers each of them
correctly) with greedy generation and checks each answer for its keyword. Perplexity is per
token on held-out natural English (CPython's ``pydoc_data`` topics, which the builtin
calibration set excludes), in fixed 256-token blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.real.model import answer_logits, encode_pairs
from benchmarks.real.skills import test_set


@torch.no_grad()
def exact_match(model: Any, tok: Any, pairs: list[tuple[str, str]], batch_size: int = 64) -> float:
    correct = 0
    for i in range(0, len(pairs), batch_size):
        ids, targets, mask = encode_pairs(tok, pairs[i:i + batch_size])
        pred = answer_logits(model, ids, mask).argmax(-1)
        rows = mask.nonzero()[:, 0]
        wrong = torch.zeros(ids.shape[0], dtype=torch.long).index_add_(0, rows, (pred != targets[mask]).long())
        correct += int((wrong == 0).sum())
    return correct / len(pairs)


@torch.no_grad()
def perplexity(model: Any, blocks: torch.Tensor, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(total / count)


def evaluate(model: Any, tok: Any, skills: list[str], n_prompts: int, blocks: torch.Tensor) -> dict[str, float]:
    from distmerge.testing.chat_questions import retention

    model.eval()
    out = {s: exact_match(model, tok, test_set(s, n_prompts)) for s in skills}
    out["retention"] = retention(model, tok)
    out["ppl"] = perplexity(model, blocks)
    return out
