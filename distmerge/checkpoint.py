"""A Hugging Face model folder: its layout, config.json, index and the headers of its weights.

A checkpoint is opened by parsing the JSON header of each ``*.safetensors`` file (no tensor
data is touched; see :mod:`distmerge.io.safetensors`) and validating it strictly, so a
truncated or corrupt file is reported before any work starts. Tensor rows are read later, a
span at a time, with :func:`distmerge.io.safetensors.read_rows`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmerge.errors import CheckpointError
from distmerge.io.files import check_inside
from distmerge.io.locations import is_remote
from distmerge.io.model_source import ModelSource, locate_model
from distmerge.io.safetensors import INDEX_NAME, TensorInfo, parse_safetensors_header
from distmerge.io.structured import json_kind, read_json
from distmerge.model_config import check_config_against_tensors

log = logging.getLogger(__name__)

# Every file a Hugging Face tokenizer may consist of: all are copied into the output.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "vocab.txt", "spiece.model",
)
# The subset that makes a tokenizer loadable on its own (special_tokens_map.json, merges.txt or
# a chat template alone do not): whether a folder "has a tokenizer" is decided by these, both
# when AIM calibration loads the base model's tokenizer and when the merge warns that the output
# has none. (AIM once kept a shorter list of its own; it lacked vocab.txt, so a WordPiece-only
# tokenizer folder was refused although AutoTokenizer loads it.)
TOKENIZER_CORE_FILES = tuple(n for n in TOKENIZER_FILES if n.startswith(("tokenizer", "vocab", "spiece")))
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")

# config.json's name for the decoder layer count (GPT-2's is n_layer).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Far above real checkpoints (an index is MBs), far below what would exhaust memory while parsing.
MAX_CONFIG_JSON_BYTES = 4 * 1000**2
MAX_INDEX_BYTES = 64 * 1000**2
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    """A Hugging Face model folder: its config and the headers of all its safetensors files."""

    path: Path  # the folder holding config.json (for a remote model: its small files, fetched)
    config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(repr=False)
    source: ModelSource | None = field(default=None, repr=False)  # set for a remote model

    @classmethod
    def open(cls, path: str | os.PathLike[str], role: str = "model") -> Checkpoint:
        """Open a model (folder, ``s3://`` prefix or Hub id), validating config, index and every header."""
        try:
            source = locate_model(str(path), role, CheckpointError)
            if source.remote:
                return cls._open_remote(source, role)
            return cls._open(source.folder, role)
        except OSError as e:  # a name the system refuses (too long, ...), a folder gone mid-listing
            raise CheckpointError(f"{role} {path}: {e.strerror or e}") from None

    @classmethod
    def _open(cls, folder: Path, role: str) -> Checkpoint:
        if not folder.exists():
            raise CheckpointError(f"{role} {folder}: folder does not exist; check the path in the config")
        if not folder.is_dir():
            raise CheckpointError(f"{role} {folder}: expected a model folder, found a file")
        config_path = folder / "config.json"
        if not config_path.exists():
            raise CheckpointError(
                f"{role} {folder}: no config.json; a Hugging Face model folder needs one "
                "(save the model with save_pretrained)"
            )
        return cls._read(folder, role, _weight_files(folder, role))

    @classmethod
    def _open_remote(cls, source: ModelSource, role: str) -> Checkpoint:
        """A remote model: small files in ``source.folder``, headers read by ranges from the weights."""
        folder, weights = source.folder, source.weights or {}
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{role} {source.reference}: no config.json; a Hugging Face model folder needs one")
        if (folder / INDEX_NAME).is_file():
            names = sorted(set(_read_weight_map(folder).values()))
            missing = [n for n in names if n not in weights]
            if missing:
                raise CheckpointError(f"{source.reference}/{INDEX_NAME}: lists files that do not exist: "
                                      f"{', '.join(missing[:5])}")
        else:
            names = sorted(weights)
        if not names:
            _refuse_without_weights(source.reference, source.names, role)
        return cls._read(folder, role, [weights[n] for n in names], source)

    @classmethod
    def _read(cls, folder: Path, role: str, files: list[Any], source: ModelSource | None = None) -> Checkpoint:
        """Parse config.json and every weight file's header, and check them against each other."""
        config_path = folder / "config.json"
        config = read_json(check_inside(config_path, folder, "config.json", CheckpointError),
                           f"{role}'s config.json", CheckpointError, limit=MAX_CONFIG_JSON_BYTES)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object of settings, got {json_kind(config)}")
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            file_tensors, _ = parse_safetensors_header(file)
            for name, info in file_tensors.items():
                if name in tensors:
                    raise CheckpointError(
                        f"{role} {folder}: tensor {name!r} appears in both {tensors[name].file} and {file}"
                    )
                tensors[name] = info
        index_path = folder / INDEX_NAME
        if index_path.exists():
            _check_index(index_path, _read_weight_map(folder), tensors)
        check_config_against_tensors(config, tensors, config_path)
        return cls(folder, config, tensors, source)

    @property
    def num_layers(self) -> int | None:
        """Decoder layer count from config.json (text_config for multimodal wrappers)."""
        for cfg in (self.config, self.config.get("text_config") or {}):
            for key in LAYER_COUNT_KEYS:
                value = cfg.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        return None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def label(self) -> str:
        """How the config names this input (a LoRA input adds its adapter: ``MODEL+ADAPTER``)."""
        return self.source.reference if self.source is not None else str(self.path)

    def ordered_names(self) -> list[str]:
        """Tensor names in storage order (file, then offset): the order an output follows."""
        return sorted(self.tensors, key=lambda n: (self.tensors[n].file, self.tensors[n].offset))

    def files_read(self) -> list[str]:
        """Every file a merge reads of this input: its weight files and config.json."""
        return sorted({str(t.file) for t in self.tensors.values()} | {str(self.path / "config.json")})

    def file_identity(self, file: str) -> list[Any]:
        """What identifies a file's content without reading it: name, size and mtime (local) or
        version (a remote file's ETag, or the Hub commit it is pinned to)."""
        if is_remote(file) and self.source is not None:
            name = file.rstrip("/").rsplit("/", 1)[-1]
            return [name, *self.source.versions.get(name, (0, ""))]
        st = Path(file).stat()
        return [Path(file).name, st.st_size, st.st_mtime_ns]


def _read_weight_map(folder: Path) -> dict[str, str]:
    """The index's ``weight_map``, checked to be names of files inside ``folder``."""
    index_path = folder / INDEX_NAME
    index = read_json(check_inside(index_path, folder, "the index", CheckpointError), "the index",
                      CheckpointError, limit=MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map object)")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or "\0" in file:
            shown = f"of JSON type {type(file).__name__}" if not isinstance(file, str) else "empty or not a name"
            raise CheckpointError(f"{index_path}: weight_map entry of tensor {name!r} is {shown}; expected a file name")
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {file!r}, a path outside the "
                                  "model folder; refused (an index names files inside its own folder)")
    return weight_map


def _weight_files(folder: Path, role: str) -> list[Path]:
    index_path = folder / INDEX_NAME
    if index_path.exists():
        names = sorted(set(_read_weight_map(folder).values()))
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index_path}: lists files that do not exist: {', '.join(missing[:5])}")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if files:
        for f in files:
            check_inside(f, folder, "weight file", CheckpointError)
        return files
    _refuse_without_weights(str(folder), [p.name for p in folder.iterdir()], role)
    raise AssertionError("unreachable")


def _refuse_without_weights(model: str, names: Any, role: str) -> None:
    """The error for a model without safetensors weights (pickle weights get a conversion hint)."""
    pickles = sorted(n for n in names if Path(n).suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{role} {model}: only pickle weights ({', '.join(pickles)}); distmerge reads safetensors "
            "only, because loading a pickle can run arbitrary code. Convert once with: python -c "
            "\"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{model}').save_pretrained('{model}-st', safe_serialization=True)\""
        )
    raise CheckpointError(f"{role} {model}: no *.safetensors files found")


def _check_index(index_path: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{index_path}: tensor {name!r} is listed in the index but not in {file}")
        if Path(info.file).name != Path(file).name:
            raise CheckpointError(
                f"{index_path}: tensor {name!r} is indexed in {file} but stored in {Path(info.file).name}"
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        log.warning("%s: %d tensors are in the files but not in the index (e.g. %s)", index_path, len(extra), extra[0])
