"""Writing the output: big files created at size and published when done, small files atomically.

Each output model file is created once at its final size under a temporary name
(``NAME.partial``), so any worker can write any tensor's rows at their byte offset; it gets its
final name when all its rows are written (:func:`finalize_file`). Small files (config, report,
manifest, index) are written whole under the temporary name and renamed into place, so a reader
never sees half of one. Every byte goes through the location's :class:`~distmerge.io.storage.Storage`.
"""

from __future__ import annotations

from pathlib import Path

from distmerge.io.storage import storage_for

PARTIAL_SUFFIX = ".partial"


def partial_path(out_dir: Path, name: str) -> Path:
    """Where the file ``name`` of ``out_dir`` lives until it is finished."""
    return out_dir / (name + PARTIAL_SUFFIX)


def create_file(path: Path, header: bytes, size: int) -> None:
    """Create ``path`` at its full size with its header written and the space reserved."""
    storage_for(path).create(path, header, size)


def finalize_file(out_dir: Path, name: str) -> None:
    """Make a completed ``*.partial`` file durable and give it its final name."""
    storage_for(out_dir).publish(partial_path(out_dir, name), out_dir / name)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a small file under a temporary name, fsync it, then rename it into place."""
    storage_for(path).put(path, data, path.with_name(path.name + PARTIAL_SUFFIX))


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_bytes_atomic` of UTF-8 text."""
    write_bytes_atomic(path, text.encode())
