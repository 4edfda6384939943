"""Tiny Hugging Face models built locally, for the demo, the tests and the benchmarks.

No weights can be downloaded where distmerge is tested, so this module makes small real
checkpoints: a `transformers` config of a supported architecture with random weights, a
byte-level tokenizer, saved with ``save_pretrained`` as sharded safetensors with an index.
Experts are the base plus a small, seeded perturbation, like fine-tunes of one base.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TINY_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 260,
}


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A small config of the given architecture (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3)."""
    from transformers import AutoConfig

    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)
    dims = dict(TINY_DIMS)
    if arch in ("qwen3", "gemma2", "gemma3"):
        dims["head_dim"] = 16
    if arch == "phi3":
        dims.pop("num_key_value_heads")
        dims["num_key_value_heads"] = 4
        dims["pad_token_id"] = 0
    dims["bos_token_id"] = 257
    dims["eos_token_id"] = 258
    dims.update(overrides)
    config = AutoConfig.for_model(model_type, **dims)
    config.use_cache = True
    return config


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: ids 0-255 are bytes, then <pad>, <s>, </s>, <unk> (260 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps each byte to a printable character; keep ids equal to byte values.
    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(256)}
    assert set(vocab) <= set(byte_to_unicode)
    for i, special in enumerate(["<pad>", "<s>", "</s>", "<unk>"]):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "100KB",
    base_state: dict[str, torch.Tensor] | None = None,
    noise: float = 0.02,
    tie_word_embeddings: bool = False,
    **overrides: Any,
) -> Path:
    """Save a tiny model (random, or ``base_state`` plus seeded noise) in HF layout.

    Saved as sharded safetensors with ``model.safetensors.index.json`` (the shard size is
    small on purpose), plus config.json, generation_config.json and the tokenizer files.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    config = tiny_config(arch, tie_word_embeddings=tie_word_embeddings, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if base_state is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.state_dict().items():
                ref = base_state[name].to(torch.float32)
                p.copy_(ref + noise * torch.randn(ref.shape, generator=gen) * (ref.std() if ref.numel() > 1 else 1.0))
    model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    byte_tokenizer().save_pretrained(out)
    return out


def build_family(
    root: str | Path,
    n_experts: int = 2,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "100KB",
    tie_word_embeddings: bool = False,
    noise: float = 0.02,
    **overrides: Any,
) -> tuple[Path, list[Path]]:
    """A base model and ``n_experts`` perturbed copies of it, under ``root``."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    base = build_model(root / "base", arch, seed=0, dtype=dtype, max_shard_size=max_shard_size,
                       tie_word_embeddings=tie_word_embeddings, **overrides)
    base_state = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    experts = [
        build_model(root / f"expert{i + 1}", arch, seed=100 + i, dtype=dtype, max_shard_size=max_shard_size,
                    base_state=base_state, noise=noise, tie_word_embeddings=tie_word_embeddings, **overrides)
        for i in range(n_experts)
    ]
    return base, experts
