"""huggingface_hub itself against tests/remote/hub_server.py: metadata, downloads, ranges, errors."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from distmerge.testing.hub_server import HubServer, repo_sha

REPO = "org/tiny"
DATA = bytes(range(256)) * 41  # 10496 bytes
FILES = ["config.json", "model.safetensors", "sub/notes.txt"]
WEIGHTS = (REPO, "model.safetensors")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(DATA)
    (root / "sub" / "notes.txt").write_text("hello")
    return root


@pytest.fixture
def hub(folder: Path) -> Iterator[HubServer]:
    with HubServer({REPO: folder}) as server:
        yield server


@pytest.fixture
def hf_endpoint(monkeypatch: pytest.MonkeyPatch, hub: HubServer, tmp_path: Path) -> Path:
    """Point an already imported huggingface_hub at the server; returns the hub cache dir.

    huggingface_hub reads HF_ENDPOINT (and HF_HUB_CACHE) once, at import, into ``constants``; the
    download URL template is built from it then too. Setting the variable afterwards only reaches
    processes started later (e.g. Ray workers), so this process patches the constants themselves.
    """
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_model_info_and_file_listing(hub: HubServer) -> None:
    api = HfApi(endpoint=hub.url)
    info = api.model_info(REPO, revision="main")
    assert info.id == REPO and info.sha == repo_sha(REPO) and len(info.sha) == 40
    assert sorted(s.rfilename for s in info.siblings or []) == FILES
    assert api.model_info(REPO, revision=info.sha).sha == info.sha
    assert api.model_info(REPO).sha == info.sha
    sizes = {s.rfilename: s.size for s in api.model_info(REPO, files_metadata=True).siblings or []}
    assert sizes["model.safetensors"] == len(DATA)
    assert sorted(api.list_repo_files(REPO, revision="main")) == FILES
    top = {(type(e).__name__, e.path) for e in api.list_repo_tree(REPO)}
    assert top == {("RepoFile", "config.json"), ("RepoFile", "model.safetensors"), ("RepoFolder", "sub")}
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/notes.txt"]


def test_hf_hub_download_through_hf_endpoint(hub: HubServer, hf_endpoint: Path) -> None:
    path = Path(hf_hub_download(REPO, "model.safetensors", revision="main"))  # no endpoint=
    assert path.read_bytes() == DATA
    assert hf_endpoint in path.parents and path.parent.name == repo_sha(REPO)
    assert hub.requests[WEIGHTS] == 2  # HEAD for the metadata, then GET
    assert hub.data_requests[WEIGHTS] == 1 and hub.bytes_served[WEIGHTS] == len(DATA)
    hub.reset_counters()
    assert Path(hf_hub_download(REPO, "model.safetensors", revision=repo_sha(REPO))) == path
    assert hub.data_requests[WEIGHTS] == 0 and hub.bytes_served[WEIGHTS] == 0  # from the cache
    assert Path(hf_hub_download(REPO, "sub/notes.txt")).read_text() == "hello"
    assert HfApi().model_info(REPO).sha == repo_sha(REPO)


def test_hf_endpoint_env_is_read_at_import(hub: HubServer) -> None:
    code = "from huggingface_hub import HfApi; print(HfApi().model_info('org/tiny').sha)"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repo_sha(REPO)


def test_range_get_head_and_full_get(hub: HubServer) -> None:
    url = f"{hub.url}/{REPO}/resolve/main/model.safetensors"
    part = requests.get(url, headers={"Range": "bytes=100-1099"}, timeout=10)
    assert part.status_code == 206 and part.content == DATA[100:1100]
    assert part.headers["Content-Range"] == f"bytes 100-1099/{len(DATA)}"
    assert hub.bytes_served[WEIGHTS] == 1000
    # a suffix, an open end, an end past the file (clipped)
    for header, expected in [("bytes=-16", DATA[-16:]), ("bytes=10400-", DATA[10400:]), ("bytes=9-99999", DATA[9:])]:
        assert requests.get(url, headers={"Range": header}, timeout=10).content == expected
    bad = requests.get(url, headers={"Range": f"bytes={len(DATA)}-"}, timeout=10)
    assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(DATA)}"
    full = requests.get(url, timeout=10)
    assert full.status_code == 200 and full.content == DATA and "Content-Range" not in full.headers
    head = requests.head(url, timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(DATA))
    assert head.headers["X-Repo-Commit"] == repo_sha(REPO)
    assert head.headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert hub.requests[WEIGHTS] == 7 and hub.data_requests[WEIGHTS] == 6


def test_errors_map_to_huggingface_hub_exceptions(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v9")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(REPO, revision="v9")
    kw = {"endpoint": hub.url, "cache_dir": tmp_path / "cache"}
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", **kw)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="v9", **kw)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.bin", **kw)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "sub", **kw)  # a folder is not a file
    raw = requests.head(f"{hub.url}/org/missing/resolve/main/config.json", timeout=10)
    assert raw.status_code == 401 and raw.headers["X-Error-Code"] == "RepoNotFound"


def test_token_is_required_when_set(folder: Path, tmp_path: Path) -> None:
    with HubServer({REPO: folder}, token="hf_secret") as hub:
        api = HfApi(endpoint=hub.url)
        with pytest.raises(RepositoryNotFoundError) as anonymous:
            api.model_info(REPO, token=False)
        assert anonymous.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as wrong:
            api.model_info(REPO, token="hf_wrong")
        assert wrong.value.response.status_code == 401
        assert not isinstance(wrong.value, RepositoryNotFoundError)
        assert api.model_info(REPO, token="hf_secret").private
        kw = {"endpoint": hub.url, "cache_dir": tmp_path / "cache"}
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(REPO, "config.json", token=False, **kw)
        path = hf_hub_download(REPO, "config.json", token="hf_secret", **kw)
        assert Path(path).read_text() == '{"model_type": "llama"}'


def test_dropped_connections(hub: HubServer, tmp_path: Path) -> None:
    url = f"{hub.url}/{REPO}/resolve/main/model.safetensors"
    hub.drop_next(2)
    assert requests.head(url, timeout=10).status_code == 200  # HEAD is not a data request
    for _ in range(2):
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=10)
    assert requests.get(url, timeout=10).content == DATA
    assert hub.dropped == 2 and hub.data_requests[WEIGHTS] == 3
    hub.reset_counters()
    hub.drop_next(1)  # hf_hub_download's http_get retries a disconnect (after a 1 s sleep)
    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == DATA
    assert hub.dropped == 1 and hub.data_requests[WEIGHTS] == 2
    assert hub.bytes_served[WEIGHTS] == len(DATA)


def test_close_frees_the_port_and_idle_connections(folder: Path) -> None:
    before = set(threading.enumerate())
    with requests.Session() as session:  # keeps its keep-alive connection open past close()
        with HubServer({REPO: folder}) as hub:
            assert session.get(f"{hub.url}/api/models/{REPO}", timeout=10).json()["sha"] == repo_sha(REPO)
            assert set(threading.enumerate()) - before  # serve_forever + the connection's handler
            port = int(hub.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 5
        while set(threading.enumerate()) - before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not set(threading.enumerate()) - before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
