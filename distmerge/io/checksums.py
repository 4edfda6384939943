"""CRC-32 of bytes, defined once: the journal's per-unit checksums, manifests and verify.

Why not zlib's alone: every merged byte is checksummed once as it is written (the journal's
per-unit CRC, which resume and verify trust), and ``verify: full`` checksums the whole output
again. zlib's table-driven CRC-32 runs at ~2-4 GB/s per core, a sizeable share of a cheap
merge's CPU (0.15 s of a ~1 s linear merge of three 0.6 GB models on one core). ISA-L
computes the same checksum (the same polynomial and the same running form, so every value is
zlib's) with carry-less multiplies, ~4x faster, and releases the GIL on large buffers as zlib does, so the local executor's
threads still checksum in parallel. zlib remains the fallback where ``isal`` is not installed
(a platform without its wheel): the values are the same either way.
"""

from __future__ import annotations

import numpy as np

try:
    from isal.isal_zlib import crc32 as _crc32

    ENGINE = "isal"
except ImportError:  # pragma: no cover - exercised by tests/io/test_checksums.py with isal hidden
    from zlib import crc32 as _crc32

    ENGINE = "zlib"


def crc32(data: bytes | bytearray | memoryview | np.ndarray, value: int = 0) -> int:
    """CRC-32 of ``data`` (any contiguous buffer: bytes, memoryview, numpy array), continued
    from ``value`` (the CRC of the bytes before it), as ``zlib.crc32(data, value)``."""
    return _crc32(data, value)
