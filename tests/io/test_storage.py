"""The byte layer: LocalStorage spans, checksums and scans checked against independent
computations (plain ``open``, ``zlib``, safetensors' own reader), and its refusals."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distmerge.errors import CheckpointError, DistmergeError, OutputError
from distmerge.io import local
from distmerge.io.local import LocalStorage
from distmerge.io.safetensors import (
    TensorInfo,
    encode_header,
    parse_safetensors_header,
    read_rows,
    write_rows,
)
from distmerge.io.scan import count_nonfinite, count_nonfinite_in_tensor, crc_and_nonfinite
from distmerge.io.storage import storage_for
from distmerge.io.writes import create_file, finalize_file, partial_path, write_bytes_atomic

DATA = bytes(range(256)) * 41 + b"tail"  # 10500 bytes, no period that lines up with chunks


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(DATA)
    return path


def raw(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize(("offset", "length"), [(0, 0), (0, 1), (0, len(DATA)), (7, 4096), (10_000, 500), (3, 9000)])
def test_read_into_and_read_equal_plain_reads(blob, offset, length):
    storage = LocalStorage()
    with storage.open_reader(blob, "a test file", OutputError) as reader:
        assert reader.size() == len(DATA) == os.path.getsize(blob)
        buffer = bytearray(length)
        assert reader.read_into(offset, memoryview(buffer)) == length
        assert bytes(buffer) == raw(blob, offset, length)
        assert reader.read(offset, length) == raw(blob, offset, length)


def test_reads_past_the_end_return_fewer_bytes(blob):
    with LocalStorage().open_reader(blob, "a test file") as reader:
        buffer = bytearray(100)
        assert reader.read_into(len(DATA) - 30, memoryview(buffer)) == 30
        assert bytes(buffer[:30]) == DATA[-30:]
        assert reader.read_into(len(DATA) + 5, memoryview(buffer)) == 0
        assert reader.read(len(DATA) - 3, 10) == DATA[-3:]


def test_read_into_accepts_a_typed_buffer(blob):
    values = torch.empty(16, dtype=torch.int32)
    with LocalStorage().open_reader(blob, "a test file") as reader:
        assert reader.read_into(12, memoryview(values.numpy())) == 64
    assert values.numpy().tobytes() == DATA[12:76]


@pytest.mark.parametrize("chunk", [local.CHUNK_BYTES, 1000, 4096, 1])
@pytest.mark.parametrize(("offset", "length"), [(0, len(DATA)), (5, 4321), (0, 0), (9999, 501)])
def test_crc32_equals_zlib_of_the_span_for_any_chunking(blob, monkeypatch, chunk, offset, length):
    monkeypatch.setattr(local, "CHUNK_BYTES", chunk)
    seen: list[bytes] = []
    got = LocalStorage().crc32(blob, offset, length, "a test file", on_chunk=lambda c: seen.append(bytes(c)))
    assert got == zlib.crc32(raw(blob, offset, length))
    assert b"".join(seen) == raw(blob, offset, length)
    assert all(len(c) <= chunk for c in seen)


def test_crc32_of_a_span_the_file_does_not_hold_is_none(blob):
    storage = LocalStorage()
    assert storage.crc32(blob, len(DATA) - 10, 11, "a test file") is None
    assert storage.crc32(blob, len(DATA) + 1, 1, "a test file") is None
    assert storage.crc32(blob, 0, -1, "a test file") is None


def test_opening_refuses_missing_files_and_fifos_with_the_callers_error(tmp_path):
    with pytest.raises(CheckpointError, match="absent: the weights does not exist"):
        LocalStorage().open_reader(tmp_path / "absent", "the weights", CheckpointError)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is a FIFO"):
        LocalStorage().crc32(fifo, 0, 1, "an output file", OutputError)


def test_create_write_publish_give_the_bytes_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    partial = partial_path(out, "model.safetensors")
    create_file(partial, b"HEADER", 64)
    assert partial.read_bytes() == b"HEADER" + bytes(58)
    storage = LocalStorage()
    assert storage.write_at(partial, 10, memoryview(b"abcdef")) == 6
    assert storage.write_at(str(partial), 60, memoryview(bytearray(b"wxyz"))) == 4
    finalize_file(out, "model.safetensors")
    assert not partial.exists()
    assert (out / "model.safetensors").read_bytes() == b"HEADER" + bytes(4) + b"abcdef" + bytes(44) + b"wxyz"


def test_writes_never_follow_a_planted_link(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    link = tmp_path / "out.partial"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        LocalStorage().write_at(link, 0, memoryview(b"evil"))
    with pytest.raises(OutputError, match="symbolic link"):
        create_file(link, b"h", 8)
    write_bytes_atomic(tmp_path / "out", b"new")  # the temporary name is that planted link
    assert (tmp_path / "out").read_bytes() == b"new"
    assert target.read_bytes() == b"keep" and not link.exists()


def test_storage_for_serves_paths_locally_and_urls_by_scheme(tmp_path):
    from distmerge.io.gcs import GcsStorage
    from distmerge.io.hub import HubStorage
    from distmerge.io.s3 import S3Storage

    assert isinstance(storage_for(tmp_path / "x"), LocalStorage)
    assert isinstance(storage_for(str(tmp_path / "x")), LocalStorage)
    assert isinstance(storage_for("relative/folder:with-colon"), LocalStorage)
    assert isinstance(storage_for("s3://bucket/model/a.safetensors"), S3Storage)
    assert isinstance(storage_for("S3://bucket/model"), S3Storage)
    assert isinstance(storage_for("hf://org/model@abc/a.safetensors"), HubStorage)
    assert isinstance(storage_for("gs://bucket/model/a.safetensors"), GcsStorage)
    for url in ("az://container/model", "ftp://host/model", "file:///tmp/x"):
        with pytest.raises(DistmergeError, match=r"storage is not supported \(yet\)"):
            storage_for(url)


def test_count_nonfinite_counts_exactly():
    values = torch.randn(50, 7)
    assert count_nonfinite(values) == 0
    values[3, 2], values[10, 0], values[49, 6] = float("nan"), float("inf"), float("-inf")
    assert count_nonfinite(values) == 3 == int((~torch.isfinite(values)).sum())
    assert count_nonfinite(torch.full((4,), 60000.0, dtype=torch.float16)) == 0  # the sum overflows, no value does
    assert count_nonfinite(torch.arange(10)) == 0


def save(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> dict[str, TensorInfo]:
    """Write with distmerge's own header encoder and row writer, then parse it back."""
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.float16: "F16"}
    header, offsets, size = encode_header([(n, codes[t.dtype], tuple(t.shape)) for n, t in tensors])
    create_file(path, header, size)
    for name, t in tensors:
        write_rows(path, offsets[name], t)
    infos, _ = parse_safetensors_header(path)
    return infos


def test_encoded_files_load_with_safetensors_and_rows_read_back(tmp_path):
    a = torch.randn(9, 5)
    b = torch.randn(4, 3, 2).to(torch.bfloat16)
    c = torch.arange(6, dtype=torch.int64)
    d = torch.tensor(2.5)
    infos = save(tmp_path / "m.safetensors", [("a", a), ("b", b), ("c", c), ("d", d)])
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        for name, want in (("a", a), ("b", b), ("c", c), ("d", d)):
            assert torch.equal(f.get_tensor(name), want)
    assert torch.equal(read_rows(infos["a"], 2, 7), a[2:7])
    assert torch.equal(read_rows(infos["b"], 1, 4), b[1:4])
    assert torch.equal(read_rows(infos["d"], 0, 1), d)
    offset, length = infos["b"].span(1, 3)
    assert (offset, length) == (infos["b"].offset + 1 * 3 * 2 * 2, 2 * 3 * 2 * 2)
    assert raw(tmp_path / "m.safetensors", offset, length) == b[1:3].contiguous().view(torch.uint8).numpy().tobytes()


def test_reading_rows_of_a_truncated_file_names_the_tensor(tmp_path):
    infos = save(tmp_path / "m.safetensors", [("a", torch.randn(8, 4))])
    os.truncate(tmp_path / "m.safetensors", os.path.getsize(tmp_path / "m.safetensors") - 20)
    with pytest.raises(CheckpointError, match=r"tensor 'a': file ended while reading rows 0:8"):
        read_rows(infos["a"], 0, 8)


def test_scans_agree_with_an_independent_count(tmp_path, monkeypatch):
    a = torch.randn(40, 16, dtype=torch.float16)
    a[0, 0], a[17, 3], a[39, 15] = float("nan"), float("inf"), float("nan")
    infos = save(tmp_path / "m.safetensors", [("a", a), ("i", torch.arange(12, dtype=torch.int64))])
    expected = int((~torch.isfinite(a)).sum())
    assert count_nonfinite_in_tensor(infos["a"]) == expected
    assert count_nonfinite_in_tensor(infos["a"], block_bytes=100) == expected
    assert count_nonfinite_in_tensor(infos["i"]) == 0
    monkeypatch.setattr(local, "CHUNK_BYTES", 64)  # many chunks, each a whole number of values
    offset, length = infos["a"].span(0, 40)
    crc, bad = crc_and_nonfinite(infos["a"].file, offset, length, "F16", "an output file", OutputError)
    assert crc == zlib.crc32(a.view(torch.uint8).numpy().tobytes()) and bad == expected
    offset, length = infos["a"].span(1, 17)
    assert crc_and_nonfinite(infos["a"].file, offset, length, "F16", "an output file")[1] == 0
