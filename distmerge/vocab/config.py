"""The ``tokenizer:`` block of a merge config, and ``chat_template``, as mergekit 0.1.5 reads them.

Frozen pydantic models with mergekit's field names and rules (``tokenizer.source``: ``union``
(default), ``base`` or a model path; ``tokens``: per token an embedding ``source`` (a model path,
``{kind: zero}`` or ``{kind: model_token, model, token | token_id}``) and ``force``;
``pad_to_multiple_of``). Unknown keys are refused (mergekit ignores some of them silently).
A model is named by its path, as in ``models:``. Layer 1: :mod:`distmerge.config` may embed
these models; nothing here reads a file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKEN_CHARS = 1024
MAX_TEMPLATE_CHARS = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _path(value: str) -> str:
    if not value or "\0" in value or len(value) > 4096:
        raise ValueError("not a usable model path (empty, a NUL byte, or longer than 4096 characters)")
    return value


class ModelTokenEmbedding(_Strict):
    """The embedding row of one token (by text or id) of one model's own vocabulary."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(None, ge=0)
    token: str | None = Field(None, max_length=MAX_TOKEN_CHARS)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _path(v)

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroEmbedding(_Strict):
    """An all-zero row."""

    kind: Literal["zero"]


class TokenEmbeddingConfig(_Strict):
    """Where one output token's row comes from; ``force`` applies it even to models that have
    the token."""

    source: ModelTokenEmbedding | ZeroEmbedding | str | None = None
    force: bool = False

    @field_validator("source")
    @classmethod
    def _source(cls, v: object) -> object:
        return _path(v) if isinstance(v, str) else v


class TokenizerConfig(_Strict):
    """mergekit's ``tokenizer:`` block."""

    source: str = "union"
    tokens: dict[str, TokenEmbeddingConfig] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1, le=1 << 20)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _path(v)

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: dict[str, TokenEmbeddingConfig] | None) -> dict[str, TokenEmbeddingConfig] | None:
        for token in v or {}:
            if not token or len(token) > MAX_TOKEN_CHARS:
                raise ValueError(f"token {token[:40]!r}: empty or longer than {MAX_TOKEN_CHARS} characters")
        return v


def tokenizer_settings(tokenizer_source: str | None,
                       tokenizer: TokenizerConfig | None) -> TokenizerConfig | None:
    """The one tokenizer setting of a config, as mergekit's planner combines them: the
    ``tokenizer:`` block if given, else ``tokenizer_source`` with no tokens; None when neither
    (the output then gets no built tokenizer). Giving both is an error, as in mergekit."""
    if tokenizer is not None and tokenizer_source is not None:
        raise ValueError("give tokenizer_source or a tokenizer: block, not both")
    if tokenizer is not None:
        return tokenizer
    if tokenizer_source is not None:
        return TokenizerConfig(source=tokenizer_source)
    return None
