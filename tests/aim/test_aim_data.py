"""Calibration data: every input format, the AIM sampling, pre-tokenized sequences, errors, stats files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distmerge.aim import load_calibration_sequences, load_statistics, save_statistics
from distmerge.aim.data import read_dataset
from distmerge.aim.sequences import sample_sequences
from distmerge.aim.stats_file import match_statistics
from distmerge.config import CalibrationConfig
from distmerge.errors import CheckpointError, ConfigError

DOCS = [f"Document number {i} talks about topic {i * 7 % 11}." for i in range(12)] + [" ".join(["long"] * 30)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with only the byte tokenizer (ids are UTF-8 bytes, no special tokens added)."""
    from distmerge.testing.tiny import byte_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    byte_tokenizer().save_pretrained(folder)
    return folder


def expected_sequences(docs: list[str], n_samples: int, block_size: int, seed: int) -> torch.Tensor:
    """The AWQ/AIM recipe written independently: permute, byte-encode, filter, concat, cut."""
    import numpy as np

    kept = []
    for i in np.random.default_rng(seed).permutation(len(docs)):
        ids = list(docs[i].strip().encode())
        if 0 < len(ids) <= block_size:
            kept.append(ids)
        if len(kept) == n_samples:
            break
    flat = [t for ids in kept for t in ids]
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size]).reshape(n, block_size)


def write_formats(root: Path, field: str = "text") -> dict[str, Path]:
    table = pa.table({field: DOCS, "id": list(range(len(DOCS)))})
    paths = {}
    paths["parquet"] = root / "d.parquet"
    pq.write_table(table, paths["parquet"])
    paths["arrow_file"] = root / "d.arrow"
    with pa.ipc.new_file(str(paths["arrow_file"]), table.schema) as w:
        w.write_table(table)
    # datasets' save_to_disk layout: data-*.arrow are Arrow *streams*, plus state/info json.
    disk = root / "saved"
    disk.mkdir()
    with pa.ipc.new_stream(str(disk / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    (disk / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0",
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
        "_output_all_columns": False, "_split": None,
    }))
    (disk / "dataset_info.json").write_text(json.dumps({"features": {field: {"dtype": "string", "_type": "Value"}}}))
    paths["save_to_disk"] = disk
    dd = root / "dict"
    dd.mkdir()
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["validation", "train"]}))
    (dd / "train").symlink_to(disk, target_is_directory=True)
    paths["dataset_dict"] = dd
    paths["jsonl"] = root / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    paths["json_array"] = root / "a.json"
    paths["json_array"].write_text(json.dumps([{field: d} for d in DOCS]))
    paths["csv"] = root / "d.csv"
    import pyarrow.csv as pcsv

    pcsv.write_csv(table, paths["csv"])
    paths["txt"] = root / "d.txt"
    paths["txt"].write_text("\n\n".join(DOCS[:6]) + "\n  \n\n" + "\n\n".join(DOCS[6:]) + "\n")
    return paths


@pytest.mark.parametrize(
    "fmt", ["parquet", "arrow_file", "save_to_disk", "dataset_dict", "jsonl", "json_array", "csv", "txt"]
)
def test_every_format_gives_the_same_blocks(tmp_path: Path, tok_dir: Path, fmt: str) -> None:
    path = write_formats(tmp_path, field="body")[fmt]
    assert read_dataset(str(path), "body").column("body").to_pylist() == DOCS
    cal = CalibrationConfig(dataset=str(path), text_field="body", n_samples=5, block_size=64, seed=3)
    sequences = load_calibration_sequences(cal, tok_dir)
    expected = expected_sequences(DOCS, 5, 64, 3)
    assert sequences.dtype == torch.int64
    assert sequences.shape == expected.shape == (2, 64)
    assert torch.equal(sequences, expected)


def test_sampling_skips_long_and_empty_and_stops_at_n_samples() -> None:
    texts = ["aaaa", "", None, "b" * 50, "cc", "ddd", "  ", "eeeee"]
    sequences = sample_sequences(texts, lambda s: [ord(c) for c in s], n_samples=3, block_size=4, seed=0)
    # Independent check of which samples are kept, in permutation order.
    import numpy as np

    kept = [t.strip() for t in (texts[i] for i in np.random.default_rng(0).permutation(len(texts)))
            if t and t.strip() and len(t.strip()) <= 4][:3]
    stream = [ord(c) for c in "".join(kept)]
    assert sequences.flatten().tolist() == stream[: len(stream) // 4 * 4]


def test_seed_determinism(tok_dir: Path) -> None:
    docs = [f"sample {i}: " + "x" * (i % 9) for i in range(200)]
    path = tok_dir.parent / "seed.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    a = load_calibration_sequences(CalibrationConfig(dataset=str(path), n_samples=50, block_size=32, seed=7), tok_dir)
    b = load_calibration_sequences(CalibrationConfig(dataset=str(path), n_samples=50, block_size=32, seed=7), tok_dir)
    c = load_calibration_sequences(CalibrationConfig(dataset=str(path), n_samples=50, block_size=32, seed=8), tok_dir)
    assert torch.equal(a, b)
    assert a.shape[0] >= 10 and (a.shape != c.shape or not torch.equal(a, c))
    assert torch.equal(a, expected_sequences(docs, 50, 32, 7))


def test_pretokenized_input_ids_are_used_as_given(tmp_path: Path) -> None:
    rows = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [0, 0, 1, 1, 2]]
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": rows, "text": ["a", "b", "c"]}), path)
    cal = CalibrationConfig(dataset=str(path), n_samples=1, block_size=512, seed=0)
    # No tokenizer is needed (the folder does not even exist).
    sequences = load_calibration_sequences(cal, tmp_path / "nowhere")
    assert sequences.tolist() == rows and sequences.dtype == torch.int64
    pq.write_table(pa.table({"input_ids": [[1, 2], [3]]}), path)
    with pytest.raises(ConfigError, match="same non-zero length"):
        load_calibration_sequences(cal, tmp_path)


def test_builtin_dataset(tok_dir: Path) -> None:
    from distmerge.aim.builtin import BUILTIN_PATH

    assert BUILTIN_PATH.stat().st_size < 1_000_000
    table = read_dataset("builtin")
    assert table.num_rows >= 300 and "text" in table.column_names
    cal = CalibrationConfig(dataset="builtin", n_samples=64, block_size=512, seed=42)
    sequences = load_calibration_sequences(cal, tok_dir)
    texts = table.column("text").to_pylist()
    assert torch.equal(sequences, expected_sequences(texts, 64, 512, 42))
    assert sequences.shape[0] >= 30
    assert sequences.max() < 256  # the byte tokenizer adds no special tokens


def test_missing_tokenizer_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello world\n\nsecond document here")
    folder = tmp_path / "model_without_tokenizer"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model_without_tokenizer.*no tokenizer"):
        load_calibration_sequences(CalibrationConfig(dataset=str(path), block_size=4), folder)


def test_data_errors_name_the_field(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"aim\.calibration\.dataset: .*does not exist"):
        load_calibration_sequences(CalibrationConfig(dataset=str(tmp_path / "missing.parquet")), tok_dir)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x"], "meta": [1]}), path)
    with pytest.raises(ConfigError, match=r"aim\.calibration\.text_field: column 'text'.*content, meta"):
        load_calibration_sequences(CalibrationConfig(dataset=str(path)), tok_dir)
    bad = tmp_path / "d.xyz"
    bad.write_text("?")
    with pytest.raises(ConfigError, match="unknown format"):
        read_dataset(str(bad))
    short = tmp_path / "short.txt"
    short.write_text("ab")
    with pytest.raises(ConfigError, match="not enough for one block; .* or a smaller block_size$"):
        load_calibration_sequences(CalibrationConfig(dataset=str(short), block_size=8), tok_dir)


def test_too_little_data_names_the_block_size_that_would_help() -> None:
    """Documents longer than a block are skipped whole: when that leaves too few tokens, the
    advice is a larger block_size (a smaller one would skip more); when the documents are just
    short and few, a smaller one."""
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    with pytest.raises(ConfigError, match=r"yields 0 tokens in 0 samples .* or a larger block_size "
                                          r"\(2 documents were longer than 4 tokens and skipped\)$"):
        sample_sequences(["abcdefgh", "ijklmnop"], encode, n_samples=2, block_size=4, seed=0)
    with pytest.raises(ConfigError, match=r"yields 4 tokens in 2 samples .* or a smaller block_size$"):
        sample_sequences(["ab", "cd"], encode, n_samples=2, block_size=8, seed=0)
    assert sample_sequences(["ab", "cd"], encode, n_samples=2, block_size=4, seed=0).shape == (1, 4)


def test_statistics_are_written_with_the_permissions_of_the_other_outputs(tmp_path: Path) -> None:
    """Through the one writer (0644 under umask 022), not safetensors' save_file (0600)."""
    import os

    path = tmp_path / "aim.safetensors"
    save_statistics({"m": torch.tensor([1.0, 2.0])}, path, {"base_model": "/m", "dataset": "builtin",
                                                            "n_blocks": "1", "block_size": "4", "tokens": "4"})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["aim.safetensors"]  # no temporary left
    assert torch.equal(load_statistics(path)[0]["m"], torch.tensor([1.0, 2.0]))


def test_statistics_file_roundtrip_and_validation(tmp_path: Path) -> None:
    stats = {"model.layers.0.self_attn.q_proj": torch.tensor([1.0, 2.0, 3.0]), "model.norm": torch.tensor([0.5, 0.0, 1.5])}
    meta = {"base_model": "/m", "dataset": "builtin", "n_blocks": "2", "block_size": "4", "tokens": "8"}
    path = tmp_path / "s" / "aim.safetensors"
    save_statistics(stats, path, meta)
    loaded, got_meta = load_statistics(path)
    assert list(loaded) == list(stats)
    for k in stats:
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], stats[k])
    assert {k: got_meta[k] for k in meta} == meta and got_meta["format"] == "distmerge-aim-statistics"
    assert match_statistics(loaded, {"model.layers.0.self_attn.q_proj.weight": (4, 3), "model.norm.weight": (3,),
                                     "model.embed_tokens.weight": (10, 3)}) == {
        "model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj", "model.norm.weight": "model.norm"}
    with pytest.raises(ConfigError, match="'model.norm' has 3 channels"):
        match_statistics(loaded, {"model.norm.weight": (5,)})
    with pytest.raises(ConfigError, match="no statistic for module 'lm_head'"):
        match_statistics(loaded, {"lm_head.weight": (9, 3)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_statistics(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        load_statistics(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="not an AIM statistics file"):
        load_statistics(tmp_path / "other.safetensors")
    save_statistics({"m": torch.tensor([1.0, -1.0])}, tmp_path / "neg.safetensors", meta)
    with pytest.raises(ConfigError, match="negative or non-finite"):
        load_statistics(tmp_path / "neg.safetensors")
