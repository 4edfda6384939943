"""The merged vocabulary: tokenizer building and per-row recipes of the vocabulary tensors.

A pure package (no engine, no Ray): the planner builds the output tokenizer and, per vocabulary
tensor, a :class:`VocabularyRows`; workers call its ``needed_rows`` and ``assemble`` for their
row ranges. Behaviour follows mergekit 0.1.5 (``BuildTokenizer``, ``PermutedVocabulary``,
``_set_chat_template``); docs/vocabulary.md says how, per token, and where it differs.
"""

from distmerge.vocab.build import TokenizerInfo, build_tokenizer
from distmerge.vocab.chat_template import named_templates, resolve_chat_template, tokenizer_files
from distmerge.vocab.config import (
    ModelTokenEmbedding,
    TokenEmbeddingConfig,
    TokenizerConfig,
    ZeroEmbedding,
    tokenizer_settings,
)
from distmerge.vocab.recipes import padded_rows, tensor_rows, vocabulary_rows
from distmerge.vocab.rows import VocabularyRows, promoted_dtype
from distmerge.vocab.tensors import VocabTensor, vocabulary_tensors

__all__ = [
    "ModelTokenEmbedding", "TokenEmbeddingConfig", "TokenizerConfig", "TokenizerInfo", "VocabTensor",
    "VocabularyRows", "ZeroEmbedding", "build_tokenizer", "named_templates", "padded_rows", "promoted_dtype",
    "resolve_chat_template", "tensor_rows", "tokenizer_files", "tokenizer_settings", "vocabulary_rows",
    "vocabulary_tensors",
]
