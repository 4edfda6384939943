"""What a location string names: a local path, an object-store URL, or a Hugging Face Hub file.

Why one parser: a config names models as mergekit does (a folder, or a Hub id ``org/name`` with
an optional ``@revision``), and users keep checkpoints in object storage (``s3://bucket/prefix``,
``gs://bucket/prefix``). Every layer that must tell these apart (the storage that serves a
location, the planner that opens a model, the output check) asks here, so a string means the
same thing everywhere. Pure functions: nothing is read or contacted.

Inside distmerge a file in a Hub repository is written ``hf://org/name@<commit>/path``: pinned
to the commit the planner resolved, so every worker reads the same bytes even if the branch
moves during the merge.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

OBJECT_STORE_SCHEMES = ("s3", "gs")
HUB_SCHEME = "hf"
REMOTE_SCHEMES = (*OBJECT_STORE_SCHEMES, HUB_SCHEME)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
# The Hub's rules for a repository id: one ``/``, names of letters, digits, ``-``, ``_``, ``.``.
_HUB_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^({_HUB_NAME}/{_HUB_NAME})(?:@([^@/\s][^@\s]*))?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")


class LocationError(ValueError):
    """A string that looks like a URL but is not one distmerge can use (message says why)."""


@dataclass(frozen=True)
class RemoteLocation:
    """A parsed remote location.

    ``container`` is the bucket (object stores) or the repository id (Hub); ``key`` the object
    key or the path inside the repository ('' for the root); ``revision`` the Hub revision.
    """

    scheme: str
    container: str
    key: str = ""
    revision: str | None = None

    def child(self, name: str) -> RemoteLocation:
        """The location of ``name`` inside this one (a file of a model folder)."""
        key = f"{self.key.rstrip('/')}/{name}" if self.key.strip("/") else name
        return RemoteLocation(self.scheme, self.container, key, self.revision)

    @property
    def name(self) -> str:
        """The last part of the key: a file's name."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        key = f"/{self.key}" if self.key else ""
        return f"{self.scheme}://{self.container}{at}{key}"


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redacted(url: str) -> str:
    """``url`` without a ``user:password@`` part, for messages (credentials are never shown)."""
    return _USERINFO.sub(r"\1***@", url)


def url_scheme(location: object) -> str | None:
    """The scheme of a URL-shaped string (``s3`` of ``s3://b/k``); None for a plain path."""
    if not isinstance(location, str):
        return None
    match = _URL.match(location)
    return match.group(1).lower() if match else None


def parse_remote(location: str) -> RemoteLocation:
    """Parse ``s3://bucket/key``, ``gs://bucket/key`` or ``hf://org/name[@revision][/path]``."""
    scheme = url_scheme(location)
    if scheme in OBJECT_STORE_SCHEMES and _USERINFO.match(location):
        raise LocationError(f"{redacted(location)}: credentials in the URL are refused (they would end up in "
                            "logs and reports); give them where the storage library reads them (environment, profile)")
    if scheme not in REMOTE_SCHEMES:
        shown = f"{scheme}://" if scheme else "a plain path"
        raise LocationError(f"{location}: {shown} is not a remote location distmerge reads "
                            f"(use {', '.join(s + '://' for s in REMOTE_SCHEMES)} or a local path)")
    rest = _URL.match(location).group(2)  # type: ignore[union-attr]
    if scheme == HUB_SCHEME:
        parts = rest.split("/", 2)
        if len(parts) < 2:
            raise LocationError(f"{location}: expected hf://org/name[@revision][/path]")
        repo_and_rev = f"{parts[0]}/{parts[1]}"
        match = _HUB_ID.match(repo_and_rev)
        if not match:
            raise LocationError(f"{location}: {repo_and_rev!r} is not a Hub repository id (org/name[@revision])")
        return RemoteLocation(scheme, match.group(1), parts[2] if len(parts) > 2 else "", match.group(2))
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise LocationError(f"{location}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, "
                            "'-', '.', '_'; s3://BUCKET/PREFIX)")
    if "//" in key or key.startswith("/") or any(p in (".", "..") for p in key.split("/")):
        raise LocationError(f"{location}: the key {key!r} has an empty, '.' or '..' part; write the plain key")
    return RemoteLocation(scheme, bucket, key)


def is_remote(location: object) -> bool:
    """True for ``s3://``, ``gs://`` and ``hf://`` strings."""
    return url_scheme(location) in REMOTE_SCHEMES


def hub_reference(reference: str) -> RemoteLocation | None:
    """The Hub repository a config's model reference names, or None for anything else.

    mergekit's rule, kept: an existing local path always wins, so a folder ``org/name`` in the
    working directory is read as a folder. Otherwise ``org/name`` or ``org/name@revision`` (and
    the explicit ``hf://org/name@revision``) name a Hub repository.
    """
    if url_scheme(reference) == HUB_SCHEME:
        parsed = parse_remote(reference)
        if parsed.key:
            raise LocationError(f"{reference}: a model is a whole repository (hf://org/name[@revision]); "
                                "subfolders are not supported")
        return parsed
    if url_scheme(reference) is not None or os.path.exists(reference):
        return None
    match = _HUB_ID.match(reference)
    if not match or reference.startswith((".", "/", "~")):
        return None
    return RemoteLocation(HUB_SCHEME, match.group(1), "", match.group(2))


def relation_to(out: RemoteLocation, other: str) -> str | None:
    """How the remote output ``out`` lies to the location ``other``: "is", "is inside" or
    "contains" it, or None when they are apart (another scheme, bucket or prefix; a local path)."""
    if url_scheme(other) != out.scheme:
        return None
    where = parse_remote(other)
    if where.container != out.container:
        return None
    mine, theirs = out.key.strip("/"), where.key.strip("/")
    if mine == theirs:
        return "is"
    if not theirs or mine.startswith(theirs + "/"):
        return "is inside"
    if not mine or theirs.startswith(mine + "/"):
        return "contains"
    return None
