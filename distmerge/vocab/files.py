"""A model folder's tokenizer and vocabulary size, read by distmerge's I/O rules.

transformers opens whatever paths a folder holds, so it never sees the model folder itself:
each tokenizer file (:data:`distmerge.checkpoint.TOKENIZER_FILES`) is first checked to be a
regular file that really lives in the folder (a link out of it is refused), bounded in size,
its JSON parsed with a nesting limit, and copied into a private temporary folder; only that
copy is handed to ``AutoTokenizer`` (``trust_remote_code=False``, local files only). Anything a
careless or hostile folder can do wrong is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from distmerge.checkpoint import MAX_CONFIG_JSON_BYTES, TOKENIZER_CORE_FILES, TOKENIZER_FILES
from distmerge.errors import CheckpointError
from distmerge.io.files import check_inside, read_limited
from distmerge.io.model_source import locate_model
from distmerge.io.structured import check_bounded, read_json

log = logging.getLogger(__name__)

MAX_TOKENIZER_FILE_BYTES = 256 * 1000**2  # the largest real tokenizer.json files are tens of MB
MAX_TOKENIZER_JSON_NODES = 50_000_000


def _checked_json(data: bytes, where: str) -> None:
    try:
        parsed = json.loads(data)
    except RecursionError:
        raise CheckpointError(f"{where}: nested too deeply to be a tokenizer file; refused") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({str(e)[:200]})") from None
    check_bounded(parsed, where, CheckpointError, max_nodes=MAX_TOKENIZER_JSON_NODES)


def copy_tokenizer_files(folder: Path, dest: Path) -> list[str]:
    """Copy ``folder``'s tokenizer files into ``dest`` after the checks above; their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = folder / name
        if not os.path.lexists(src):
            continue
        real = check_inside(src, folder, "tokenizer file", CheckpointError)
        data = read_limited(real, "tokenizer file", MAX_TOKENIZER_FILE_BYTES, CheckpointError)
        if name.endswith(".json"):
            _checked_json(data, str(src))
        (dest / name).write_bytes(data)
        copied.append(name)
    return copied


def load_tokenizer(folder: str | os.PathLike[str], role: str) -> Any | None:
    """The fast tokenizer of a model folder, or None when it has no tokenizer files at all."""
    import transformers

    folder = locate_model(str(folder), role, CheckpointError).folder
    if not folder.is_dir():
        raise CheckpointError(f"{role} {folder}: not a model folder (it does not exist or is a file)")
    with tempfile.TemporaryDirectory(prefix="distmerge-tok-") as tmp:
        try:
            copied = copy_tokenizer_files(folder, Path(tmp))
        except OSError as e:
            raise CheckpointError(f"{role} {folder}: cannot read its tokenizer files ({e.strerror or e})") from None
        if not any(n in TOKENIZER_CORE_FILES for n in copied):
            return None
        try:
            tok = transformers.AutoTokenizer.from_pretrained(
                tmp, use_fast=True, trust_remote_code=False)
        except Exception as e:  # transformers raises anything from ValueError to KeyError here
            raise CheckpointError(
                f"{role} {folder}: its tokenizer files ({', '.join(copied)}) cannot be loaded: "
                f"{type(e).__name__}: {str(e)[:300]}") from None
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{role} {folder}: only a slow (Python) tokenizer could be built from its "
                              "files; merging vocabularies needs a fast one (tokenizer.json)")
    return tok


def config_vocab_size(folder: str | os.PathLike[str], role: str) -> int | None:
    """``vocab_size`` of a model folder's config.json (``text_config.vocab_size`` for multimodal
    wrappers), or None when it has none, as mergekit's ``get_vocab_size``."""
    folder = locate_model(str(folder), role, CheckpointError).folder
    path = folder / "config.json"
    if not os.path.lexists(path):
        return None
    config = read_json(check_inside(path, folder, "config.json", CheckpointError), f"{role}'s config.json",
                       CheckpointError, limit=MAX_CONFIG_JSON_BYTES)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings")
    for section in (config, config.get("text_config")):
        if isinstance(section, dict) and "vocab_size" in section:
            value = section["vocab_size"]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise CheckpointError(f"{path}: vocab_size is {str(value)[:40]!r}, expected a positive integer")
            return value
    return None
