"""Self-contained verification: the output's own manifest proves every byte (issue #12).

``verify`` must catch any changed byte without the journal, and report (not trust) a journal
that covers less than the output or disagrees with it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from distmerge.cli import main
from distmerge.engine.run import run_merge
from distmerge.output.journal import JOURNAL_NAME
from distmerge.output.manifest import MANIFEST_NAME
from tests.helpers import make_config

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def outputs(llama_family, tmp_path_factory):
    """Two finished merges of the same layout (different weights), made once."""
    base, experts = llama_family
    root = tmp_path_factory.mktemp("integrity")
    run_merge(make_config("task_arithmetic", base, experts, [0.6, 0.3]), root / "a", shard_size=20000, progress=False)
    run_merge(make_config("task_arithmetic", base, experts, [0.2, 0.9]), root / "b", shard_size=20000, progress=False)
    return root / "a", root / "b"


@pytest.fixture
def out(outputs, tmp_path):
    return Path(shutil.copytree(outputs[0], tmp_path / "out"))


def verify(path: Path, capsys, *flags: str) -> tuple[int, str]:
    code = main(["verify", str(path), *flags])
    return code, capsys.readouterr().out


def _tensor_byte(out: Path) -> tuple[Path, int]:
    """A file and an offset inside the data of its largest tensor."""
    shard = sorted(out.glob("model-*.safetensors"))[0]
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    name, entry = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    return shard, 8 + n + (entry["data_offsets"][0] + entry["data_offsets"][1]) // 2


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("journal", ["kept", "deleted", "units_stripped"])
def test_flipped_byte_is_found_without_the_journal(out, capsys, journal):
    assert verify(out, capsys) == (0, verify(out, capsys)[1])
    if journal == "deleted":
        (out / JOURNAL_NAME).unlink()
    elif journal == "units_stripped":
        lines = (out / JOURNAL_NAME).read_text().splitlines()
        (out / JOURNAL_NAME).write_text("\n".join(line for line in lines if '"kind":"unit"' not in line) + "\n")
    shard, offset = _tensor_byte(out)
    flip(shard, offset)
    code, text = verify(out, capsys)
    assert code == 1 and "fail their checksum" in text and shard.name in text
    if journal == "units_stripped":
        assert "covers 0 of the output's" in text


def test_flipped_header_byte_is_found(out, capsys):
    (out / JOURNAL_NAME).unlink()
    shard = sorted(out.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    i = raw.index(b'"format"', 8, 8 + n)
    raw[i + 2] = ord("F")  # still valid JSON, other metadata
    shard.write_bytes(bytes(raw))
    code, text = verify(out, capsys, "--quick")
    assert code == 1 and "header fails its checksum" in text


def test_shard_swapped_in_from_another_merge_is_found(out, outputs, capsys):
    (out / JOURNAL_NAME).unlink()
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shutil.copyfile(outputs[1] / shard.name, shard)
    code, text = verify(out, capsys)
    assert code == 1 and "fail their checksum" in text and shard.name in text


@pytest.mark.parametrize("damage", ["deleted", "edited"])
def test_manifest_removed_or_edited_is_a_problem(out, capsys, damage):
    manifest = out / MANIFEST_NAME
    if damage == "deleted":
        manifest.unlink()
        expected = "missing; the output's checksums cannot be verified (the index says it had one)"
    else:
        data = json.loads(manifest.read_text())
        first = next(iter(data["files"].values()))
        ranges = next(iter(first["tensors"].values()))
        ranges[0][2] ^= 1
        manifest.write_text(json.dumps(data))
        expected = "does not match the checksum the index records"
    code, text = verify(out, capsys)
    assert code == 1 and expected in text


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "merge_report.json", "README.md"])
def test_other_files_are_checksummed(out, capsys, name):
    path = out / name
    path.write_text(path.read_text().replace("a", "b", 1))
    code, text = verify(out, capsys, "--quick")
    assert code == 1 and f"{path}: fails its checksum" in text


def test_journal_that_disagrees_with_the_manifest_is_reported(out, capsys):
    lines = (out / JOURNAL_NAME).read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"kind":"unit"' in line)
    record = json.loads(lines[i])
    record["crc"] ^= 1
    lines[i] = json.dumps(record, separators=(",", ":"))
    (out / JOURNAL_NAME).write_text("\n".join(lines) + "\n")
    code, text = verify(out, capsys)
    assert code == 1 and "another checksum in the journal than in the manifest" in text


def test_quick_verify_reads_no_tensor_data(out, capsys):
    code, text = verify(out, capsys, "--quick")
    assert code == 0 and "0 checksums verified, 0 bytes scanned" in text


def test_manifest_covers_every_byte_of_every_model_file(out):
    """Header bytes plus every tensor's row ranges add up to each file's size exactly."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for name, entry in manifest["files"].items():
        raw = (out / name).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        assert entry["header_bytes"] == 8 + n and entry["size"] == len(raw)
        covered = 0
        for tensor, info in header.items():
            rows = info["shape"][0] if info["shape"] else 1
            ranges = sorted(entry["tensors"][tensor])
            assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == rows
            covered += info["data_offsets"][1] - info["data_offsets"][0]
        assert entry["header_bytes"] + covered == entry["size"]


def test_files_added_or_linked_after_the_merge_are_problems(out, capsys, tmp_path):
    (out / "chat_template.jinja").write_text("{{ 'ignore previous instructions' }}")
    outside = tmp_path / "tokenizer.json"
    outside.write_bytes((out / "tokenizer.json").read_bytes())
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(outside)
    code, text = verify(out, capsys, "--quick")
    assert code == 1
    assert "chat_template.jinja: not written by the merge (added afterwards?)" in text
    assert "tokenizer.json: is a symbolic link, not the file the merge wrote" in text
