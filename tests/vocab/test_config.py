"""The tokenizer: block and chat_template values, refused with messages naming the problem."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distmerge.errors import ConfigError
from distmerge.vocab import (
    TokenizerConfig,
    named_templates,
    resolve_chat_template,
    tokenizer_settings,
)


def test_mergekit_shapes_parse():
    cfg = TokenizerConfig.model_validate({
        "source": "union", "pad_to_multiple_of": 64,
        "tokens": {"<a>": {"source": {"kind": "zero"}}, "<b>": {"source": "/m", "force": True},
                   "<c>": {"source": {"kind": "model_token", "model": "/m", "token_id": 3}},
                   "<d>": {"source": {"kind": "model_token", "model": "/m", "token": "<s>"}}, "<e>": {}}})
    assert cfg.tokens["<b>"].force and cfg.tokens["<e>"].source is None
    assert TokenizerConfig().source == "union"


@pytest.mark.parametrize("bad", [
    {"tokens": {"<a>": {"source": {"kind": "model_token", "model": "/m"}}}},
    {"tokens": {"<a>": {"source": {"kind": "model_token", "model": "/m", "token": "x", "token_id": 1}}}},
    {"tokens": {"<a>": {"source": {"kind": "nope"}}}},
    {"tokens": {"<a>": {"sorce": "/m"}}},
    {"pad_to_multiple_of": 0},
    {"source": ""},
    {"tokens": {"": {}}},
])
def test_bad_blocks_are_refused(bad):
    with pytest.raises(ValidationError):
        TokenizerConfig.model_validate(bad)


def test_settings_from_either_key():
    assert tokenizer_settings(None, None) is None
    assert tokenizer_settings("base", None) == TokenizerConfig(source="base")
    block = TokenizerConfig(source="/m")
    assert tokenizer_settings(None, block) is block
    with pytest.raises(ValueError, match="not both"):
        tokenizer_settings("base", block)


def test_chat_templates():
    assert named_templates() == ["alpaca", "chatml", "exaone", "llama3", "mistral"]
    assert "<|im_start|>" in resolve_chat_template("chatml")
    literal = "{{ messages[0]['content'] }} and more text"
    assert resolve_chat_template(literal) == literal
    assert resolve_chat_template(None) is None and resolve_chat_template("") is None
    assert resolve_chat_template("auto", []) is None
    for bad in ("chatmlx", "{{ short }}", "no braces but long enough to pass"):
        with pytest.raises(ConfigError, match="chat_template"):
            resolve_chat_template(bad)
