"""Plans are deterministic and valid; the CLI prints plans and turns user errors into messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distmerge.cli import main
from distmerge.config import parse_config
from distmerge.errors import ConfigError
from distmerge.plan import build_plan
from distmerge.plan_files import layout_files
from tests.helpers import evict, make_config, read_chars, resident_bytes, safetensors_header


def test_layout_files_gives_loadable_headers(tmp_path):
    entries = [("a", "F32", (3, 5)), ("b", "BF16", (7,)), ("c", "F16", (2, 2, 2)), ("d", "I64", ())]
    files, where = layout_files(entries, max_file_size=70)
    assert len(files) == 2
    for f in files:
        path = tmp_path / f.name
        path.write_bytes(f.header + b"\0" * (f.size - len(f.header)))
        loaded = load_file(path)
        for name, _dtype, shape in entries:
            if name in f.tensors:
                assert tuple(loaded[name].shape) == shape
        assert len(f.header) % 8 == 0
    assert where["a"][0] == 0 and where["d"][0] == 1


def test_plan_units_cover_every_row_once_and_are_deterministic(llama_family):
    base, experts = llama_family
    cfg = make_config("task_arithmetic", base, experts, [1, 1])
    p1, p2 = build_plan(cfg, 3000), build_plan(cfg, 3000)
    assert p1.units == p2.units and [f.header for f in p1.files] == [f.header for f in p2.files]
    for i, t in enumerate(p1.tensors):
        rows = [(u.row_start, u.row_end) for u in p1.units if u.tensor == i]
        assert rows[0][0] == 0 and rows[-1][1] == t.rows
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
        assert all(u.working_bytes <= 3000 or u.row_end - u.row_start == 1 for u in p1.units if u.tensor == i)


def test_unknown_parameter_and_missing_weight(llama_family, caplog):
    """A parameter the method does not use is a warning naming it (mergekit ignores it), with a
    suggestion when it looks like a typo; a required one missing is an error naming the model."""
    base, experts = llama_family
    typo = parse_config({"merge_method": "linear", "parameters": {"densty": 0.5},
                         "models": [{"model": str(experts[0]), "parameters": {"weight": 1, "wieght": 2}}]})
    plan = build_plan(typo)
    assert all(t.params is None or t.params.experts[0]["weight"] == 1.0 for t in plan.tensors)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "parameters: parameter 'densty' is not used by linear and is ignored" in warned
    assert "models[0]: parameter 'wieght' is not used by linear" in warned and "did you mean 'weight'?" in warned
    cfg = make_config("linear", None, experts, [1, 1])
    cfg = cfg.model_copy(update={"models": [cfg.models[0].model_copy(update={"parameters": {}}), cfg.models[1]]})
    with pytest.raises(ConfigError, match=r"models\[0\].*'weight' is required"):
        build_plan(cfg)
    with pytest.raises(ConfigError, match="merge_method: unknown method 'tiez'.*linear"):
        build_plan(make_config("tiez", base, experts, [1, 1]))
    with pytest.raises(ConfigError, match="needs a base model"):
        build_plan(make_config("task_arithmetic", None, experts, [1, 1]))


def test_cli_plan_and_user_error(llama_family, tmp_path, capsys):
    base, experts = llama_family
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump(make_config("task_arithmetic", base, experts, [1, 1]).model_dump(mode="json")))
    assert main(["plan", str(cfg), "--shard-size", "8KB"]) == 0
    out = capsys.readouterr().out
    assert "work units:" in out and "tensors:      39" in out and "peak memory per worker" in out
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: linear\nmodels: [{model: /nope, parameters: {weight: 1}}]\n")
    proc = subprocess.run([sys.executable, "-m", "distmerge", "merge", str(bad), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "models[0] /nope: folder does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()


def test_the_command_delivers_all_it_printed_and_its_exit_code(llama_family, tmp_path, capsys):
    """The installed ``distmerge`` ends without the interpreter's teardown (``cli.run``): what it
    printed into a pipe arrives whole, a merge's output is complete, and the exit code is main's."""
    base, experts = llama_family
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump(make_config("task_arithmetic", base, experts, [1, 1]).model_dump(mode="json")))
    assert main(["plan", str(cfg), "--shard-size", "1KB"]) == 0
    in_process = capsys.readouterr().out
    command = Path(sys.executable).with_name("distmerge")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe is block-buffered
    planned = subprocess.run([str(command), "plan", str(cfg), "--shard-size", "1KB"], capture_output=True, text=True,
                             timeout=120, env=buffered)
    assert planned.returncode == 0 and planned.stdout == in_process and "peak memory per worker" in in_process
    merged = subprocess.run([str(command), "merge", str(cfg), str(tmp_path / "out"), "--no-progress", "--executor",
                             "local"], capture_output=True, text=True, timeout=300, env=buffered)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert merged.stdout.startswith("merged task_arithmetic: 39 tensors, 823552 bytes")
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["verify"]["ok"]
    assert main(["verify", str(tmp_path / "out")]) == 0
    refused = subprocess.run([str(command), "merge", str(cfg), str(tmp_path / "out"), "--no-progress", "--seed", "5"],
                             capture_output=True, text=True, timeout=120, env=buffered)
    assert refused.returncode == 2 and "distmerge: error:" in refused.stderr and "Traceback" not in refused.stderr


@pytest.fixture(scope="module")
def weighty_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Base and two experts with 8 MB of weights each in two files: big enough that reading
    the data, or mapping it, stands out from the headers by orders of magnitude."""
    root = tmp_path_factory.mktemp("weighty")
    g = torch.Generator().manual_seed(0)
    folders = []
    for name in ("base", "expert1", "expert2"):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
        weight_map = {}
        for f in range(2):
            file = f"model-{f + 1:05d}-of-00002.safetensors"
            tensors = {f"model.layers.{2 * f + i}.mlp.weight": torch.randn(512, 1024, generator=g) for i in range(2)}
            save_file(tensors, folder / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        folders.append(folder)
    return folders[0], folders[1:]


def test_plan_reads_only_headers(weighty_family):
    """Observe what planning reads: the read() bytes of this process, and which data pages of
    the weight files are in the page cache afterwards (which also catches a planner that maps
    the files, e.g. safetensors' safe_open, whose reads never show up as read() bytes)."""
    base, experts = weighty_family
    files = sorted(p for folder in (base, *experts) for p in folder.glob("*.safetensors"))
    data = {p: (safetensors_header(p)[0], p.stat().st_size) for p in files}
    weight_bytes = sum(size - start for start, size in data.values())
    assert weight_bytes == 3 * 8 * 1024**2
    cfg = make_config("task_arithmetic", base, experts, [1, 1])
    build_plan(cfg)  # warm up: imports and lazily built tables read files once per process
    for p in files:
        evict(p)
    evictable = all(resident_bytes(p) == 0 for p in files)
    before = read_chars()
    plan = build_plan(cfg)
    read = read_chars() - before
    assert plan.read_bytes == 3 * sum(t.out_nbytes for t in plan.tensors) == weight_bytes
    # Headers, config.json and the index are a few KB in all; the weights are 24 MB.
    assert read < 64 * 1024, f"planning read {read} bytes through read() ({weight_bytes} weight bytes)"
    if not evictable:
        pytest.skip("this filesystem keeps the files in memory (tmpfs?): page-cache residency cannot be checked")
    # The kernel reads ahead a little past the header (16 KB for a first small read, 128 KB
    # at most by default); anything near a tensor's size means tensor data was read or mapped.
    pulled = {f"{p.parent.name}/{p.name}": resident_bytes(p, start) for p, (start, _) in data.items()}
    assert sum(pulled.values()) <= len(files) * 128 * 1024, f"data pages in the page cache after planning: {pulled}"


def test_cross_parameter_errors_name_the_model_entry(llama_family):
    """DELLA's density/epsilon check names the config entry whose values break it."""
    base, experts = llama_family
    cfg = parse_config({"merge_method": "della", "base_model": str(base), "models": [
        {"model": str(experts[0]), "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": str(experts[1]), "parameters": {"weight": 0.5, "density": 0.9}}]})
    with pytest.raises(ConfigError, match=r"^models\[1\]\.parameters \(tensor .*\): density 0\.9 and epsilon 0\.15"):
        build_plan(cfg)
