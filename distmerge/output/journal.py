"""The merge journal: what is done, with checksums, so any crash costs only unfinished work.

``distmerge_journal.jsonl`` in the output directory starts with a header that fingerprints
the merge (config, every input's headers, sizes and modification times, AIM statistics), then
gets one line per completed unit (tensor, rows, CRC-32 of its output bytes), one per finalized
file and a last ``complete`` line. A rerun reads it, re-verifies each journaled unit against the
bytes on disk and redoes only what does not verify; a journal of another merge is refused with
a message saying what differs. A torn last line (a crash mid-append) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distmerge import __version__
from distmerge.errors import OutputError
from distmerge.io.files import read_limited
from distmerge.io.storage import storage_for

log = logging.getLogger(__name__)

JOURNAL_NAME = "distmerge_journal.jsonl"
FORMAT_VERSION = 1
FSYNC_INTERVAL_S = 1.0
MAX_JOURNAL_BYTES = 1 << 30


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _file_identity(path: Path | list[Any]) -> list[Any]:
    """A local file's name, size and mtime; a remote file comes with its identity already."""
    if isinstance(path, list):
        return path
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def merge_fingerprint(config: dict[str, Any], inputs: list[tuple[str, Any]],
                      extra_files: dict[str, Path | list[Any]]) -> dict[str, Any]:
    """Fingerprint parts: the config (less settings that do not change the output bytes), each
    input (its tensor headers and its files' sizes and modification times) and extra files
    such as AIM statistics. Hashing headers and file identities instead of hundreds of GB of
    weights keeps this instant; a replaced or re-saved input changes its size or mtime.
    """
    parts = {
        "config": _digest({"config": config, "version": __version__.rsplit(".", 1)[0]}),
        "inputs": {name: _digest(data) for name, data in inputs},
        "files": {name: _digest(_file_identity(p)) for name, p in sorted(extra_files.items())},
    }
    parts["fingerprint"] = _digest(parts)[:16]
    return parts


def describe_difference(old: dict[str, Any], new: dict[str, Any], old_config: dict[str, Any], new_config: dict[str, Any]) -> str:
    """A sentence saying what differs between two fingerprints (for refusing a journal)."""
    reasons = []
    if old.get("config") != new.get("config"):
        changed = sorted(k for k in set(old_config) | set(new_config) if old_config.get(k) != new_config.get(k))
        reasons.append(f"the config differs ({', '.join(changed) or 'distmerge version'})")
    for name in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        if name not in old.get("inputs", {}):
            reasons.append(f"input {name} is new")
        elif name not in new.get("inputs", {}):
            reasons.append(f"input {name} is no longer used")
        elif old["inputs"][name] != new["inputs"][name]:
            reasons.append(f"input {name} changed (tensor headers, file sizes or modification times)")
    for name in sorted(set(old.get("files", {})) | set(new.get("files", {}))):
        if old.get("files", {}).get(name) != new.get("files", {}).get(name):
            reasons.append(f"{name} changed")
    return "; ".join(reasons) or "unknown difference"


@dataclass
class JournalState:
    """What a journal says is done."""

    header: dict[str, Any]
    units: dict[tuple[int, int, int], int] = field(default_factory=dict)
    nonfinite: dict[tuple[int, int, int], int] = field(default_factory=dict)  # units whose output holds NaN/Inf
    files: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)
    complete: bool = False
    # Object-store outputs: each model file's multipart upload, and the parts it holds (number -> ETag).
    uploads: dict[str, str] = field(default_factory=dict)
    parts: dict[str, dict[int, str]] = field(default_factory=dict)


def read_journal(path: Path) -> JournalState | None:
    """Parse a journal; None when there is none. A torn trailing line is ignored."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        raise OutputError(f"{path}: the journal is a symbolic link; refused (a journal is a file distmerge writes)")
    try:
        lines = read_limited(path, "the journal", MAX_JOURNAL_BYTES, OutputError).decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise OutputError(f"{path}: not a distmerge journal (not text); rerun with --overwrite") from None
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            records.append(record)
        except (ValueError, RecursionError):
            if i == len(lines) - 1:
                log.warning("%s: ignoring a torn last line (interrupted write)", path)
                break
            raise OutputError(f"{path}: line {i + 1} is not valid JSON; the journal is damaged "
                              "(rerun with --overwrite to start over)") from None
    if not records or records[0].get("kind") != "header" or records[0].get("version") != FORMAT_VERSION:
        raise OutputError(f"{path}: not a distmerge journal of format {FORMAT_VERSION} (rerun with --overwrite)")
    header = records[0]
    shard = header.get("shard_size")
    if not (isinstance(header.get("parts"), dict) and isinstance(header.get("config"), dict)
            and isinstance(shard, int) and not isinstance(shard, bool) and shard > 0
            and all(isinstance(header.get(k), list) and all(isinstance(n, str) for n in header[k])
                    for k in ("tensors", "files"))):
        raise OutputError(f"{path}: the journal's header is damaged (rerun with --overwrite to start over)")
    state = JournalState(header)
    for i, r in enumerate(records[1:], start=2):
        kind = r.get("kind")
        if kind == "unit":
            key = (r.get("t"), r.get("r0"), r.get("r1"))
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in (*key, r.get("crc"), r.get("bad", 0))):
                raise OutputError(f"{path}: line {i} is not a valid unit record; the journal is damaged "
                                  "(rerun with --overwrite to start over)")
            state.units[key] = r["crc"]  # type: ignore[index]
            if r.get("bad"):
                state.nonfinite[key] = r["bad"]  # type: ignore[index]
        elif kind in ("file", "wrote") and isinstance(r.get("name"), str):
            (state.files if kind == "file" else state.written).add(r["name"])
        elif kind == "upload" and isinstance(r.get("name"), str) and isinstance(r.get("id"), str):
            state.uploads[r["name"]] = r["id"]
            state.parts[r["name"]] = {}  # a new upload of a file starts without parts
        elif kind == "part" and state.uploads.get(r.get("name")) == r.get("id"):
            if not (isinstance(r.get("n"), int) and isinstance(r.get("etag"), str)):
                raise OutputError(f"{path}: line {i} is not a valid part record; the journal is damaged "
                                  "(rerun with --overwrite to start over)")
            state.parts[r["name"]][r["n"]] = r["etag"]
        elif kind == "complete":
            state.complete = True
    return state


class JournalWriter:
    """Appends records; fsyncs at most once a second and on close, so it stays off the hot path."""

    def __init__(self, path: Path, header: dict[str, Any] | None) -> None:
        self.path = path
        if header is None:
            _drop_torn_tail(path)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if header is None else os.O_TRUNC)
            self._f = os.fdopen(os.open(path, flags, 0o644), "a" if header is None else "w")
        except OSError as e:
            raise OutputError(f"{path}: cannot write the journal ({e.strerror})") from e
        self._synced = time.monotonic()
        if header is not None:
            self._append({"kind": "header", "version": FORMAT_VERSION, **header}, sync=True)

    def _append(self, record: dict[str, Any], sync: bool = False) -> None:
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._f.flush()
            if sync or time.monotonic() - self._synced > FSYNC_INTERVAL_S:
                os.fsync(self._f.fileno())
                self._synced = time.monotonic()
        except OSError as e:
            raise OutputError(f"{self.path}: cannot append to the journal ({e.strerror})") from e

    def unit(self, tensor: int, row_start: int, row_end: int, crc: int, nonfinite: int = 0) -> None:
        record = {"kind": "unit", "t": tensor, "r0": row_start, "r1": row_end, "crc": crc}
        self._append({**record, "bad": nonfinite} if nonfinite else record)

    def wrote(self, name: str) -> None:
        """Record, before creating it, that this run writes ``name`` in OUT (so it may delete it)."""
        self._append({"kind": "wrote", "name": name}, sync=True)

    def upload(self, name: str, upload_id: str) -> None:
        """Record, before any part is sent, the multipart upload that assembles ``name``."""
        self._append({"kind": "upload", "name": name, "id": upload_id}, sync=True)

    def part(self, name: str, upload_id: str, number: int, etag: str) -> None:
        self._append({"kind": "part", "name": name, "id": upload_id, "n": number, "etag": etag})

    def file(self, name: str) -> None:
        self._append({"kind": "file", "name": name}, sync=True)

    def complete(self) -> None:
        self._append({"kind": "complete"}, sync=True)

    def flush(self) -> None:
        """Make every record so far durable (before the journal is read back)."""
        try:
            os.fsync(self._f.fileno())
        except OSError as e:
            raise OutputError(f"{self.path}: cannot sync the journal ({e.strerror})") from e

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            os.fsync(self._f.fileno())
        finally:
            self._f.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a crash mid-append) so new records start on a line of their own."""
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def crc_of_range(path: Path, offset: int, length: int) -> int | None:
    """CRC-32 of ``length`` bytes at ``offset``; None if the file is missing or shorter than that."""
    try:
        return storage_for(path).crc32(path, offset, length, "an output file", OutputError)
    except OutputError:
        return None
