"""Pico models built the way mergekit 0.1.5's own tests build them (its ``tests/common.py``).

``make_picollama`` there is ``LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32,
intermediate_size=48, num_attention_heads=16, num_hidden_layers=2))`` with random weights,
saved with ``save_pretrained(safe_serialization=True)``; ``make_picogranite`` and
``make_picoLlaVa`` are the same idea for Granite and LLaVA, and its tokenizer tests use a
BPE vocabulary ``<unk> <s> </s> _tok_3 ...`` plus added tokens (``make_tokenizer``). Here each
builder also takes a seed (the weights are a function of it) and a storage dtype.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

PICO_LLAMA = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 16, "num_hidden_layers": 2}


def _save(model: Any, path: Path, dtype: torch.dtype) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path


def make_picollama(path: str | Path, vocab_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32,
                   **overrides: Any) -> Path:
    """mergekit's ``make_picollama`` (with a seed, a storage dtype and config overrides)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, **{**PICO_LLAMA, **overrides})
    return _save(LlamaForCausalLM(cfg), Path(path), dtype)


def make_picogranite(path: str | Path, vocab_size: int = 64, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> Path:
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    cfg = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                        num_key_value_heads=2, num_hidden_layers=2)
    return _save(GraniteForCausalLM(cfg), Path(path), dtype)


def make_picogpt2(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, n_layer: int = 2) -> Path:
    """mergekit's ``make_gpt2size`` at pico size (768 x 12 layers would be 124M parameters)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_ctx=64, n_embd=32, n_head=4, n_layer=n_layer, n_positions=64, vocab_size=64)
    return _save(GPT2LMHeadModel(cfg), Path(path), dtype)


# The Hub's LLaVA checkpoint names (what save_pretrained writes) -> transformers' module names.
LLAVA_MODULE_NAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                      ("vision_tower.", "model.vision_tower."),
                      ("multi_modal_projector.", "model.multi_modal_projector."))


def make_picollava(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                   layout: str = "checkpoint") -> Path:
    """mergekit's ``make_picoLlaVa``. ``layout="transformers"``: the same weights stored under
    transformers' module names (``model.language_model.*``, ``lm_head.*``) instead of the
    checkpoint names save_pretrained writes (``language_model.model.*``); both load."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                              hidden_size=64, intermediate_size=128)
    text = LlamaConfig(vocab_size=64, **PICO_LLAMA)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    path = _save(LlavaForConditionalGeneration(config=cfg), Path(path), dtype)
    if layout == "transformers":
        _rename_tensors(path / "model.safetensors", LLAVA_MODULE_NAMES)
    elif layout != "checkpoint":
        raise ValueError(f"layout must be 'checkpoint' or 'transformers', not {layout!r}")
    return path


def _rename_tensors(file: Path, renames: tuple[tuple[str, str], ...]) -> None:
    """Rewrites a safetensors file with each name's first matching prefix replaced."""
    from safetensors.torch import load_file, save_file

    def renamed(name: str) -> str:
        for old, new in renames:
            if name.startswith(old):
                return new + name[len(old):]
        return name

    state = {renamed(k): v for k, v in load_file(file).items()}
    save_file(state, file, metadata={"format": "pt"})


def make_tokenizer(vocab_size: int, added_tokens: list[Any]) -> Any:
    """mergekit's test tokenizer: BPE over ``<unk> <s> </s> _tok_3 ...``, then added tokens."""
    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size), strict=True)),
                                         "merges": []}, "added_tokens": []}
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    with tempfile.TemporaryDirectory() as d:
        file = os.path.join(d, "tokenizer.json")
        tok.save(file)
        res = LlamaTokenizerFast(tokenizer_file=file)
    res.add_tokens(added_tokens)
    return res


def special_token(text: str) -> Any:
    """An added special token as mergekit's ``model_special`` fixture makes it."""
    import tokenizers

    return tokenizers.AddedToken(text, single_word=True, lstrip=True, rstrip=True, normalized=False, special=True)
