"""Which recipe each output token's row follows, for one vocabulary tensor: mergekit 0.1.5's
``PermutedVocabulary.assign_embedding_sources`` and ``compute_default_embedding`` computed once,
as arrays (:class:`distmerge.vocab.rows.VocabularyRows`), with mergekit's errors raised here, as
:class:`ConfigError` naming the token and the tensor, instead of when a tensor is merged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from distmerge.errors import ConfigError
from distmerge.vocab.build import TokenizerInfo, same_model
from distmerge.vocab.config import (
    ModelTokenEmbedding,
    TokenEmbeddingConfig,
    TokenizerConfig,
    ZeroEmbedding,
)
from distmerge.vocab.rows import COPY, MEAN, ZERO, VocabularyRows, frozen

log = logging.getLogger(__name__)


def padded_rows(vocab_len: int, pad_to_multiple_of: int | None) -> int:
    """Rows of the aligned tensors (and the output ``vocab_size``), as mergekit."""
    if pad_to_multiple_of and vocab_len % pad_to_multiple_of:
        return (vocab_len // pad_to_multiple_of + 1) * pad_to_multiple_of
    return vocab_len


def _find(models: Sequence[str], ref: str) -> int | None:
    return next((i for i, m in enumerate(models) if same_model(m, ref)), None)


def vocabulary_rows(vocab: Mapping[str, int], permutations: Sequence[np.ndarray], models: Sequence[str], *,
                    base_model: str | None, tokens: Mapping[str, TokenEmbeddingConfig] | None,
                    pad_to_multiple_of: int | None, input_rows: Sequence[int],
                    original_vocabs: Sequence[Mapping[str, int]], row_shape: tuple[int, ...],
                    dtype: torch.dtype, tensor: str = "a vocabulary tensor") -> VocabularyRows:
    """Recipes for one tensor whose inputs come from ``models`` (paths, in the tensor's model
    order), with ``permutations[i]`` (output id -> row of ``models[i]``, -1 when absent),
    ``input_rows[i]`` rows in ``models[i]``'s tensor and its tokenizer's ``original_vocabs[i]``."""
    n, num = len(vocab), len(models)
    if not (len(permutations) == len(input_rows) == len(original_vocabs) == num) or num == 0:
        raise ValueError("one permutation, row count and vocabulary per model, and at least one model")
    perm = np.stack([np.asarray(p, dtype=np.int64)[:n] for p in permutations])
    for i, rows in enumerate(input_rows):
        if perm.shape[1] != n or (perm[i] >= rows).any():
            raise ConfigError(f"{tensor}: models[{i}] {models[i]} has {rows} rows, fewer than its tokenizer's "
                              "ids need; its vocab_size or tokenizer does not match its weights")
    has = perm >= 0
    count = has.sum(axis=0)
    cfgs = dict(tokens or {})
    configured = np.zeros(n, dtype=bool)
    for text in cfgs:
        if text in vocab:
            configured[vocab[text]] = True
    base = _find(models, base_model) if base_model is not None else None
    kind = np.zeros(n, dtype=np.int8)
    copy_model = np.full(n, -1, dtype=np.int64)
    copy_row = np.full(n, -1, dtype=np.int64)
    need = ~configured & (count < num)
    single = need & (count == 1)
    donor = np.argmax(has, axis=0)
    kind[single], copy_model[single] = COPY, donor[single]
    copy_row[single] = perm[donor[single], np.nonzero(single)[0]]
    kind[need & (count == 0)] = ZERO
    if (need & (count == 0)).any():
        log.warning("%s: %d tokens are in no model; their rows are zero", tensor, int((need & (count == 0)).sum()))
    from_base = need & (count >= 2) & (has[base] if base is not None else False)
    kind[from_base], copy_model[from_base] = COPY, base if base is not None else -1
    if base is not None:
        copy_row[from_base] = perm[base, from_base]
    kind[need & (count >= 2) & ~from_base] = MEAN
    forced = np.zeros(n, dtype=bool)
    for text, cfg in cfgs.items():
        t = vocab.get(text)
        if t is None:
            continue
        forced[t] = cfg.force
        if cfg.force or count[t] < num:
            kind[t], copy_model[t], copy_row[t] = _configured(
                text, t, cfg, models, perm, input_rows, original_vocabs, tensor)
    own = tuple(frozen(np.where(has[i] & ~forced, perm[i], -1)) for i in range(num))
    present = tuple(frozen(perm[i].copy()) for i in range(num))
    return VocabularyRows(n, padded_rows(n, pad_to_multiple_of), tuple(row_shape), dtype, own, present,
                          frozen(kind), frozen(copy_model), frozen(copy_row))


def _configured(text: str, t: int, cfg: TokenEmbeddingConfig, models: Sequence[str], perm: np.ndarray,
                input_rows: Sequence[int], original_vocabs: Sequence[Mapping[str, int]],
                tensor: str) -> tuple[int, int, int]:
    """mergekit's ``compute_default_embedding`` for a configured token: (kind, model, row)."""
    where = f"tokenizer.tokens[{text!r}]"
    src = cfg.source
    if isinstance(src, ZeroEmbedding):
        return ZERO, -1, -1
    ref = src.model if isinstance(src, ModelTokenEmbedding) else src
    if ref is None:
        raise ConfigError(f"{where}: no source given, but {tensor} needs one for it (it is forced, or a "
                          "model lacks the token); give source: a model, {kind: zero} or {kind: model_token, ...}")
    m = _find(models, ref)
    if m is None:
        raise ConfigError(f"{where}: requires a vocabulary weight from model {ref}, but that weight is "
                          f"missing ({tensor} comes from {', '.join(models)})")
    if isinstance(src, ModelTokenEmbedding):
        row = src.token_id
        if row is None:
            if src.token not in original_vocabs[m]:
                raise ConfigError(f"{where}: token {src.token!r} is not in the vocabulary of model {ref}")
            row = original_vocabs[m][src.token]
        if not 0 <= row < input_rows[m]:
            raise ConfigError(f"{where}: token id {row} is out of range for model {ref} "
                              f"({tensor} has {input_rows[m]} rows there)")
        return COPY, m, row
    if perm[m, t] < 0:
        raise ConfigError(f"{where}: token {text!r} is not in model {ref}, its configured source")
    return COPY, m, int(perm[m, t])


def tensor_rows(info: TokenizerInfo, settings: TokenizerConfig, base_model: str | None, models: Sequence[int],
                input_shapes: Sequence[tuple[int, ...]], dtype: torch.dtype,
                tensor: str = "a vocabulary tensor") -> VocabularyRows:
    """:func:`vocabulary_rows` for a tensor merged from ``info.models[i] for i in models`` (in
    that order) whose input tensors have ``input_shapes`` (vocabulary on axis 0)."""
    shapes = [tuple(s) for s in input_shapes]
    if len({s[1:] for s in shapes}) != 1:
        raise ConfigError(f"{tensor}: the models' non-vocabulary dimensions differ ({shapes})")
    return vocabulary_rows(
        info.vocab, [info.permutations[i] for i in models], [info.models[i] for i in models],
        base_model=base_model, tokens=settings.tokens, pad_to_multiple_of=settings.pad_to_multiple_of,
        input_rows=[s[0] for s in shapes], original_vocabs=[info.original_vocabs[i] for i in models],
        row_shape=shapes[0][1:], dtype=dtype, tensor=tensor)
