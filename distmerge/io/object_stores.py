"""The operations distmerge needs from an object store, one set per scheme (``s3://``, ``gs://``).

Why one seam: the output written in parts, its lock, the journal's copy, model folders read as
prefixes and single remote files all need the same dozen requests, which S3 and Cloud Storage
both offer with the same meaning (Cloud Storage's XML API speaks S3's multipart protocol; its
conditional writes use generation numbers where S3 uses ETags). The callers ask
:func:`object_store` for the store of a location and never branch on the scheme themselves.

A ``version`` is opaque to callers: S3's ETag, Cloud Storage's generation number. It is what a
conditional write or read compares, and what a fingerprint records for an input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distmerge.errors import DistmergeError
from distmerge.io.locations import url_scheme


@dataclass(frozen=True)
class ObjectStat:
    """What identifies an object's content without reading it: its size and version."""

    size: int
    version: str


@dataclass(frozen=True)
class StoredObject:
    """A small object read whole: its bytes, its version, and its age by the server's own clock."""

    data: bytes
    etag: str
    age_s: float


@dataclass(frozen=True)
class ObjectStore:
    """One store's requests; see :mod:`distmerge.io.s3`/:mod:`~distmerge.io.s3_writes` for their contracts.

    ``name`` words the store in messages ("S3", "Cloud Storage"); ``reader`` is its
    :class:`~distmerge.io.remote.RemoteStorage` (ranged reads of objects).
    """

    name: str
    reader: Any
    stat: Callable[..., ObjectStat]
    list_folder: Callable[..., dict[str, ObjectStat]]
    put_object: Callable[..., str | None]
    get_object: Callable[..., StoredObject | None]
    delete_object: Callable[..., bool]
    create_upload: Callable[..., str]
    upload_part: Callable[..., str]
    uploaded_parts: Callable[..., dict[int, str] | None]
    complete_upload: Callable[..., None]
    abort_upload: Callable[..., None]
    open_uploads: Callable[..., list[tuple[str, str]]]


_STORES: dict[str, ObjectStore] = {}


def _made(scheme: str) -> ObjectStore:
    if scheme == "s3":
        from distmerge.io import s3 as reads
        from distmerge.io import s3_writes as writes

        name, reader = "S3", reads.S3
    else:
        from distmerge.io import gcs as reads  # type: ignore[no-redef]
        from distmerge.io import gcs_writes as writes  # type: ignore[no-redef]

        name, reader = "Cloud Storage", reads.GCS
    return ObjectStore(name, reader, reads.stat, reads.list_folder, writes.put_object, writes.get_object,
                       writes.delete_object, writes.create_upload, writes.upload_part, writes.uploaded_parts,
                       writes.complete_upload, writes.abort_upload, writes.open_uploads)


def object_store(location: str) -> ObjectStore:
    """The store that holds ``location`` (``s3://...`` or ``gs://...``)."""
    scheme = url_scheme(location) or ""
    if scheme not in ("s3", "gs"):
        raise DistmergeError(f"{location}: not an object-store location (s3://bucket/key or gs://bucket/key)")
    if scheme not in _STORES:
        _STORES[scheme] = _made(scheme)
    return _STORES[scheme]
