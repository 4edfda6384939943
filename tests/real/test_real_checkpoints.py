"""The real checkpoints are what they claim: the converted folders load in transformers, hold
exactly the dequantized GGUF weights in bf16, SmolLM2 still answers a simple chat question
and the Gemma-3 base model still continues a count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distmerge.testing import real_models

pytestmark = pytest.mark.real


def assert_equals_gguf(folder: Path, model: real_models.RealModel) -> None:
    """Every saved tensor equals the dequantized GGUF tensor cast to bf16; only the tied head is dropped."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / real_models.WEIGHTS_FILE))
    reference = real_models.load_gguf(model).state_dict()
    assert set(reference) - set(saved) == {"lm_head.weight"}
    assert set(saved) <= set(reference)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert "quantization_config" not in config


def test_smollm2_matches_gguf(smollm2_bf16: Path) -> None:
    assert_equals_gguf(smollm2_bf16, real_models.SMOLLM2)


def test_smollm2_answers_chat(smollm2_bf16: Path) -> None:
    """Loaded as users load it (bf16 from disk), greedy decoding names Paris."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_bf16)
    model = AutoModelForCausalLM.from_pretrained(smollm2_bf16).eval()
    assert model.dtype == torch.bfloat16
    assert "lm_head.weight" not in dict(model.named_parameters())  # tied: the embedding serves
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cached_fetch_is_a_lookup(smollm2_bf16: Path) -> None:
    """A second call finds the converted folder without fetching or converting again."""
    import time

    start = time.monotonic()
    assert real_models.smollm2() == smollm2_bf16
    assert time.monotonic() - start < 1.0


def test_gemma3_matches_gguf(gemma3_bf16: Path) -> None:
    assert_equals_gguf(gemma3_bf16, real_models.GEMMA3)


def test_gemma3_continues_counting(gemma3_bf16: Path) -> None:
    """Gemma-3-270M is a base model without a chat template: greedy decoding continues a count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3_bf16)
    model = AutoModelForCausalLM.from_pretrained(gemma3_bf16).eval()
    assert model.dtype == torch.bfloat16
    inputs = tokenizer("One, two, three, four,", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "five" in text and "six" in text, text
