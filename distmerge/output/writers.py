"""Where a worker's merged rows go: into local files at their offsets, or into a part it uploads.

The engine's worker asks its job's writer for a :class:`BatchSink` per batch and writes every
merged block through it; it never knows which kind of output it writes. Both writers are small
picklable values shipped once per merge with the job.

- :class:`LocalFiles`: each block is written at its byte offset of the file created at its full
  size under its partial name (any worker, any order).
- :class:`PartUploads`: the batch is one part of an object-store upload
  (:mod:`distmerge.output.parts`); its blocks are gathered in a buffer of the part's size (with
  the header when it is the file's first part) and the part is uploaded when the batch is done.
  A worker holds one part at a time, never a file.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from distmerge.errors import OutputError
from distmerge.io.safetensors import write_rows
from distmerge.plan import TensorPlan, WorkUnit

_MD5 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class UploadedPart:
    """A part a worker uploaded: for the journal and for completing its file."""

    file: int
    upload_id: str
    number: int
    etag: str
    nbytes: int


class BatchSink(Protocol):
    def write(self, file: int, offset: int, rows: torch.Tensor) -> int:
        """Write merged rows at byte ``offset`` of output file ``file``; returns the bytes."""
        ...

    def close(self) -> list[UploadedPart]:
        """Finish the batch; the parts it uploaded (none for local files)."""
        ...


class _LocalSink:
    def __init__(self, paths: tuple[str, ...]) -> None:
        self._paths = paths

    def write(self, file: int, offset: int, rows: torch.Tensor) -> int:
        return write_rows(self._paths[file], offset, rows)

    def close(self) -> list[UploadedPart]:
        return []


@dataclass(frozen=True)
class LocalFiles:
    """Output files on a file system every worker sees, by their partial (in-progress) paths."""

    paths: tuple[str, ...]

    def open_batch(self, units: list[WorkUnit], tensors: tuple[TensorPlan, ...]) -> BatchSink:
        return _LocalSink(self.paths)


@dataclass(frozen=True)
class PartUploads:
    """Output files assembled by multipart uploads; a batch is exactly one planned part.

    ``starts[f]`` are the first bytes of file ``f``'s parts (part ``k`` starts at
    ``starts[f][k - 1]``) and ``sizes[f]`` the file's size; ``headers[f]`` its header bytes.
    """

    locations: tuple[str, ...]
    upload_ids: tuple[str, ...]
    starts: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    headers: tuple[bytes, ...]

    def open_batch(self, units: list[WorkUnit], tensors: tuple[TensorPlan, ...]) -> BatchSink:
        t = tensors[units[0].tensor]
        file = t.file_index
        offset, _ = t.out_span(units[0].row_start, units[0].row_end)
        k = bisect.bisect_right(self.starts[file], offset) - 1
        starts = self.starts[file]
        end = starts[k + 1] if k + 1 < len(starts) else self.sizes[file]
        return _PartSink(self, file, k + 1, starts[k], end)


class _PartSink:
    def __init__(self, uploads: PartUploads, file: int, number: int, start: int, end: int) -> None:
        self._uploads, self._file, self._number, self._start = uploads, file, number, start
        self._buffer = np.zeros(end - start, dtype=np.uint8)
        self._filled = 0
        if start == 0:
            header = uploads.headers[file]
            self._buffer[:len(header)] = np.frombuffer(header, dtype=np.uint8)
            self._filled = len(header)

    def write(self, file: int, offset: int, rows: torch.Tensor) -> int:
        data = rows.contiguous().reshape(-1).view(torch.uint8).numpy()
        at = offset - self._start
        if file != self._file or at < 0 or at + data.size > self._buffer.size:
            raise AssertionError(f"rows at byte {offset} of file {file} fall outside part {self._number} "
                                 f"of file {self._file}")
        self._buffer[at:at + data.size] = data
        self._filled += data.size
        return int(data.size)

    def close(self) -> list[UploadedPart]:
        from distmerge.io.object_stores import object_store

        location = self._uploads.locations[self._file]
        if self._filled != self._buffer.size:
            raise OutputError(f"{location}: part {self._number} got {self._filled} of its {self._buffer.size} "
                              "bytes; not uploaded")
        upload_id = self._uploads.upload_ids[self._file]
        data = self._buffer.tobytes()
        digest = hashlib.md5(data).digest()  # noqa: S324 - the stores' own scheme; computed once per part
        etag = object_store(location).upload_part(location, upload_id, self._number, data, "an output file part",
                                                  md5=digest)
        plain = etag.strip('"')
        # A store that does not encrypt with its own keys names a part by the MD5 of its bytes.
        if _MD5.fullmatch(plain) and plain != digest.hex():
            raise OutputError(f"{location}: the store answered part {self._number} with ETag {plain}, not the MD5 of "
                              "the bytes sent; the part was damaged on its way (rerun to resume)")
        size = int(self._buffer.size)
        self._buffer = np.zeros(0, dtype=np.uint8)
        return [UploadedPart(self._file, upload_id, self._number, etag, size)]
