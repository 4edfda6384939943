"""The one CRC-32 (``distmerge.io.checksums``) against zlib's, the reference every journal,
manifest and verify of earlier versions used: the same value for every buffer kind, size and
running start, with ISA-L installed and with it hidden (the fallback)."""

from __future__ import annotations

import importlib
import sys
import threading
import zlib

import numpy as np
import pytest

from distmerge.io import checksums

RNG = np.random.default_rng(17)
# Sizes around ISA-L's folding block (64 bytes), its GIL threshold (5 KiB) and a large buffer.
SIZES = [0, 1, 3, 15, 16, 63, 64, 65, 255, 5 * 1024, 5 * 1024 + 1, 65536 + 7, 3 * 1024 * 1024 + 5]
STARTS = [0, 1, 0xFFFFFFFF, 0x12345678]


def _buffers(n: int) -> list[object]:
    raw = RNG.integers(0, 256, n + 3, dtype=np.uint8)
    data = raw[3:].tobytes()
    return [data, bytearray(data), memoryview(raw)[3:], raw[3:], np.frombuffer(data, dtype=np.uint8)]


@pytest.fixture(params=["installed", "hidden"])
def crc_module(request, monkeypatch):
    """The module as imported, and re-imported with ``isal`` made unimportable."""
    if request.param == "installed":
        yield checksums
        return
    monkeypatch.setitem(sys.modules, "isal", None)
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    fallback = importlib.reload(checksums)
    assert fallback.ENGINE == "zlib"
    yield fallback
    monkeypatch.undo()
    importlib.reload(checksums)


@pytest.mark.parametrize("size", SIZES)
def test_crc32_is_zlibs_for_every_buffer_and_start(crc_module, size):
    for buffer in _buffers(size):
        for start in STARTS:
            assert crc_module.crc32(buffer, start) == zlib.crc32(buffer, start), (type(buffer), size, start)
        assert crc_module.crc32(buffer) == zlib.crc32(buffer)


def test_a_running_crc_over_chunks_equals_the_whole(crc_module):
    data = RNG.integers(0, 256, 1_000_003, dtype=np.uint8).tobytes()
    crc = 0
    for at in range(0, len(data), 65_537):
        crc = crc_module.crc32(memoryview(data)[at:at + 65_537], crc)
    assert crc == zlib.crc32(data) == crc_module.crc32(data)


def test_isal_is_used_where_it_is_installed():
    """The dependency is declared: an install without it would silently checksum ~4x slower."""
    pytest.importorskip("isal")
    assert checksums.ENGINE == "isal"


def test_a_large_checksum_releases_the_gil(crc_module):
    """The local executor checksums on several threads, so a large checksum must let other
    Python threads run. This thread counts while another computes one and reads the count just
    before and just after its call. With a switch interval of a second nothing takes the GIL
    from a thread that holds it, so a call that held it would see no step at all (checked with
    a GIL-holding C call: 0 steps; a releasing one: millions)."""
    data = RNG.integers(0, 256, 256 * 1024 * 1024, dtype=np.uint8)
    count, during = [0], []
    started, finished = threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        before = count[0]
        crc_module.crc32(data)
        during.append(count[0] - before)
        finished.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        started.wait()
        while not finished.is_set():
            count[0] += 1
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert during[0] > 100, during
