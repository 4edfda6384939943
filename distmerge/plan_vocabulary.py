"""The planner's vocabulary step: the output tokenizer and each vocabulary tensor's row recipes.

When a config names a tokenizer (``tokenizer_source`` or the ``tokenizer:`` block), mergekit
builds the output vocabulary and aligns every vocabulary tensor (embeddings, heads) to it
before merging. Here the planner builds the tokenizer once (:mod:`distmerge.vocab`) and gives
each vocabulary tensor a :class:`~distmerge.vocab.VocabularyRows`: the workers then assemble
any row range of each model's aligned tensor from the input rows it needs, so a merged
vocabulary streams by rows like every other tensor.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from distmerge.config import MergeConfig
from distmerge.dtypes import SAFETENSORS_TO_TORCH
from distmerge.io.safetensors import TensorInfo
from distmerge.vocab import (
    TokenizerConfig,
    TokenizerInfo,
    VocabularyRows,
    build_tokenizer,
    padded_rows,
    tensor_rows,
    vocabulary_tensors,
)
from distmerge.vocab.build import model_index


@dataclass(frozen=True)
class PlannedVocabulary:
    """The output tokenizer, its settings, and which output tensors are indexed by token."""

    info: TokenizerInfo
    settings: TokenizerConfig
    names: frozenset[str]
    out_rows: int  # rows of every vocabulary tensor (len(vocab), padded)


def plan_vocabulary(config: MergeConfig, template_config: dict, model_tensors: Sequence[Collection[str]]) -> PlannedVocabulary | None:
    """Build the output tokenizer when the config asks for one (None: it does not); the models
    are ``config.referenced_models()``, whose tensor names are ``model_tensors``."""
    settings = config.tokenizer_settings
    if settings is None:
        return None
    models = config.referenced_models()
    info = build_tokenizer(models, config.base_model, settings.source, list(settings.tokens or {}))
    names = frozenset(v.name for v in vocabulary_tensors(template_config, model_tensors, models))
    return PlannedVocabulary(info, settings, names, padded_rows(len(info.vocab), settings.pad_to_multiple_of))


def tensor_vocabulary(vocabulary: PlannedVocabulary, name: str, models: Sequence[str], infos: Sequence[TensorInfo],
                      base_model: str | None, compute_dtype: str) -> VocabularyRows:
    """The row recipes of output tensor ``name`` whose inputs are ``infos`` of ``models`` (in the
    slice's input order, mergekit's model order: the order averaged rows are added in)."""
    indices = [model_index(vocabulary.info.models, m, "a model") for m in models]
    return tensor_rows(vocabulary.info, vocabulary.settings, base_model, indices, [i.shape for i in infos],
                       SAFETENSORS_TO_TORCH[compute_dtype], name)
