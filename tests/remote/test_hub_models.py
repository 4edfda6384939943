"""Models named by Hugging Face Hub id, read from a Hub-compatible server on loopback.

The server (:mod:`distmerge.testing.hub_server`) speaks the Hub's API to huggingface_hub itself, so
these tests exercise the real client: revisions resolved to commits, small files through the
Hub cache, weights by range requests, and the Hub's errors worded for users.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distmerge.checkpoint import Checkpoint
from distmerge.errors import CheckpointError
from distmerge.io.remote import fetched_bytes
from distmerge.io.safetensors import read_rows
from distmerge.testing.hub_server import HubServer, repo_sha
from tests.helpers import file_bytes, header_fetch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def hub(llama_family, tmp_path, monkeypatch):
    base, experts = llama_family
    repos = {"org/base": base, "org/expert-a": experts[0], "org/expert-b": experts[1]}
    with HubServer(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server, repos


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_a_hub_model_opens_like_its_folder_reading_only_headers(hub):
    server, repos = hub
    local = Checkpoint.open(repos["org/base"])
    remote = Checkpoint.open("org/base")
    sha = repo_sha("org/base")
    assert remote.label == "org/base" and remote.config == local.config
    assert sorted(remote.tensors) == sorted(local.tensors)
    for name, info in remote.tensors.items():
        mine = local.tensors[name]
        assert (info.dtype, info.shape, info.offset) == (mine.dtype, mine.shape, mine.offset)
        assert info.file == f"hf://org/base@{sha}/{Path(mine.file).name}"
    # The planner fetched headers only (the first 64 KiB of each file in one request).
    for f in weight_files(repos["org/base"]):
        assert server.bytes_served[("org/base", f.name)] == header_fetch(f), f.name
    assert (remote.path / "config.json").is_file() and str(remote.path).startswith(os.environ["HF_HUB_CACHE"])


def test_revisions_resolve_to_the_commit_and_wrong_names_say_what_is_wrong(hub):
    sha = repo_sha("org/base")
    for ref in ("org/base@main", f"org/base@{sha}", f"hf://org/base@{sha}"):
        files = {Path(t.file).name for t in Checkpoint.open(ref).tensors.values()}
        assert all(f.startswith("model-") for f in files)
        assert {t.file.split("/")[3] for t in Checkpoint.open(ref).tensors.values()} == {f"base@{sha}"}
    cases = {
        "org/base@no-such-branch": "no such revision",
        "org/missing": "no such repository on the Hub",
        "hf://org/base@main/sub": "subfolders are not supported",
    }
    for ref, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            Checkpoint.open(ref)
        assert "Traceback" not in str(e.value)


def test_a_gated_repository_asks_for_a_token(llama_family, tmp_path, monkeypatch):
    base, _ = llama_family
    with HubServer({"org/base": base}, token="hf_secret_token") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
        with pytest.raises(CheckpointError, match="HF_TOKEN") as e:
            Checkpoint.open("org/base")
        assert "hf_secret_token" not in str(e.value)
        monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
        assert Checkpoint.open("org/base").label == "org/base"


def test_rows_read_by_range_equal_the_local_rows_and_survive_dropped_connections(hub):
    server, repos = hub
    local, remote = Checkpoint.open(repos["org/expert-a"]), Checkpoint.open("org/expert-a")
    name = max(local.tensors, key=lambda n: local.tensors[n].nbytes)
    info, rows = remote.tensors[name], local.tensors[name].shape[0]
    server.reset_counters()
    before = fetched_bytes()
    got = read_rows(info, 1, rows - 1)
    assert torch.equal(got, read_rows(local.tensors[name], 1, rows - 1))
    span = info.span(1, rows - 1)[1]
    assert fetched_bytes() - before == span == server.bytes_served[("org/expert-a", Path(info.file).name)]
    server.drop_next(2)
    assert torch.equal(read_rows(info, 0, rows), read_rows(local.tensors[name], 0, rows))


def _merge_cli(config: dict, tmp_path: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"{out.name}.yml"
    cfg.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "distmerge", "merge", str(cfg), str(out), "--no-progress",
                           "--workers", "2"], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_a_merge_of_hub_models_is_byte_identical_to_the_local_merge(hub, tmp_path):
    server, repos = hub
    def config(names: dict[str, str]) -> dict:
        return {"merge_method": "task_arithmetic", "base_model": names["org/base"],
                "models": [{"model": names[r], "parameters": {"weight": w}}
                           for r, w in (("org/expert-a", 0.7), ("org/expert-b", 0.4))]}

    env = {**os.environ, "RAY_ADDRESS": ""}
    server.reset_counters()
    remote = _merge_cli(config({r: r for r in repos}), tmp_path, tmp_path / "remote", env)
    assert remote.returncode == 0, remote.stderr[-3000:]
    served = sum(server.bytes_served.values())
    local = _merge_cli(config({r: str(p) for r, p in repos.items()}), tmp_path, tmp_path / "local", env)
    assert local.returncode == 0, local.stderr[-3000:]
    assert file_bytes(tmp_path / "remote") == file_bytes(tmp_path / "local")
    assert json.loads((tmp_path / "remote" / "config.json").read_text()) == \
        json.loads((tmp_path / "local" / "config.json").read_text())
    # Bytes fetched: every tensor once (by the worker that merges it) plus each file's head at
    # most twice (the planner; a worker re-reads none) and the small files; nothing else.
    needed = sum(t.nbytes for r in repos.values() for t in Checkpoint.open(r).tensors.values())
    headers = sum(header_fetch(f) for p in repos.values() for f in weight_files(p))
    small = sum(f.stat().st_size for p in repos.values() for f in p.iterdir() if f.suffix != ".safetensors")
    assert needed <= served <= needed + 2 * headers + small, (served, needed, headers, small)
    # Per worker: it fetched exactly the bytes of the rows its units needed.
    report = json.loads((tmp_path / "remote" / "merge_report.json").read_text())
    assert report["bytes_fetched"] == report["bytes_read"] == needed
    assert len(report["workers"]) >= 1
    for worker in report["workers"]:
        assert worker["bytes_fetched"] == worker["bytes_read"] > 0, worker
    assert json.loads((tmp_path / "local" / "merge_report.json").read_text())["bytes_fetched"] == 0


def test_the_hub_cache_is_honoured_online_and_offline(hub, monkeypatch):
    import huggingface_hub

    server, repos = hub
    huggingface_hub.snapshot_download("org/base", endpoint=server.url, cache_dir=os.environ["HF_HUB_CACHE"])
    local = Checkpoint.open(repos["org/base"])
    name = next(iter(local.tensors))
    server.reset_counters()
    online = Checkpoint.open("org/base")  # the API is asked for the commit; the weights come from the cache
    assert torch.equal(read_rows(online.tensors[name], 0, 1), read_rows(local.tensors[name], 0, 1))
    assert not any(f.endswith(".safetensors") for _, f in server.bytes_served)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server.reset_counters()
    offline = Checkpoint.open("org/base")
    assert offline.tensors.keys() == local.tensors.keys() and sum(server.requests.values()) == 0
    with pytest.raises(CheckpointError, match="not in the Hub cache and HF_HUB_OFFLINE is set"):
        Checkpoint.open("org/expert-a")
