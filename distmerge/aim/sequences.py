"""Calibration sequences: token ids ``[n_sequences, block_size]`` from a dataset, as the AIM authors cut them.

The AIM code samples like AWQ's ``get_calib_dataset``: shuffle the documents with the seed,
tokenize them in that order, keep those of at most ``block_size`` tokens (skipping empty and
longer ones) until ``n_samples`` are kept, concatenate them and cut the stream into sequences of
``block_size`` (the remainder is dropped). The shuffle is ``numpy.random.default_rng(seed)
.permutation``, the one ``datasets.Dataset.shuffle(seed=...)`` uses. A dataset with an
``input_ids`` column is already tokenized: one sequence per row, used as given.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from distmerge.aim.data import read_dataset
from distmerge.checkpoint import SIDE_FILES, TOKENIZER_CORE_FILES
from distmerge.config import CalibrationConfig
from distmerge.errors import CheckpointError, ConfigError
from distmerge.io.files import check_inside, require_regular
from distmerge.io.model_source import locate_model
from distmerge.io.structured import json_kind

log = logging.getLogger(__name__)



def load_calibration_sequences(calibration: CalibrationConfig, tokenizer_dir: str | Path) -> torch.Tensor:
    """The calibration sequences for ``calibration``, tokenized with the tokenizer in ``tokenizer_dir``."""
    table = read_dataset(calibration.dataset, calibration.text_field)
    if "input_ids" in table.column_names:
        return pretokenized_blocks(table, calibration.block_size)
    field = calibration.text_field
    if calibration.dataset == "builtin" and field not in table.column_names:
        field = "text"
    texts = text_column(table, field, calibration.dataset)
    tokenizer = load_tokenizer(tokenizer_dir)
    sequences = sample_sequences(texts, tokenizer.encode, calibration.n_samples, calibration.block_size, calibration.seed)
    log.info("calibration data %s: %d sequences of %d tokens", calibration.dataset, *sequences.shape)
    return sequences


def text_column(table: pa.Table, field: str, dataset: str) -> list[str | None]:
    """The ``field`` column as Python strings; a ConfigError listing the columns if absent."""
    if field not in table.column_names:
        raise ConfigError(
            f"aim.calibration.text_field: column {field!r} is not in {dataset}; its columns are: "
            f"{', '.join(table.column_names)}"
        )
    column = table.column(field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ConfigError(
            f"aim.calibration.text_field: column {field!r} of {dataset} holds {column.type}, not text"
        )
    return column.to_pylist()


def sample_sequences(
    texts: Sequence[str | None],
    encode: Callable[[str], list[int]],
    n_samples: int,
    block_size: int,
    seed: int,
) -> torch.Tensor:
    """Shuffle, keep up to ``n_samples`` documents of at most ``block_size`` tokens, cut sequences."""
    order = np.random.default_rng(seed).permutation(len(texts))
    kept: list[list[int]] = []
    too_long = 0
    for index in order:
        text = texts[int(index)]
        if text is None:
            continue
        text = text.strip()
        if not text:
            continue
        ids = list(encode(text))
        if len(ids) > block_size:
            too_long += 1
            continue
        if not ids:
            continue
        kept.append(ids)
        if len(kept) == n_samples:
            break
    if len(kept) < n_samples:
        log.warning("calibration data: only %d samples of at most %d tokens (n_samples=%d; %d longer documents "
                    "skipped)", len(kept), block_size, n_samples, too_long)
    stream = torch.tensor([t for ids in kept for t in ids], dtype=torch.int64)
    n_sequences = stream.numel() // block_size
    if n_sequences == 0:
        # Documents longer than a block are skipped whole: where that emptied the data, a smaller
        # block_size keeps fewer of them, and only a larger one helps.
        advice = (f"a larger block_size ({too_long} documents were longer than {block_size} tokens and skipped)"
                  if too_long else "a smaller block_size")
        raise ConfigError(
            f"aim.calibration: the data yields {stream.numel()} tokens in {len(kept)} samples of at most "
            f"{block_size} tokens, not enough for one block; use more data, a larger n_samples or {advice}"
        )
    return stream[: n_sequences * block_size].reshape(n_sequences, block_size)


def pretokenized_blocks(table: pa.Table, block_size: int | None = None) -> torch.Tensor:
    """Rows of an ``input_ids`` column as sequences, as given (all rows must have one length)."""
    rows = table.column("input_ids").to_pylist()
    if not rows or any(not isinstance(r, list) for r in rows):
        raise ConfigError("aim.calibration: the input_ids column must hold lists of token ids, one sequence per row")
    lengths = {len(r) for r in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise ConfigError(
            f"aim.calibration: input_ids rows must all have the same non-zero length (one sequence each); "
            f"found lengths {sorted(lengths)[:5]}"
        )
    try:
        sequences = torch.tensor(rows, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"aim.calibration: input_ids must be integers ({e})") from e
    if block_size is not None and sequences.shape[1] != block_size:
        log.warning("calibration data: pre-tokenized sequences have %d tokens, not block_size=%d; using them as given",
                    sequences.shape[1], block_size)
    log.info("calibration data: %d pre-tokenized sequences of %d tokens", *sequences.shape)
    return sequences


def load_tokenizer(tokenizer_dir: str | Path):  # type: ignore[no-untyped-def]
    """The base model's tokenizer (AutoTokenizer); a CheckpointError naming the folder if absent.

    ``tokenizer_dir`` is a folder or any model reference (a Hub id, ``s3://``): a remote model's
    tokenizer files are fetched with its other small files."""
    folder = locate_model(str(tokenizer_dir), "base model", CheckpointError).folder
    if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_CORE_FILES):
        raise CheckpointError(
            f"base model {folder}: no tokenizer found (none of {', '.join(TOKENIZER_CORE_FILES)}); AIM "
            "calibration tokenizes its data with the base model's tokenizer: save it into that folder, "
            "or give pre-tokenized data with an input_ids column"
        )
    for name in SIDE_FILES:  # transformers would follow a link anywhere and block on a FIFO
        if os.path.lexists(folder / name):
            require_regular(check_inside(folder / name, folder, "tokenizer file", CheckpointError),
                            f"tokenizer file {name}", CheckpointError)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - a stranger's files reach transformers' parsers in any shape
        vocabularies = [n for n in TOKENIZER_CORE_FILES if n != "tokenizer_config.json"]
        if not any((folder / name).is_file() for name in vocabularies):  # transformers' words are about converters
            raise CheckpointError(f"base model {folder}: its tokenizer has settings (tokenizer_config.json) but no "
                                  f"vocabulary ({', '.join(vocabularies)}); copy the tokenizer's files from where "
                                  "the model came from") from None
        broken = _unreadable_json(folder)
        if broken:  # transformers does not say which file its JSON error came from
            raise CheckpointError(f"base model {folder}: cannot load its tokenizer: {broken}") from None
        reason = (f"a tokenizer file lacks the key {e}" if isinstance(e, KeyError)
                  else " ".join(str(e).split()))  # transformers' messages run over several lines
        raise CheckpointError(f"base model {folder}: cannot load its tokenizer ({reason})") from e


def _unreadable_json(folder: Path) -> str | None:
    """The first of the tokenizer's JSON files that is not valid JSON or not an object, named
    with the reason. Read only after the tokenizer failed to load (tokenizer.json: tens of MB)."""
    for name in SIDE_FILES:
        if name.endswith(".json") and (folder / name).is_file():
            try:
                data = json.loads((folder / name).read_bytes())
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                return f"{name}: not valid JSON ({str(e)[:200]})"
            if not isinstance(data, dict):
                return f"{name}: expected a JSON object, got {json_kind(data)}"
    return None
