"""Reading Hugging Face checkpoints: folder layout, safetensors headers and row-range reads.

This is the only place that reads model weights. A checkpoint is opened by parsing the JSON
header of each ``*.safetensors`` file (no tensor data is touched) and validating it strictly,
so a truncated or corrupt file is reported before any work starts. Tensors are then read a row
range at a time with ``pread``: the rows ``[r0, r1)`` of a C-contiguous tensor are one
contiguous byte range, so a reader touches only the pages it needs and never maps the file.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distmerge.dtypes import ITEMSIZE, SAFETENSORS_TO_TORCH
from distmerge.errors import CheckpointError
from distmerge.io.files import check_inside, open_regular, pread_all
from distmerge.io.structured import parse_json, read_json
from distmerge.model_config import check_config_against_tensors

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
# Far above real checkpoints (a shard's header is KBs, an index MBs), far below what would
# exhaust memory while parsing. Shapes: no real tensor has more than 8 dimensions or one
# dimension above 2^40 elements, and bounding both keeps every size computed from them cheap.
MAX_HEADER_BYTES = 16 * 1000**2
MAX_CONFIG_JSON_BYTES = 4 * 1000**2
MAX_INDEX_BYTES = 64 * 1000**2
MAX_DIMS = 8
MAX_DIM = 1 << 40
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class RowShape:
    """Row geometry of anything with a ``shape``: work is cut along the first dimension."""

    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Rows along the first dimension; a 0-d tensor counts as one row."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorInfo(RowShape):
    """Where one tensor lives: file, absolute byte offset of its data, dtype code and shape."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns tensors by name and the metadata.

    Checks what a corrupt or truncated file breaks: the header length, the JSON, each entry's
    dtype, shape and offsets (consistent with shape x dtype, in bounds, contiguous and
    non-overlapping) and that the data section ends exactly at the end of the file.
    """
    fd = open_regular(path, "the safetensors file", CheckpointError)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header (truncated?)")
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            # The length is not echoed: it is the file's first 8 bytes, whatever the file is.
            raise CheckpointError(
                f"{path}: its first 8 bytes are not a header length that fits a {size}-byte file "
                "(truncated or not a safetensors file)"
            )
        raw = pread_all(fd, header_len, 8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) != header_len:
        raise CheckpointError(f"{path}: file ended inside its header (truncated while in use?)")
    header = parse_json(raw, f"{path}: header", CheckpointError, max_depth=None)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ is not an object of strings; the file is corrupt")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object; the file is corrupt")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_TO_TORCH:
            shown = repr(dtype) if isinstance(dtype, str) else f"of JSON type {type(dtype).__name__}"
            raise CheckpointError(
                f"{where}: unknown dtype {shown[:80]}; known: {', '.join(SAFETENSORS_TO_TORCH)}"
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape
        ):
            shown = repr(shape)[:80] if isinstance(shape, list) and len(shape) <= MAX_DIMS else "(too long to show)"
            raise CheckpointError(f"{where}: shape {shown} is not a list of at most {MAX_DIMS} non-negative "
                                  f"integers of at most {MAX_DIM}; the file is corrupt")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if begin < 0 or end < begin or end - begin != expected:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} "
                f"x {dtype} needs {expected}; the file is corrupt"
            )
        if end > data_len:
            raise CheckpointError(
                f"{where}: data ends at byte {data_start + end} but the file has {size} bytes "
                "(truncated download or copy? re-fetch the file)"
            )
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, str(path), dtype, tuple(shape), data_start + begin, expected)
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at {begin}, which {what} (expected {position}); "
                "offsets are out of order or overlapping, the file is corrupt"
            )
        position = end
    if position != data_len:
        raise CheckpointError(
            f"{path}: tensors cover {position} data bytes but the file holds {data_len}; "
            "the file is truncated or has trailing garbage"
        )
    return tensors, {str(k): v for k, v in metadata.items()}



@dataclass
class Checkpoint:
    """A Hugging Face model folder: its config and the headers of all its safetensors files."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], role: str = "model") -> Checkpoint:
        """Open a model folder, validating layout, config.json, index and every header."""
        try:
            return cls._open(Path(path), role)
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
        config = read_json(check_inside(config_path, folder, "config.json", CheckpointError),
                           f"{role}'s config.json", CheckpointError, limit=MAX_CONFIG_JSON_BYTES)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object of settings, got a {type(config).__name__}")
        files = _weight_files(folder, role)
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
        return cls(folder, config, tensors)

    @property
    def num_layers(self) -> int | None:
        """Decoder layer count from config.json (text_config for multimodal wrappers)."""
        for cfg in (self.config, self.config.get("text_config") or {}):
            value = cfg.get("num_hidden_layers")
            if isinstance(value, int):
                return value
        return None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


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
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{role} {folder}: only pickle weights ({', '.join(pickles)}); distmerge reads safetensors "
            "only, because loading a pickle can run arbitrary code. Convert once with: python -c "
            "\"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{folder}').save_pretrained('{folder}-st', safe_serialization=True)\""
        )
    raise CheckpointError(f"{role} {folder}: no *.safetensors files found")


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


def read_rows(info: TensorInfo, row_start: int, row_end: int) -> torch.Tensor:
    """Read rows ``[row_start, row_end)`` of a tensor (whole tensor for 0-d) with one pread.

    Returns a tensor of the stored dtype and shape ``(row_end - row_start, *shape[1:])``.
    """
    if not info.shape:
        row_start, row_end = 0, 1
    row_bytes = info.row_numel * ITEMSIZE[info.dtype]
    nbytes = (row_end - row_start) * row_bytes
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        view = memoryview(buffer.numpy())
        fd = open_regular(info.file, f"the file of tensor {info.name!r}", CheckpointError)
        try:
            done = 0
            start = info.offset + row_start * row_bytes
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], start + done)
                if got <= 0:
                    raise CheckpointError(
                        f"{info.file}: tensor {info.name!r}: file ended while reading rows "
                        f"{row_start}:{row_end} (truncated while in use?)"
                    )
                done += got
        except OSError as e:
            raise CheckpointError(f"{info.file}: tensor {info.name!r}: reading rows {row_start}:{row_end} "
                                  f"failed ({e.strerror}); was the file changed during the merge?") from None
        finally:
            os.close(fd)
    tensor = buffer.view(SAFETENSORS_TO_TORCH[info.dtype])
    return tensor.reshape((row_end - row_start, *info.shape[1:])) if info.shape else tensor.reshape(())
