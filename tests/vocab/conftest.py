"""Tiny tokenizers and model folders the way mergekit's tests/test_tokenizer.py makes them, and
one run of mergekit 0.1.5 itself (its own venv, a subprocess) over every comparison case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import save_file

from distmerge.methods.stack_sums import spread_values
from distmerge.testing import mergekit_reference

MERGEKIT_HOME = mergekit_reference.venv_path()  # $DISTMERGE_MERGEKIT_VENV or the user cache
MERGEKIT_PYTHON = MERGEKIT_HOME / "bin" / "python"
REFERENCE = Path(__file__).with_name("mk_reference.py")
HIDDEN = 40  # not a multiple of 32: the padding mean's tail columns are exercised too


def make_tokenizer(vocab_size: int, added_tokens: list) -> object:
    """mergekit's tests/test_tokenizer.py make_tokenizer: a BPE vocabulary, LlamaTokenizerFast."""
    from transformers import LlamaTokenizerFast

    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size), strict=True)),
                                        "merges": []}, "added_tokens": []}
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    with tempfile.TemporaryDirectory() as p:
        tok.save(os.path.join(p, "tokenizer.json"))
        res = LlamaTokenizerFast(tokenizer_file=os.path.join(p, "tokenizer.json"))
    res.add_tokens(added_tokens)
    return res


def make_model(path: Path, vocab_size: int | None, tokenizer: object | None, chat_template: str | None = None,
               swap: tuple[str, str] | None = None) -> str:
    """config.json (a tiny Llama) and the tokenizer; weights are given to the tests directly."""
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    if vocab_size is not None:
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                          architectures=["LlamaForCausalLM"])
        cfg.save_pretrained(path)
    if tokenizer is not None:
        if chat_template:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(path)
    if swap:
        tj = path / "tokenizer.json"
        data = json.loads(tj.read_text())
        vocab = data["model"]["vocab"]
        vocab[swap[0]], vocab[swap[1]] = vocab[swap[1]], vocab[swap[0]]
        tj.write_text(json.dumps(data))
    return str(path)


def special_tokenizer() -> object:
    tok = make_tokenizer(64, [])
    tok.add_special_tokens({"additional_special_tokens": [tokenizers.AddedToken(
        "<|existing_special|>", single_word=True, lstrip=True, rstrip=True, normalized=False, special=True)]})
    return tok


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vocab-models")
    chatml = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    return {
        "base": make_model(root / "base", 64, make_tokenizer(64, [])),
        "chatml": make_model(root / "chatml", 66, make_tokenizer(64, ["<|im_start|>", "<|im_end|>"]), chatml),
        "padded": make_model(root / "padded", 64, make_tokenizer(
            64, ["<UNUSED_0>", "<UNUSED_1>", "<UNUSED_2>", "<UNUSED_3>"])),
        "special": make_model(root / "special", 65, special_tokenizer()),
        "swapped": make_model(root / "swapped", 65, make_tokenizer(64, ["<|x|>"]), chatml, swap=("_tok_3", "_tok_4")),
        "other_tok": make_model(root / "other_tok", None, make_tokenizer(64, ["<|only_here|>", "<|im_end|>"])),
        "notok": make_model(root / "notok", 64, None),
    }


def tensor_specs(root: Path, case: str, models: list[str], sizes: dict[str, int], seed: int) -> list[dict]:
    """Inputs of the aligned tensors: f32 rows of 40 and 64, bf16 rows of 64, a 1-D bias, and
    one tensor in another model order (the base, when there, last)."""
    g = torch.Generator().manual_seed(seed)
    specs = []
    reordered = [m for m in models if m != models[0]] + [models[0]]
    for name, order, shape, dtype in (("embed", models, (HIDDEN,), torch.float32),
                                      ("head", models, (64,), torch.float32),
                                      ("bf16", models, (64,), torch.bfloat16),
                                      ("bias", models, (), torch.float32),
                                      ("reordered", reordered, (3, 8), torch.float32)):
        file = root / f"{case}-{name}.safetensors"
        save_file({f"m{i}": spread_values((sizes[m], *shape), g).to(dtype)
                   for i, m in enumerate(order)}, str(file))
        specs.append({"name": name, "models": order, "file": str(file)})
    return specs


def run_mergekit(cases: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "cases.json"
    spec.write_text(json.dumps(cases))
    subprocess.run([str(MERGEKIT_PYTHON), str(REFERENCE), str(spec), str(out), "2"], check=True,
                   timeout=600, env={**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"},
                   stdout=sys.stderr)


def mergekit_missing() -> str | None:
    """Why the mergekit comparisons skip: only an explicit opt-out. Otherwise the reference venv
    is made on first use, and a failure to make it fails the test with the reason."""
    if os.environ.get(mergekit_reference.OPT_OUT_ENV) == "1":
        return f"{mergekit_reference.OPT_OUT_ENV}=1: mergekit comparison explicitly opted out"
    try:
        mergekit_reference.ensure_reference_env()
    except mergekit_reference.ReferenceUnavailable as e:
        pytest.fail(f"mergekit reference environment unavailable ({e})", pytrace=False)
    return None
