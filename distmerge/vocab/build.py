"""The merged tokenizer and, per input model, where each output token's row is, as mergekit
0.1.5's ``BuildTokenizer`` builds them.

``source``: ``base`` (the base model's tokenizer, stripped of tokens whose id is at or past its
``vocab_size``), ``union`` (every token of every model below its ``vocab_size``: the base
tokenizer, then the other models' regular tokens, then all added tokens with the first model's
settings), or a model path (that folder's tokenizer, not stripped). The tokens a ``tokenizer:``
block configures are added when the vocabulary lacks them. Models are taken in the order given
(distmerge passes base first, then ``models:`` in config order; mergekit iterates a Python set,
so its union ids depend on the hash seed).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distmerge.errors import CheckpointError, ConfigError
from distmerge.vocab.files import config_vocab_size, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerInfo:
    """The output tokenizer, and per model (by index into ``models``) its permutation: for
    each output token id, that model's row, or -1 when it lacks the token."""

    tokenizer: Any  # a transformers fast tokenizer
    models: tuple[str, ...]
    permutations: tuple[np.ndarray, ...]
    original_vocabs: tuple[dict[str, int], ...]

    @property
    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()


def same_model(a: str, b: str) -> bool:
    """Whether two config paths name the same folder."""
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return a == b


def model_index(models: Sequence[str], ref: str, what: str) -> int:
    for i, m in enumerate(models):
        if same_model(m, ref):
            return i
    raise ConfigError(f"{what}: {ref!r} is not one of the merged models ({', '.join(models)})")


def _strip(tokenizer: Any, vocab_size: int, folder: str) -> Any:
    """mergekit's ``get_stripped_tokenizer``: drop tokens with id >= vocab_size (BPE only)."""
    import tokenizers

    unused = {tok for tok, idx in tokenizer.get_vocab().items() if idx >= vocab_size}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise CheckpointError(f"{folder}: its tokenizer is {data['model']['type']} and has tokens past "
                              f"vocab_size {vocab_size}; only BPE tokenizers can be stripped (as in mergekit)")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)

    def keep(m: Any) -> bool:
        if isinstance(m, str) and m.count(" ") == 1:
            pair = m.split(" ")
        elif isinstance(m, list):
            pair = m
        else:
            raise CheckpointError(f"{folder}: tokenizer.json has a merge of unexpected form {str(m)[:60]!r}")
        return not any(t in unused for t in pair)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union(base_tok: Any, toks: dict[int, Any], sizes: dict[int, int | None]) -> Any:
    """mergekit's ``build_union_tokenizer``: the base tokenizer plus every other token."""
    import transformers

    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for i, tok in toks.items():
        vocab_size = sizes[i] or tok.vocab_size
        added = tok.added_tokens_decoder
        for text, idx in tok.get_vocab().items():
            if idx >= vocab_size:
                log.warning("token %r of models[%d]'s tokenizer is at or past vocab_size", text, i)
                continue
            if text in added:
                continue
            out_vocab.setdefault(text, len(out_vocab))
        for idx, info in added.items():
            if idx >= vocab_size:
                continue
            if info.content in out_added:
                if out_added[info.content] != info:
                    log.warning("token %r added with different settings; the first model's are used", info.content)
                continue
            out_added[info.content] = info
    with tempfile.TemporaryDirectory(prefix="distmerge-tok-") as tmp:
        base_tok.save_pretrained(tmp)
        res = transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for text in out_vocab:
        if text not in out_added and text not in base_vocab:
            res.add_tokens(text)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def build_tokenizer(models: Sequence[str], base_model: str | None, source: str,
                    add_tokens: Sequence[str] = ()) -> TokenizerInfo:
    """Build the output tokenizer for ``models`` (paths, base included, each once)."""
    models = tuple(models)
    base = model_index(models, base_model, "base_model") if base_model is not None else 0
    sizes = {i: config_vocab_size(m, f"models[{i}]") for i, m in enumerate(models)}
    base_tok = load_tokenizer(models[base], "base model")
    if base_tok is None:
        raise CheckpointError(f"base model {models[base]}: no tokenizer files (tokenizer.json, ...); "
                              "building a merged tokenizer needs the base model's")
    base_tok = _strip(base_tok, sizes[base] or len(base_tok.get_vocab()), models[base])
    toks: dict[int, Any] = {base: base_tok}
    for i, m in enumerate(models):
        if i != base:
            tok = load_tokenizer(m, f"models[{i}]")
            if tok is None:
                log.warning("models[%d] %s has no tokenizer; assuming the base model's", i, m)
            else:
                toks[i] = tok
    if source == "base":
        out = base_tok
    elif source == "union":
        out = _union(base_tok, toks, sizes)
    else:
        out = load_tokenizer(source, "tokenizer source")
        if out is None:
            raise CheckpointError(f"tokenizer source {source}: no tokenizer files (tokenizer.json, ...)")
    existing = set(out.get_vocab())
    for text in add_tokens:
        if text not in existing:
            out.add_tokens(text)
            existing.add(text)
    vocab_out = out.get_vocab()
    if sorted(vocab_out.values()) != list(range(len(vocab_out))):
        raise CheckpointError(f"the output tokenizer's ids are not 0..{len(vocab_out) - 1} without gaps "
                              "(a tokenizer with holes in its ids); not supported")
    perms = []
    for i, m in enumerate(models):
        model_vocab = toks.get(i, base_tok).get_vocab()
        limit = sizes[i] if sizes[i] is not None else len(model_vocab)
        p = np.full(len(vocab_out), -1, dtype=np.int64)
        for text, new_idx in vocab_out.items():
            orig = model_vocab.get(text)
            if orig is None:
                continue
            if orig >= limit:  # mergekit leaves no entry here (a KeyError later); -1: the model lacks it
                log.warning("models[%d] %s: token %r has id %d past vocab_size %d (padding?)", i, m, text, orig, limit)
                continue
            p[new_idx] = orig
        p.setflags(write=False)
        perms.append(p)
    # A model without a tokenizer is taken to share the base model's (mergekit has no entry).
    return TokenizerInfo(out, models, tuple(perms),
                         tuple(toks.get(i, base_tok).get_vocab() for i in range(len(models))))
