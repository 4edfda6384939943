"""A careless or hostile model folder: the tokenizer is refused with a CheckpointError naming
the file, never a traceback, and nothing outside the folder is read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distmerge.errors import CheckpointError
from distmerge.vocab import build_tokenizer
from distmerge.vocab.files import config_vocab_size, load_tokenizer
from tests.vocab.conftest import make_model, make_tokenizer


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return Path(make_model(tmp_path / "good", 64, make_tokenizer(64, ["<|a|>"])))


def _refused(folder: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        build_tokenizer([str(folder)], str(folder), "union")


def test_link_out_of_the_folder_is_refused(tmp_path, good):
    secret = tmp_path / "secret.json"
    secret.write_text((good / "tokenizer.json").read_text())
    (good / "tokenizer.json").unlink()
    (good / "tokenizer.json").symlink_to(secret)
    _refused(good, r"tokenizer\.json: tokenizer file is a symbolic link to a location outside")


def test_fifo_and_directory_are_refused(good):
    (good / "special_tokens_map.json").unlink(missing_ok=True)
    os.mkfifo(good / "special_tokens_map.json")
    _refused(good, r"special_tokens_map\.json: tokenizer file is a FIFO")
    (good / "special_tokens_map.json").unlink()
    (good / "added_tokens.json").mkdir()
    _refused(good, r"added_tokens\.json: tokenizer file is a directory")


@pytest.mark.parametrize(("content", "match"), [
    (b"{not json", r"tokenizer_config\.json: not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, r"tokenizer_config\.json: nested too deeply"),
    (b"\xff\xfe", r"tokenizer_config\.json: not valid JSON"),
])
def test_corrupt_json_names_the_file(good, content, match):
    (good / "tokenizer_config.json").write_bytes(content)
    _refused(good, match)


def test_tokenizer_json_that_transformers_refuses(good):
    (good / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    _refused(good, r"good: its tokenizer files \(tokenizer\.json, tokenizer_config\.json.*cannot be loaded")


def test_remote_code_is_never_run(good):
    cfg = json.loads((good / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    (good / "tokenizer_config.json").write_text(json.dumps(cfg))
    (good / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    _refused(good, r"cannot be loaded")


def test_oversized_file_is_refused_before_reading(good, monkeypatch):
    monkeypatch.setattr("distmerge.vocab.files.MAX_TOKENIZER_FILE_BYTES", 100)
    _refused(good, r"tokenizer\.json: tokenizer file is \d+ bytes, more than the 100")


@pytest.mark.parametrize("value", ["12", -3, 0, True])
def test_bad_vocab_size_in_config(good, value):
    cfg = json.loads((good / "config.json").read_text())
    cfg["vocab_size"] = value
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: vocab_size is"):
        config_vocab_size(good, "model")


def test_missing_folder_and_missing_tokenizer(tmp_path, good):
    with pytest.raises(CheckpointError, match="not a model folder"):
        load_tokenizer(tmp_path / "nowhere", "model")
    bare = Path(make_model(tmp_path / "bare", 64, None))
    assert load_tokenizer(bare, "model") is None
    with pytest.raises(CheckpointError, match="base model .*bare: no tokenizer files"):
        build_tokenizer([str(bare), str(good)], str(bare), "union")
    with pytest.raises(CheckpointError, match="tokenizer source .*bare: no tokenizer files"):
        build_tokenizer([str(good), str(bare)], str(good), str(bare))
