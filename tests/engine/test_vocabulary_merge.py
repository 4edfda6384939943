"""Merged vocabularies end to end: models with different tokenizers merged with
``tokenizer_source: union`` / the ``tokenizer:`` block, streamed by rows, shard-invariant, with
the written tokenizer matching the embedding size, checked against a whole-tensor reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distmerge.config import parse_config
from distmerge.engine.run import run_merge
from tests.helpers import file_bytes, load_state
from tests.vocab.conftest import make_tokenizer

pytestmark = pytest.mark.usefixtures("ray_local")
EXTRA = ["<|im_start|>", "<|im_end|>"]


def _model(path: Path, tokenizer, vocab_size: int, seed: int, tie: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def two_vocabularies(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocabs")
    base = _model(root / "base", make_tokenizer(64, []), 64, 0)
    chat = _model(root / "chat", make_tokenizer(64, EXTRA), 66, 1)
    return base, chat


def _merge(base: Path, chat: Path, out: Path, shard: str = "256MB", **extra) -> dict[str, torch.Tensor]:
    cfg = parse_config({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(base), "parameters": {"weight": 0.75}}, {"model": str(chat), "parameters": {"weight": 0.25}}],
        "execution": {"shard_size": shard}, **extra})
    run_merge(cfg, out, progress=False)
    return load_state(out)


def test_union_vocabulary_rows_follow_mergekit(two_vocabularies, tmp_path):
    """Tokens both models have: the weighted mean of their rows; tokens only the chat model has:
    its row for both inputs (mergekit's donor rule), so the merge keeps it; padding rows: the
    mean of each aligned input, merged. The tokenizer and config.json say the same size."""
    base, chat = two_vocabularies
    got = _merge(base, chat, tmp_path / "out", tokenizer={"source": "union", "pad_to_multiple_of": 32})
    sb, sc = load_state(base), load_state(chat)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        b, c = sb[name], sc[name]
        assert got[name].shape == (96, 32)
        aligned_b = torch.cat([b, c[64:66]])  # the base lacks the two chat tokens: the chat's rows
        aligned_c = c
        expected = torch.empty(96, 32)
        expected[:66] = (0.75 * aligned_b + 0.25 * aligned_c) / 1.0
        expected[66:] = (0.75 * aligned_b.mean(0) + 0.25 * aligned_c.mean(0)) / 1.0
        torch.testing.assert_close(got[name], expected, rtol=0, atol=2e-7, msg=name)
    tokens = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    added = {t["content"] for t in tokens["added_tokens"]}
    assert set(EXTRA) <= added
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 96
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == 66 and tok.convert_tokens_to_ids("<|im_end|>") == 65
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(model(torch.tensor([[1, 2, 65]])).logits).all()


def test_vocabulary_merge_is_shard_invariant(two_vocabularies, tmp_path):
    base, chat = two_vocabularies
    outs = [file_bytes(tmp_path / s) for s in ("1B", "3KB", "1GB")
            if _merge(base, chat, tmp_path / s, s, tokenizer_source="union", chat_template="chatml") is not None]
    assert outs[0] == outs[1] == outs[2]
    config = json.loads((tmp_path / "1B" / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or (tmp_path / "1B" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template


def test_base_vocabulary_drops_tokens_the_base_lacks(two_vocabularies, tmp_path):
    """``tokenizer_source: base``: the output has the base's 64 tokens; the chat model's rows of
    them are merged, its extra rows are not used."""
    base, chat = two_vocabularies
    got = _merge(base, chat, tmp_path / "out", tokenizer_source="base")
    sb, sc = load_state(base), load_state(chat)
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(got[name], (0.75 * sb[name] + 0.25 * sc[name][:64]) / 1.0, rtol=0, atol=2e-7)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64


def test_different_vocabularies_without_a_tokenizer_setting_name_the_fix(two_vocabularies, tmp_path):
    from distmerge.errors import CheckpointError

    base, chat = two_vocabularies
    with pytest.raises(CheckpointError, match="tokenizer_source"):
        _merge(base, chat, tmp_path / "out")


def test_chat_template_without_a_merged_vocabulary(llama_family, tmp_path):
    """``chat_template`` alone: the template model's tokenizer is written with that template."""
    base, experts = llama_family
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": str(base), "chat_template": literal,
                        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]})
    run_merge(cfg, tmp_path / "out", progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user] hi\n"
    assert len(tok) == len(AutoTokenizer.from_pretrained(base))


def test_a_read_once_vocabulary_tensor_gives_the_bytes_of_separate_rounds(two_vocabularies, tmp_path):
    """TIES over a merged vocabulary: the token tensors are held as assembled (the vocabulary's
    dtype, which the read-once budget counts) and merged from one read; a small shard size
    reduces them in separate tasks: the same bytes."""
    from distmerge.plan import build_plan, held_bytes

    base, chat = two_vocabularies
    cfg = parse_config({"merge_method": "ties", "base_model": str(base), "tokenizer": {"source": "union"},
                        "models": [{"model": str(chat), "parameters": {"weight": 0.5, "density": 0.5}}]})
    plan = build_plan(cfg, 10**9)
    token = [i for i, t in enumerate(plan.tensors) if t.vocabulary is not None]
    assert token and set(token) <= plan.read_once_tensors
    for i in token:
        t = plan.tensors[i]
        assert held_bytes(t) == t.rows * t.row_numel * t.vocabulary.dtype.itemsize * len(t.sources)
    run_merge(cfg, tmp_path / "once", shard_size=10**9, progress=False)
    small = build_plan(cfg, 4_000)
    assert not set(token) & small.read_once_tensors
    run_merge(cfg, tmp_path / "apart", shard_size=4_000, progress=False)
    assert file_bytes(tmp_path / "once") == file_bytes(tmp_path / "apart")
