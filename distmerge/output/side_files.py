"""The files beside the weights: config.json, the tokenizer and generation settings.

A merged checkpoint loads only with its tokenizer, so those files are copied from the
tokenizer source (the template model unless the config names another). They come from a model
folder a stranger may have prepared, so only regular files that really live in that folder (or
its Hugging Face cache blob store) are copied, each bounded in size.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from distmerge.checkpoint import SIDE_FILES, TOKENIZER_CORE_FILES
from distmerge.errors import OutputError
from distmerge.io.files import is_within, model_roots, read_limited
from distmerge.io.writes import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

CONFIG_COPY_NAME = "distmerge_config.yml"  # the resolved merge config, kept beside the output
MAX_SIDE_FILE_BYTES = 1 << 30


def write_tokenizer_files(out_dir: Path, files: Mapping[str, bytes], record: Callable[[str], None]) -> list[str]:
    """A built tokenizer's files (``tokenizer.json``, its config, a chat template), each recorded
    before it is created; returns their names."""
    for name, data in files.items():
        if "/" in name or name.startswith("."):
            raise OutputError(f"{out_dir}: refusing to write tokenizer file {name!r} (not a plain file name)")
        record(name)
        write_bytes_atomic(out_dir / name, data)
    return list(files)


def write_model_config(out_dir: Path, config: dict, out_dtype_name: str | None) -> None:
    """config.json of the template with the output dtype recorded."""
    config = dict(config)
    if out_dtype_name:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = out_dtype_name
    write_text_atomic(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(source: Path, out_dir: Path, record: Callable[[str], None],
                    names: Sequence[str] = SIDE_FILES) -> tuple[list[str], list[str]]:
    """Copy tokenizer and generation files from the model folder ``source``.

    Only regular files are copied, and only when they really live in the model folder (or
    its Hugging Face cache blob store): a ``tokenizer.json`` that links to ``/etc/passwd`` is
    skipped, not copied, and so is a FIFO or device. ``record(name)`` is called before each
    file is created (the journal's write-ahead record of what this run owns). Returns the
    names copied and the reasons for those skipped (also logged). ``names``: which of them.
    """
    copied, skipped = [], []
    roots = model_roots(source)
    for name in names:
        src = source / name
        if not os.path.lexists(src):
            continue
        real = src.resolve()
        if not is_within(real, roots):
            skipped.append(f"{name}: a link to a location outside {source}")
            continue
        try:
            data = read_limited(real, name, MAX_SIDE_FILE_BYTES, OutputError)
        except OutputError as e:
            skipped.append(f"{name}: {str(e).split(': ', 1)[-1]}")
            continue
        record(name)
        write_bytes_atomic(out_dir / name, data)
        copied.append(name)
    for reason in skipped:
        log.warning("tokenizer_source: skipped %s", reason)
    if any(n in TOKENIZER_CORE_FILES for n in names) and not any(n in TOKENIZER_CORE_FILES for n in copied):
        log.warning("tokenizer_source %s has no tokenizer files; the output has none either", source)
    return copied, skipped
