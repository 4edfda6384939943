"""A single remote file (``s3://``/``gs://bucket/key``, ``hf://org/name[@revision]/path``) as a local copy.

Why: AIM statistics and calibration data are whole files read whole (tens of MB), unlike model
weights read by ranges; a config may name them where the models are. The copy is kept in the
cache under a name made of the location and the content version (S3 ETag, Cloud Storage generation, Hub commit), so a
file fetched once is read from disk afterwards, and the file's identity for the merge's
fingerprint is that version, the same on every machine (a local copy's mtime would not be).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.errors import DistmergeError
from distmerge.io.locations import (
    HUB_SCHEME,
    OBJECT_STORE_SCHEMES,
    LocationError,
    parse_remote,
    url_scheme,
)
from distmerge.io.model_source import cache_root

CHUNK = 8 << 20


@dataclass(frozen=True)
class FetchedFile:
    """A local copy of a remote file, and what identifies its content: [name, size, version]."""

    path: Path
    identity: list[Any]


_FETCHED: dict[tuple[str, str], FetchedFile] = {}


def fetch_file(location: str, what: str, error: type[DistmergeError], max_bytes: int) -> FetchedFile:
    """The remote file at ``location`` (at most ``max_bytes``), fetched once per version."""
    key = (location, os.environ.get("DISTMERGE_CACHE", ""))
    if key not in _FETCHED:
        try:
            where = parse_remote(location)
        except LocationError as e:
            raise error(f"{what} {e}") from None
        if not where.key.strip("/"):
            raise error(f"{what} {location}: names a bucket or repository, not a file")
        scheme = url_scheme(location)
        if scheme == HUB_SCHEME:
            _FETCHED[key] = _hub_file(where, what, error)
        elif scheme in OBJECT_STORE_SCHEMES:
            _FETCHED[key] = _object_store_file(location, what, error, max_bytes)
        else:
            raise error(f"{what} {location}: {scheme}:// is not a place distmerge reads files from (yet); "
                        "use a local path, s3:// or gs://bucket/key or hf://org/name/path")
    return _FETCHED[key]


def _object_store_file(location: str, what: str, error: type[DistmergeError], max_bytes: int) -> FetchedFile:
    from distmerge.io.object_stores import object_store

    store = object_store(location)
    stat = store.stat(location, what, error)
    if stat.size > max_bytes:
        raise error(f"{what} {location}: {stat.size} bytes, more than the {max_bytes} such a file may have; refused")
    name = location.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha256(f"{location}\n{stat.version}".encode()).hexdigest()[:24]
    target = cache_root() / "files" / digest / name
    if not (target.is_file() and target.stat().st_size == stat.size):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with store.reader.open_reader(location, what, error) as reader, open(partial, "wb") as out:
            buffer = bytearray(CHUNK)
            for offset in range(0, stat.size, CHUNK):
                n = reader.read_into(offset, memoryview(buffer)[:min(CHUNK, stat.size - offset)])
                out.write(memoryview(buffer)[:n])
        os.replace(partial, target)
    return FetchedFile(target, [name, stat.size, stat.version])


def _hub_file(where: Any, what: str, error: type[DistmergeError]) -> FetchedFile:
    from distmerge.io import hub

    repo = type(where)(HUB_SCHEME, where.container, "", where.revision)
    commit, files = hub.resolve(repo, what, error)
    path = where.key.strip("/")
    if path not in files:
        raise error(f"{what} {where}: the repository has no file {path!r} at {commit[:12]}")
    local = hub.download(repo, commit, path, what, error)
    return FetchedFile(local, [path.rsplit("/", 1)[-1], local.stat().st_size, commit])
