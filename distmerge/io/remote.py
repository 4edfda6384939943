"""What every remote storage shares: span reads as ranged requests, resumed where they break.

A backend (:mod:`~distmerge.io.s3`, :mod:`~distmerge.io.hub`) says how to ask for bytes
``[offset, offset + length)`` of an object as a stream of chunks and how to word its errors;
this module turns that into :class:`~distmerge.io.storage.SpanReader` semantics: the span lands
in the caller's buffer (the rows of a tensor in the tensor's own memory), a stream that breaks
midway is asked for again from the byte where it stopped, and every byte that arrives is
counted, so a test (or a user wondering about egress) can check that a worker fetched only the
ranges its units need.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from distmerge.errors import DistmergeError, OutputError
from distmerge.io.local import span_crc32
from distmerge.io.retry import with_retries

# A read at the start of an object (a safetensors header's length) fetches this much at once:
# the JSON header that follows is then usually served from memory, one round trip instead of two.
HEAD_BYTES = 64 * 1024

_fetched = 0
_fetched_lock = threading.Lock()
_fetched_here = threading.local()  # per thread: the merge's worker threads share one process


# The content version each remote location was planned with (S3: its ETag), in this process:
# reads of a pinned location ask the store for exactly that version (If-Match), so an object
# replaced while a merge runs fails the merge instead of mixing two versions into one output.
_PINNED: dict[str, str] = {}


def pin_versions(pins: Iterable[tuple[str, str]]) -> None:
    """Pin locations to their planned versions (workers: from the job, before reading)."""
    _PINNED.update(pins)


def pinned_version(location: str) -> str | None:
    return _PINNED.get(location)


class SizeCache:
    """Sizes of remote objects this process has asked for, so reading many spans of one file
    costs one HEAD request, not one per span. Bounded; an object's size does not change while
    a merge reads it (a Hub file is pinned to a commit; an S3 object was planned by its ETag)."""

    def __init__(self, limit: int = 4096) -> None:
        self._sizes: dict[str, int] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, location: str, ask: Callable[[], int]) -> int:
        with self._lock:
            if location in self._sizes:
                return self._sizes[location]
        size = ask()
        with self._lock:
            if len(self._sizes) >= self._limit:
                self._sizes.clear()
            self._sizes[location] = size
        return size


class PerSettings:
    """A client made once per process and per value of the environment settings it is made from.

    Clients are thread-safe and costly to make (boto3 parses service models for ~0.1-1 s;
    google-auth may fetch a token), so a worker's prefetch threads (a new one per batch) share
    one; a process whose settings change (a test pointing at another server) gets a new one.
    """

    def __init__(self, settings: tuple[str, ...], make: Callable[[], Any]) -> None:
        self._settings, self._make = settings, make
        self._made: dict[tuple[str | None, ...], Any] = {}
        self._lock = threading.Lock()

    def get(self) -> Any:
        key = tuple(os.environ.get(k) for k in self._settings)
        with self._lock:
            made = self._made.get(key)
            if made is None:
                made = self._made[key] = self._make()
        return made


def fetched_bytes() -> int:
    """Bytes this process has received from remote storage so far (bodies of ranged reads)."""
    return _fetched


def thread_fetched_bytes() -> int:
    """Bytes this thread has received so far: what one read of several running at once fetched."""
    return getattr(_fetched_here, "n", 0)


def _count(n: int) -> None:
    global _fetched
    with _fetched_lock:
        _fetched += n
    _fetched_here.n = thread_fetched_bytes() + n


class RemoteReader:
    """An opened remote object: its size, and spans fetched by ranged requests.

    ``stream(offset, length)`` yields the bytes of the span in order (a backend's one ranged
    request); ``transient(error)`` says whether an error is worth asking again for; ``fail``
    words an error that retries did not cure as the caller's :class:`DistmergeError`.
    """

    def __init__(self, location: str, size: int, stream: Callable[[int, int], Iterator[bytes]],
                 transient: Callable[[BaseException], bool],
                 fail: Callable[[BaseException], DistmergeError]) -> None:
        self.location = location
        self._size = size
        self._stream = stream
        self._transient = transient
        self._fail = fail
        self._head = b""  # the object's first bytes, kept from a read at offset 0

    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        """Fill ``buffer`` from ``offset``; fewer bytes only at the end of the object."""
        want = max(0, min(len(buffer), self._size - offset))
        done = 0

        def rest() -> None:
            nonlocal done
            for chunk in self._stream(offset + done, want - done):
                n = min(len(chunk), want - done)
                buffer[done:done + n] = chunk[:n]
                done += n
                _count(n)
                if done == want:
                    break
            if done < want:
                raise ConnectionError(f"{self.location}: the server ended the body after {done} of {want} bytes")

        if want:
            try:
                with_retries(rest, f"reading {self.location}", self._transient)
            except DistmergeError:
                raise
            except Exception as e:  # noqa: BLE001 - worded by the backend
                raise self._fail(e) from None
        return want

    def read(self, offset: int, length: int) -> bytes:
        """Small reads (headers): the first :data:`HEAD_BYTES` are fetched once and kept."""
        length = max(0, min(length, self._size - offset))
        if offset == 0 and not self._head and length < HEAD_BYTES:
            self._head = bytearray(min(HEAD_BYTES, self._size))
            self.read_into(0, memoryview(self._head))
        if offset + length <= len(self._head):
            return bytes(self._head[offset:offset + length])
        buffer = bytearray(length)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def close(self) -> None:
        pass

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Bytes asked for per request when a span is read through (checksums): requests cost far more than
# their bytes on object stores, so fewer and larger ones (measured: 16 MB ranges made verifying an
# output on the S3 test server 5x slower than 64 MB ranges of the same bytes).
REQUEST_BYTES = 64 * 1024 * 1024


class RemoteStorage:
    """The read half of :class:`~distmerge.io.storage.Storage` for a remote backend.

    Subclasses implement :meth:`open_reader`. Span writes are refused here with a message: an
    object-store output is written as multipart uploads (:mod:`distmerge.output.object_store`),
    never span by span, and the Hub is read-only.
    """

    def open_reader(self, location: Any, what: str, error: type[DistmergeError] = DistmergeError) -> RemoteReader:
        raise NotImplementedError

    def crc32(self, location: Any, offset: int, length: int, what: str,
              error: type[DistmergeError] = DistmergeError,
              on_chunk: Callable[[memoryview], None] | None = None) -> int | None:
        if length < 0:
            return None
        with self.open_reader(location, what, error) as reader:
            return span_crc32(reader, offset, length, on_chunk, REQUEST_BYTES)

    def _no_writes(self, location: Any) -> OutputError:
        return OutputError(f"{location}: remote storage is not written span by span (an object-store output is "
                           "uploaded in parts; the Hub is read-only)")

    def create(self, location: Any, header: bytes, size: int) -> None:
        raise self._no_writes(location)

    def write_at(self, location: Any, offset: int, data: memoryview) -> int:
        raise self._no_writes(location)

    def publish(self, partial: Any, final: Any) -> None:
        raise self._no_writes(final)

    def put(self, location: Any, data: bytes, temporary: Any) -> None:
        raise self._no_writes(location)

    def sync_folder(self, location: Any) -> None:
        raise self._no_writes(location)
