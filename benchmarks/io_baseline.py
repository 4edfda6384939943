"""The storage bound: read every input byte and write the output bytes with plain sequential I/O."""

from __future__ import annotations

import os
import time
from pathlib import Path

CHUNK = 64 * 1024 * 1024


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache (fsync, then POSIX_FADV_DONTNEED) so runs start cold."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_io(inputs: list[Path], out: Path, out_bytes: int) -> float:
    """Seconds to read all ``inputs`` and write ``out_bytes`` to ``out`` (fsynced)."""
    start = time.perf_counter()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for p in inputs:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    with open(out, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            left -= f.write(view[: min(CHUNK, left)])
        os.fsync(f.fileno())
    return time.perf_counter() - start


def safetensors_files(folders: list[Path]) -> list[Path]:
    return sorted(p for f in folders for p in Path(f).glob("*.safetensors"))
