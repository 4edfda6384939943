"""Checkpoint reading: row-range reads equal safetensors' own reader; corrupt headers are named."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distmerge.checkpoint import Checkpoint
from distmerge.errors import CheckpointError
from distmerge.io.safetensors import parse_safetensors_header, read_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64])
def test_read_rows_equals_safetensors_get_slice(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(13, 7, 3, generator=g) * 10).to(dtype), "b": torch.randn(5, generator=g).to(dtype),
               "c": torch.tensor(3.0).to(dtype)}
    save_file(tensors, tmp_path / "m.safetensors")
    infos, _ = parse_safetensors_header(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        for r0, r1 in [(0, 13), (0, 1), (4, 11), (12, 13), (3, 3)]:
            assert torch.equal(read_rows(infos["a"], r0, r1), f.get_slice("a")[r0:r1])
        assert torch.equal(read_rows(infos["b"], 2, 4), f.get_tensor("b")[2:4])
        assert torch.equal(read_rows(infos["c"], 0, 1), f.get_tensor("c"))


def _write_raw(path, header: dict | bytes, data: bytes):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,data,match", [
    (b"{not json", b"", "not valid JSON"),
    ({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype 'F33'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, b"\0" * 8, "needs 8"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
     b"\0" * 12, "overlap"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
])
def test_corrupt_headers_are_named(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(CheckpointError, match=match) as info:
        parse_safetensors_header(path)
    assert "bad.safetensors" in str(info.value)


def test_truncated_file_is_reported(tmp_path):
    save_file({"w": torch.randn(100, 10)}, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        parse_safetensors_header(tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors").write_bytes(raw[:5])
    with pytest.raises(CheckpointError, match="too short"):
        parse_safetensors_header(tmp_path / "m.safetensors")


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle.*arbitrary code.*save_pretrained"):
        Checkpoint.open(tmp_path / "m")


def test_index_pointing_to_missing_file(llama_family, tmp_path):
    base, _ = llama_family
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in base.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    victim = sorted(copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"do not exist.*{victim.name}"):
        Checkpoint.open(copy)


def test_open_reads_headers_of_sharded_model(llama_family):
    base, _ = llama_family
    ckpt = Checkpoint.open(base)
    assert ckpt.num_layers == 4
    assert len({t.file for t in ckpt.tensors.values()}) > 1
    assert "model.layers.3.self_attn.q_proj.weight" in ckpt.tensors
