"""Fixed chat questions SmolLM2-135M-Instruct answers correctly, to check a merge kept them.

A merge of fine-tuned experts can learn their skills and lose what the base knew. These are
simple questions the real base answers right under greedy decoding (checked by
``tests/real/test_real_merge.py``); an answer counts when it contains one of the question's
keywords, case-insensitively, which is how a person would grade a short free-form reply.
Used by the CI tests on real checkpoints and by the paper-style benchmark (``benchmarks/real``).
"""

from __future__ import annotations

from typing import Any

# (question, keywords any of which makes the answer right)
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the chemical symbol for water?", ("h2o", "h₂o")),
    ("How many days are in a week?", ("seven", "7")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What language is spoken in Spain?", ("spanish",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
    ("What is the boiling point of water in Celsius?", ("100",)),
)
MAX_NEW_TOKENS = 24


def prompts(tok: Any) -> list[str]:
    """Each question in the model's chat template (its default system turn), ready to answer."""
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q, _ in QUESTIONS]


def answers(model: Any, tok: Any) -> list[str]:
    """The model's greedy answers to :data:`QUESTIONS`, in one left-padded batch."""
    import torch

    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok(prompts(tok), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def graded(texts: list[str]) -> list[bool]:
    """Whether each answer contains one of its question's keywords."""
    return [any(k in text.lower() for k in keys) for text, (_, keys) in zip(texts, QUESTIONS, strict=True)]


def retention(model: Any, tok: Any) -> float:
    """Share of :data:`QUESTIONS` the model still answers right."""
    marks = graded(answers(model, tok))
    return sum(marks) / len(marks)
