"""One file written to an object store (``calibrate --out s3://bucket/stats.safetensors``).

Why: the statistics AIM computes are tens of MB, read whole by a later merge's ``aim.stats``,
which may name an ``s3://``/``gs://`` object; writing them there directly spares a copy step
on a cluster without a shared volume. The file is written locally first (in the run's cache,
by the same code as a local ``--out``) and uploaded whole once complete, so the store never
holds a half-written file. As for every output: never an input, inside one or around one, and
an existing object is replaced only when it is a file of the same kind (``accept`` says so).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from distmerge.errors import DistmergeError, OutputError
from distmerge.io.locations import (
    OBJECT_STORE_SCHEMES,
    LocationError,
    parse_remote,
    relation_to,
    url_scheme,
)
from distmerge.io.model_source import cache_root
from distmerge.io.object_stores import object_store


class RemoteFileTarget:
    """``target = RemoteFileTarget(url, inputs, what, accept)``; write ``target.staging``, then ``publish()``."""

    def __init__(self, url: str, inputs: dict[str, Path | str], what: str,
                 accept: Callable[[Path], None]) -> None:
        self.url, self.what = url, what
        if url_scheme(url) not in OBJECT_STORE_SCHEMES:
            raise OutputError(f"{url}: {what} can be written to a local path, s3://bucket/key or gs://bucket/key")
        try:
            where = parse_remote(url)
        except LocationError as e:
            raise OutputError(f"{what} {e}") from None
        if not where.key.strip("/") or url.endswith("/"):
            raise OutputError(f"{url}: names a bucket or a prefix; give the object's full key (…/stats.safetensors)")
        for role, location in inputs.items():
            relation = relation_to(where, location) if isinstance(location, str) else None
            if relation:
                raise OutputError(f"{url}: {what} {relation} {role} {location}; refused, since writing there could "
                                  "destroy an input. Choose a key outside every input")
        self.store = object_store(url)
        folder = cache_root() / "files-out" / hashlib.sha256(url.encode()).hexdigest()[:24]
        folder.mkdir(parents=True, exist_ok=True)
        self.staging = folder / where.name
        self.staging.unlink(missing_ok=True)
        existing = self.store.get_object(url, what, OutputError)
        if existing is not None:
            self.staging.write_bytes(existing.data)
            try:
                accept(self.staging)
            except DistmergeError:
                raise OutputError(f"{url}: exists and is not {what}; refused, since distmerge never overwrites an "
                                  "object it did not write (choose another key)") from None
            finally:
                self.staging.unlink(missing_ok=True)

    def publish(self) -> None:
        """Upload the finished local file whole; the store then holds it complete or not at all."""
        self.store.put_object(self.url, self.staging.read_bytes(), self.what, OutputError)
        self.staging.unlink(missing_ok=True)
