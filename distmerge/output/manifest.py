"""The checksums a merged checkpoint carries: ``distmerge_manifest.json``.

Why: ``verify`` used to trust the merge journal for its checksums, so an output whose journal
was deleted (or stripped of its unit lines) passed with a flipped byte or a shard swapped in
from another merge. The manifest makes the output self-contained: for every model file its
size and the CRC-32 of its header, for every tensor the CRC-32 of each row range the merge
wrote (ranges that together cover every row, so every byte of every model file is covered),
and the SHA-256 of every other file the run wrote. The index records the manifest's own
SHA-256, so removing or editing the manifest is seen too.

CRC-32 catches damage (every single-byte change, every burst up to 32 bits, anything else
with probability 1 - 2^-32 per range); it is not a signature against a deliberate forger,
who could rewrite the manifest and the index as well. The per-range CRCs are the ones the
workers computed while writing, so building the manifest costs no extra read of the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distmerge.errors import OutputError
from distmerge.io.checksums import crc32
from distmerge.io.files import open_regular
from distmerge.io.structured import read_json
from distmerge.io.writes import write_text_atomic

MANIFEST_NAME = "distmerge_manifest.json"
FORMAT = "distmerge-manifest"
VERSION = 1
INDEX_KEY = "distmerge_manifest_sha256"


def sha256_of(path: Path) -> str:
    """SHA-256 of a (small) file the run wrote."""
    digest = hashlib.sha256()
    if os.path.islink(path):
        raise OutputError(f"{path}: is a symbolic link, not a file the merge wrote")
    fd = open_regular(path, "an output file", OutputError)
    try:
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def build_manifest(files: Iterable[tuple[str, bytes, int]], tensors: Iterable[tuple[str, int]],
                   units: dict[tuple[int, int, int], int]) -> dict[str, Any]:
    """The model-file part of a manifest.

    ``files``: (name, header bytes, size) per output file, in plan order; ``tensors``: (name,
    file index) per tensor, indexed like the journal's units; ``units``: (tensor, row start,
    row end) -> CRC-32 of those rows' bytes, from the journal.
    """
    files = list(files)
    ranges: dict[int, list[list[int]]] = defaultdict(list)
    for (t, r0, r1), crc in sorted(units.items()):
        ranges[t].append([r0, r1, crc])
    entries: dict[str, Any] = {name: {"size": size, "header_bytes": len(header), "header_crc32": crc32(header),
                                      "tensors": {}} for name, header, size in files}
    for t, (tensor, file_index) in enumerate(tensors):
        entries[files[file_index][0]]["tensors"][tensor] = ranges.get(t, [])
    return {"format": FORMAT, "version": VERSION, "files": entries, "other_files": {}}


def add_other_files(manifest: dict[str, Any], out: Path, names: Iterable[str]) -> None:
    """Record the SHA-256 of each non-model file the run wrote (config, tokenizer, report...)."""
    for name in sorted(names):
        path = out / name
        # Names come from the journal, a file in a directory others may write: only plain names
        # of regular files directly in OUT are ever hashed.
        if _plain_name(name) and os.path.lexists(path) and stat.S_ISREG(os.lstat(path).st_mode):
            manifest["other_files"][name] = sha256_of(path)


def write_manifest(out: Path, manifest: dict[str, Any]) -> str:
    """Write the manifest atomically; returns its SHA-256 (for the index)."""
    text = json.dumps(manifest, separators=(",", ":"), sort_keys=True) + "\n"
    write_text_atomic(out / MANIFEST_NAME, text)
    return hashlib.sha256(text.encode()).hexdigest()


def load_manifest(path: Path) -> dict[str, Any]:
    """Read and validate a manifest; OutputError naming what is wrong."""
    data = read_json(path, "the checksum manifest", OutputError, limit=1 << 30)
    ok = (isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION
          and isinstance(data.get("files"), dict) and isinstance(data.get("other_files"), dict))
    if ok:
        for entry in data["files"].values():
            ok = ok and isinstance(entry, dict) and all(
                isinstance(entry.get(k), int) for k in ("size", "header_bytes", "header_crc32")
            ) and isinstance(entry.get("tensors"), dict) and all(
                isinstance(r, list) and all(isinstance(x, list) and len(x) == 3 and all(isinstance(v, int) for v in x)
                                            for x in r)
                for r in entry["tensors"].values())
        ok = ok and all(isinstance(v, str) for v in data["other_files"].values())
        ok = ok and all(_plain_name(n) for n in (*data["files"], *data["other_files"]))
    if not ok:
        raise OutputError(f"{path}: not a distmerge checksum manifest of version {VERSION} (damaged?)")
    return data


def _plain_name(name: str) -> bool:
    """A file directly in OUT: a manifest never makes verify read anywhere else."""
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")
