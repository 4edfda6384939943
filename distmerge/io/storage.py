"""Where bytes live: the one interface every read and write of tensor data goes through.

Why an interface of byte spans, not of paths: a merge reads rows ``[r0, r1)`` of a tensor, which
is one contiguous span of a safetensors file, and writes the merged rows as one span of an output
file created at its final size. Those are exactly the operations object stores offer (an HTTP
range request reads a span; a multipart upload writes parts), so a remote backend (``s3://``,
``gs://``, a Hugging Face Hub repository) plugs in here by implementing :class:`Storage` and
being returned by :func:`storage_for`; nothing above this package changes.

Backends: local files (:mod:`~distmerge.io.local`), S3 (:mod:`~distmerge.io.s3`), Cloud Storage
(:mod:`~distmerge.io.gcs`) and Hugging Face Hub repositories (:mod:`~distmerge.io.hub`), chosen by the location's scheme
(:mod:`~distmerge.io.locations`); any other URL is refused with a message instead of being
treated as a local folder named ``az:``. Remote backends read here; an object-store output is
written as multipart uploads by :mod:`distmerge.output.object_store` (parts whose bytes are
not known until a whole group of units is merged do not fit ``write_at``).

Errors: opening a location raises ``error`` (the caller's :class:`DistmergeError` subclass) with
a message naming ``what`` is read; a read that fails midway raises ``OSError`` for the caller to
word, as today; a write raises :class:`~distmerge.errors.OutputError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from distmerge.errors import DistmergeError
from distmerge.io.local import LOCAL
from distmerge.io.locations import HUB_SCHEME, OBJECT_STORE_SCHEMES, url_scheme

Location = str | os.PathLike[str]


class SpanReader(Protocol):
    """An opened location: its size, and spans read into the caller's memory."""

    location: str

    def size(self) -> int:
        """Bytes the location holds."""
        ...

    def read_into(self, offset: int, buffer: memoryview) -> int:
        """Fill ``buffer`` with the bytes at ``offset``; returns how many (fewer only at the end)."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer only at the end): for headers, not tensor data."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> SpanReader: ...

    def __exit__(self, *exc: object) -> None: ...


class Storage(Protocol):
    """Ranged reads and writes of byte spans, and the life of an output file.

    An output file is created at its full size with its header (:meth:`create`) under a
    temporary location, written span by span by any worker in any order (:meth:`write_at`),
    then made durable and given its final location (:meth:`publish`).
    """

    def open_reader(self, location: Location, what: str,
                    error: type[DistmergeError] = DistmergeError) -> SpanReader:
        """Open ``location`` for span reads; ``error`` (naming ``what``) if it cannot be."""
        ...

    def crc32(self, location: Location, offset: int, length: int, what: str,
              error: type[DistmergeError] = DistmergeError,
              on_chunk: Callable[[memoryview], None] | None = None) -> int | None:
        """CRC-32 of ``length`` bytes at ``offset``; None when the location holds fewer.

        ``on_chunk`` sees every chunk as it is read (valid only during the call), so a second
        pass over the same bytes (counting NaN/Inf) costs no second read.
        """
        ...

    def create(self, location: Location, header: bytes, size: int) -> None:
        """Create ``location`` at ``size`` bytes with ``header`` at its start, space reserved."""
        ...

    def write_at(self, location: Location, offset: int, data: memoryview) -> int:
        """Write ``data`` at ``offset`` of a created location; returns the bytes written."""
        ...

    def publish(self, partial: Location, final: Location) -> None:
        """Make a fully written file durable and move it to its final location."""
        ...

    def put(self, location: Location, data: bytes, temporary: Location) -> None:
        """Write a small whole file atomically (staged at ``temporary`` where that is needed)."""
        ...

    def sync_folder(self, location: Location) -> None:
        """Make the names published in a folder durable (a no-op where that is not a concept)."""
        ...


def storage_for(location: Location) -> Storage:
    """The storage that serves ``location``: S3, the Hub, or local files for a plain path."""
    scheme = url_scheme(location)
    if scheme is None:
        return LOCAL
    if scheme in OBJECT_STORE_SCHEMES:
        from distmerge.io.object_stores import object_store

        return object_store(str(location)).reader  # type: ignore[no-any-return]
    if scheme == HUB_SCHEME:
        from distmerge.io.hub import HUB

        return HUB  # type: ignore[return-value]
    raise DistmergeError(f"{location}: {scheme}:// storage is not supported (yet); use a local path, "
                         "s3:// or gs://bucket/prefix or a Hugging Face Hub id")
