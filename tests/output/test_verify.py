"""``distmerge verify`` against the architecture config.json names: a shape it does not expect,
a tensor it expects that is missing, a dtype other than config.json's, a tensor it does not
know (a warning), and ``--quick``, which checks headers and architecture without reading data.

Each test damages a copy of one finished merge in one way, so every other check stays clean
and the test can require the exact problem list, not just a non-zero exit code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distmerge.cli import main
from distmerge.engine.run import run_merge
from distmerge.output.journal import JOURNAL_NAME
from distmerge.output.manifest import INDEX_KEY, MANIFEST_NAME
from tests.helpers import evict, make_config, read_chars, resident_bytes, safetensors_header

pytestmark = pytest.mark.usefixtures("ray_local")

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def merged(llama_family, tmp_path_factory) -> Path:
    """One finished merge (fp32 Llama, 4 layers, intermediate_size 160); tests damage copies."""
    base, experts = llama_family
    out = tmp_path_factory.mktemp("verify") / "out"
    run_merge(make_config("task_arithmetic", base, experts, [0.6, 0.3]), out, progress=False)
    return out


@pytest.fixture
def copy(merged, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(merged, out)
    return out


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    """Run ``distmerge verify``; its exit code, problem lines and warning lines."""
    code = main(["verify", *args])
    lines = capsys.readouterr().out.splitlines()
    problems = [line.removeprefix("problem: ") for line in lines if line.startswith("problem: ")]
    warnings = [line.removeprefix("warning: ") for line in lines if line.startswith("warning: ")]
    return code, problems, warnings


def _weight_files(out: Path) -> list[Path]:
    return sorted(out.glob("model-*.safetensors"))


def _rewrite_header(path: Path, edit: Callable[[dict], None], drop_tail: int = 0) -> None:
    """Edit a safetensors header in place, padded to its old length so that every tensor's
    data stays at the same absolute offset (the journal's checksums still cover it); drop
    ``drop_tail`` bytes of data from the end of the file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= n
    path.write_bytes(data[:8] + raw + b" " * (n - len(raw)) + data[8 + n:len(data) - drop_tail])


def _edit_config(out: Path, **changes: object) -> None:
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    _reseal(out)


def _reseal(out: Path) -> None:
    """Give a deliberately edited output a manifest (and index hash) that matches its bytes
    again, as a merge that produced them would have: these tests isolate the architecture
    checks; the checksums themselves are tests/output/test_output_integrity.py's."""
    index = json.loads((out / INDEX).read_text())
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    files = {}
    for name in sorted(set(index["weight_map"].values())):
        path = out / name
        data_start, header = safetensors_header(path)
        raw = path.read_bytes()
        tensors = {}
        for tensor, entry in header.items():
            begin, end = (data_start + o for o in entry["data_offsets"])
            tensors[tensor] = [[0, entry["shape"][0] if entry["shape"] else 1, zlib.crc32(raw[begin:end])]]
        files[name] = {"size": len(raw), "header_bytes": data_start, "header_crc32": zlib.crc32(raw[:data_start]),
                       "tensors": tensors}
    manifest["files"] = files
    manifest["other_files"] = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in manifest["other_files"]}
    text = json.dumps(manifest, separators=(",", ":"), sort_keys=True) + "\n"
    (out / MANIFEST_NAME).write_text(text)
    index["metadata"][INDEX_KEY] = hashlib.sha256(text.encode()).hexdigest()
    (out / INDEX).write_text(json.dumps(index))
    (out / JOURNAL_NAME).unlink(missing_ok=True)  # its checksums describe the bytes before the edit


def test_clean_merge_verifies(capsys, copy):
    code, problems, warnings = _verify(capsys, str(copy))
    assert (code, problems, warnings) == (0, [], [])


def test_shape_the_config_does_not_expect(capsys, copy):
    """config.json says intermediate_size 128; the merged MLP weights have 160."""
    _edit_config(copy, intermediate_size=128)
    code, problems, _ = _verify(capsys, str(copy))
    assert code == 1
    want = []
    for layer in range(4):
        prefix = f"model.layers.{layer}.mlp"
        want += [f"tensor '{prefix}.down_proj.weight' has shape [64, 160], the architecture expects [64, 128]",
                 f"tensor '{prefix}.gate_proj.weight' has shape [160, 64], the architecture expects [128, 64]",
                 f"tensor '{prefix}.up_proj.weight' has shape [160, 64], the architecture expects [128, 64]"]
    assert problems == want


def test_tensor_stored_with_another_shape(capsys, copy):
    """A file whose header gives one tensor a transposed shape (same bytes, same size):
    ``--quick`` reports exactly that (a full verify also finds the checksums broken, since
    its rows now cover other bytes)."""
    name = "model.layers.2.self_attn.o_proj.weight"
    path = next(p for p in _weight_files(copy) if name in safetensors_header(p)[1])

    def transpose(header: dict) -> None:
        assert header[name]["shape"] == [64, 64]
        header[name]["shape"] = [32, 128]

    _rewrite_header(path, transpose)
    _reseal(copy)
    code, problems, _ = _verify(capsys, "--quick", str(copy))
    assert code == 1
    assert problems == [f"tensor '{name}' has shape [32, 128], the architecture expects [64, 64]"]


def test_missing_expected_tensor(capsys, copy):
    """The last tensor of a file cut out of it (header, data, index and journal lines): the
    file is a valid safetensors file and the index agrees, only the architecture misses it."""
    path = _weight_files(copy)[-1]
    _, header = safetensors_header(path)
    name = max(header, key=lambda n: header[n]["data_offsets"][1])
    shape, nbytes = header[name]["shape"], header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
    _rewrite_header(path, lambda h: h.pop(name), drop_tail=nbytes)
    index = json.loads((copy / INDEX).read_text())
    del index["weight_map"][name]
    (copy / INDEX).write_text(json.dumps(index))
    lines = (copy / JOURNAL_NAME).read_text().splitlines()
    t = json.loads(lines[0])["tensors"].index(name)
    (copy / JOURNAL_NAME).write_text("\n".join(line for line in lines if f'"t":{t},' not in line) + "\n")
    _reseal(copy)
    code, problems, _ = _verify(capsys, str(copy))
    assert code == 1
    assert problems == [f"tensor '{name}' of llama (shape {shape}) is missing"]


def test_dtype_other_than_config(capsys, copy):
    """config.json says float16; every tensor of the merge is F32."""
    _edit_config(copy, dtype="float16", torch_dtype="float16")
    names = sorted(json.loads((copy / INDEX).read_text())["weight_map"])
    code, problems, _ = _verify(capsys, str(copy))
    assert code == 1
    assert problems == [f"tensor '{n}' is F32 but config.json says float16" for n in names]
    assert len(problems) == 39


def test_tensor_outside_the_architecture_is_a_warning(capsys, copy):
    """An extra tensor in a file of its own, listed in the index: a warning, not a failure."""
    save_file({"model.extra_probe.weight": torch.zeros(8)}, copy / "model-extra.safetensors", metadata={"format": "pt"})
    index = json.loads((copy / INDEX).read_text())
    index["weight_map"]["model.extra_probe.weight"] = "model-extra.safetensors"
    (copy / INDEX).write_text(json.dumps(index))
    _reseal(copy)
    code, problems, warnings = _verify(capsys, str(copy))
    assert (code, problems) == (0, [])
    assert warnings == ["tensor 'model.extra_probe.weight' is not part of the llama architecture"]


def test_quick_reads_no_tensor_data(capsys, copy):
    """``--quick`` on data damaged in every file passes (a full verify fails), reads a few KB
    through read() and leaves no data pages in the page cache beyond the kernel's readahead."""
    files = _weight_files(copy)
    for path in files:
        data_start, _ = safetensors_header(path)
        middle = data_start + (path.stat().st_size - data_start) // 2 // 4 * 4  # an F32 value's low byte
        with open(path, "r+b") as fh:
            fh.seek(middle)
            low = fh.read(1)[0]
            fh.seek(middle)
            fh.write(bytes([low ^ 0x01]))  # its last mantissa bit: still finite
    code, problems, _ = _verify(capsys, str(copy))
    assert code == 1 and len(problems) == len(files) and all("fail their checksum" in p for p in problems)
    assert _verify(capsys, "--quick", str(copy))[0] == 0  # warm up: imports read files once
    for path in files:
        evict(path)
    evictable = all(resident_bytes(p) == 0 for p in files)
    before = read_chars()
    code, problems, warnings = _verify(capsys, "--quick", str(copy))
    read = read_chars() - before
    assert (code, problems, warnings) == (0, [], [])
    data_bytes = sum(p.stat().st_size - safetensors_header(p)[0] for p in files)
    assert data_bytes > 800_000
    # config.json, the index and the headers: a few KB.
    assert read < 64 * 1024, f"verify --quick read {read} bytes through read() ({data_bytes} data bytes)"
    if not evictable:
        pytest.skip("this filesystem keeps the files in memory (tmpfs?): page-cache residency cannot be checked")
    pulled = {p.name: resident_bytes(p, safetensors_header(p)[0]) for p in files}
    assert sum(pulled.values()) <= len(files) * 128 * 1024, f"data pages in the page cache after verify --quick: {pulled}"


def test_a_merge_says_when_the_architecture_could_not_be_checked(llama_family, tmp_path, caplog):
    """A model folder whose config.json transformers cannot build (here it has no model_type):
    the merge succeeds, and says, not only in the report, that tensor names went unchecked."""
    base, experts = llama_family
    folders = []
    for src in [base, *experts]:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        (dst / "config.json").write_text("{}")
        folders.append(dst)
    with caplog.at_level("WARNING", logger="distmerge.engine.finalize"):
        report = run_merge(make_config("task_arithmetic", folders[0], folders[1:], [0.6, 0.3]), tmp_path / "out",
                           progress=False)
    said = [r.getMessage() for r in caplog.records if r.name == "distmerge.engine.finalize"]
    assert said == [f"verify: {tmp_path / 'out' / 'config.json'}: transformers cannot build model_type None; "
                    "tensor names were not checked against it"]
    assert report["verify"]["warnings"] == [said[0].removeprefix("verify: ")]

