"""The safetensors format in one place: headers read and written, row spans, the index file.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``data_offsets``, then the tensors' bytes back to back. The rows ``[r0, r1)``
of a C-contiguous tensor are one contiguous byte span (:meth:`RowShape.rows_span`), so a reader
touches only the pages it needs and never maps the file, and a writer can place merged rows at
their final offset without holding the whole tensor. Headers from inputs are validated strictly
(a truncated or corrupt file is reported before any work starts); headers of outputs are
computed from names, shapes and dtypes alone (:func:`encode_header`). All bytes go through
:mod:`distmerge.io.storage`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distmerge.dtypes import ITEMSIZE, SAFETENSORS_TO_TORCH
from distmerge.errors import CheckpointError
from distmerge.io.storage import Location, storage_for
from distmerge.io.structured import parse_json
from distmerge.io.writes import write_text_atomic

INDEX_NAME = "model.safetensors.index.json"
# Far above real checkpoints (a shard's header is KBs), far below what would exhaust memory
# while parsing. Shapes: no real tensor has more than 8 dimensions or one dimension above 2^40
# elements, and bounding both keeps every size computed from them cheap.
MAX_HEADER_BYTES = 16 * 1000**2
MAX_DIMS = 8
MAX_DIM = 1 << 40


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a whole tensor of ``shape`` stored as the safetensors ``dtype``."""
    return math.prod(shape) * ITEMSIZE[dtype]


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

    def row_nbytes(self, dtype: str) -> int:
        """Bytes of one row stored as ``dtype``."""
        return self.row_numel * ITEMSIZE[dtype]

    def rows_span(self, dtype: str, data_offset: int, row_start: int, row_end: int) -> tuple[int, int]:
        """``(offset, length)`` of rows ``[row_start, row_end)`` of this tensor stored as
        ``dtype`` from byte ``data_offset`` of its file: the one place row bytes are computed."""
        row = self.row_nbytes(dtype)
        return data_offset + row_start * row, (row_end - row_start) * row


@dataclass(frozen=True)
class TensorInfo(RowShape):
    """Where one tensor lives: file, absolute byte offset of its data, dtype code and shape."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def span(self, row_start: int, row_end: int) -> tuple[int, int]:
        """``(offset, length)`` in :attr:`file` of rows ``[row_start, row_end)``."""
        return self.rows_span(self.dtype, self.offset, row_start, row_end)


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns tensors by name and the metadata.

    Checks what a corrupt or truncated file breaks: the header length, the JSON, each entry's
    dtype, shape and offsets (consistent with shape x dtype, in bounds, contiguous and
    non-overlapping) and that the data section ends exactly at the end of the file.
    """
    with storage_for(path).open_reader(path, "the safetensors file", CheckpointError) as reader:
        try:
            size = reader.size()
            head = reader.read(0, 8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header (truncated?)")
            header_len = int.from_bytes(head, "little")
            if header_len <= 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                # The length is not echoed: it is the file's first 8 bytes, whatever the file is.
                raise CheckpointError(
                    f"{path}: its first 8 bytes are not a header length that fits a {size}-byte file "
                    "(truncated or not a safetensors file)"
                )
            raw = reader.read(8, header_len)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the safetensors header ({e.strerror})") from None
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
        begin, end = _check_entry(path, name, entry, data_start, data_len, size)
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, str(path), entry["dtype"], tuple(entry["shape"]), data_start + begin,
                                   end - begin)
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


def _check_entry(path: Path, name: str, entry: Any, data_start: int, data_len: int, size: int) -> tuple[int, int]:
    """One header entry's dtype, shape and data offsets, checked; returns the offsets."""
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
    expected = tensor_nbytes(dtype, shape)
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
    return begin, end


def encode_header(tensors: Iterable[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int], int]:
    """The header of a file holding ``(name, dtype, shape)`` tensors back to back, in order.

    Returns the header bytes (length prefix included, JSON padded with spaces to a multiple of
    8 so the data is aligned), each tensor's absolute data offset and the file's total size.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    starts: dict[str, int] = {}
    begin = 0
    for name, dtype, shape in tensors:
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
        starts[name] = begin
        begin += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, {n: data_start + b for n, b in starts.items()}, data_start + begin


def read_rows(info: TensorInfo, row_start: int, row_end: int) -> torch.Tensor:
    """Read rows ``[row_start, row_end)`` of a tensor (whole tensor for 0-d) in one span read.

    Returns a tensor of the stored dtype and shape ``(row_end - row_start, *shape[1:])``; the
    bytes land directly in its memory.
    """
    if not info.shape:
        row_start, row_end = 0, 1
    offset, nbytes = info.span(row_start, row_end)
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        reader = storage_for(info.file).open_reader(info.file, f"the file of tensor {info.name!r}", CheckpointError)
        try:
            got = reader.read_into(offset, memoryview(buffer.numpy()))
        except OSError as e:
            raise CheckpointError(f"{info.file}: tensor {info.name!r}: reading rows {row_start}:{row_end} "
                                  f"failed ({e.strerror}); was the file changed during the merge?") from None
        finally:
            reader.close()
        if got < nbytes:
            raise CheckpointError(
                f"{info.file}: tensor {info.name!r}: file ended while reading rows "
                f"{row_start}:{row_end} (truncated while in use?)"
            )
    tensor = buffer.view(SAFETENSORS_TO_TORCH[info.dtype])
    return tensor.reshape((row_end - row_start, *info.shape[1:])) if info.shape else tensor.reshape(())


def read_row_set(info: TensorInfo, rows: Sequence[int],
                 read: Callable[[Any, int, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Rows ``rows`` (any order, repeats allowed) of a 1-D-or-more tensor, stored dtype: one span
    read per run of consecutive rows, so a permuted vocabulary reads about what it needs.
    ``read(info, r0, r1)`` reads a run (default :func:`read_rows`; a LoRA source adapts it)."""
    read = read or read_rows
    order = sorted(set(int(r) for r in rows))
    if any(r < 0 or r >= info.shape[0] for r in order[:1] + order[-1:]):
        raise CheckpointError(f"{info.file}: tensor {info.name!r}: rows {order[0]}..{order[-1]} asked for, "
                              f"it has {info.shape[0]}")
    parts, where = [], {}
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and order[end + 1] == order[end] + 1:
            end += 1
        parts.append(read(info, order[start], order[end] + 1))
        for k in range(start, end + 1):
            where[order[k]] = k
        start = end + 1
    gathered = torch.cat(parts) if parts else torch.empty((0, *info.shape[1:]), dtype=SAFETENSORS_TO_TORCH[info.dtype])
    return gathered[torch.tensor([where[int(r)] for r in rows], dtype=torch.long)]


def write_rows(location: Location, offset: int, rows: torch.Tensor) -> int:
    """Write a tensor's bytes (C order) at byte ``offset`` of a created output file; returns
    the bytes written. The offset comes from :meth:`RowShape.rows_span`."""
    data = rows.contiguous().reshape(-1).view(torch.uint8).numpy()
    return storage_for(location).write_at(location, offset, memoryview(data))


def write_index(out_dir: Path, files: Iterable[tuple[str, tuple[str, ...], int]], total_size: int,
                metadata: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors.index.json`` (last: it marks the checkpoint complete)."""
    weight_map = {t: name for name, tensors, _ in files for t in tensors}
    index = {"metadata": {"total_size": total_size, **(metadata or {})}, "weight_map": dict(sorted(weight_map.items()))}
    write_text_atomic(out_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    storage_for(out_dir).sync_folder(out_dir)
