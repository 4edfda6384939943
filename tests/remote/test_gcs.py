"""Models and merges under ``gs://bucket/prefix``, against a Cloud Storage server on loopback.

The server requires a bearer token that only its own OAuth endpoint issues, and the processes
under test find it through ``GOOGLE_APPLICATION_CREDENTIALS`` (a service account key file):
google-auth signs the JWT and exchanges it for the token as it would against Google. Merges are the real CLI in a subprocess,
compared byte for byte with the same merge from and into local folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from distmerge.checkpoint import Checkpoint
from distmerge.errors import CheckpointError, ConfigError
from distmerge.io.safetensors import read_rows
from distmerge.testing.gcs_server import GcsServer
from tests.remote.remote_merges import (
    MODEL,
    SIDE_FILES,
    cli,
    kill_then_resume,
    merge,
    records,
    write_config,
)

IN_BUCKET, OUT_BUCKET = "team-models", "team-merges"
TOKEN = "ya29.test-access-token"


@pytest.fixture(scope="module")
def family(parts_family):
    return parts_family


@pytest.fixture(scope="module")
def server(family, tmp_path_factory):
    base, experts = family
    with GcsServer(token=TOKEN) as gcs:
        for bucket in (IN_BUCKET, OUT_BUCKET):
            gcs.create_bucket(bucket)
        for name, folder in (("base", base), ("e1", experts[0]), ("e2", experts[1])):
            gcs.upload_folder(folder, IN_BUCKET, f"team/{name}")
        gcs.adc = gcs.credentials_file(tmp_path_factory.mktemp("adc") / "application_default_credentials.json")
        yield gcs


@pytest.fixture
def env(server, tmp_path):
    server.reset_counters()
    return {**os.environ, **server.env(), "GOOGLE_APPLICATION_CREDENTIALS": str(server.adc), "RAY_ADDRESS": "",
            "DISTMERGE_CACHE": str(tmp_path / "cache")}


@pytest.fixture
def in_process(env, monkeypatch):
    for key in ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK", "GOOGLE_APPLICATION_CREDENTIALS", "DISTMERGE_CACHE"):
        monkeypatch.setenv(key, env[key])


def remote_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "remote.yml", {m: f"gs://{IN_BUCKET}/team/{m}" for m in ("base", "e1", "e2")})


def stored(server: GcsServer, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) + 1:]: server.get(OUT_BUCKET, k) for k in server.keys(OUT_BUCKET, prefix + "/")}


@pytest.fixture(scope="module")
def local_merge(parts_local_merge):
    return parts_local_merge


def test_a_gs_model_reads_like_its_folder_pinned_to_the_planned_generation(server, family, in_process):
    from distmerge.config import parse_config
    from distmerge.io import remote as remote_io
    from distmerge.plan import build_plan

    base, experts = family
    remote, local = Checkpoint.open(f"gs://{IN_BUCKET}/team/e1"), Checkpoint.open(experts[0])
    assert remote.tensors.keys() == local.tensors.keys()
    info = max(remote.tensors.values(), key=lambda t: t.nbytes)
    assert torch.equal(read_rows(info, 3, 17), read_rows(local.tensors[info.name], 3, 17))
    # The plan pins each weight object to the generation it saw.
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": f"gs://{IN_BUCKET}/team/base",
                        "models": [{"model": f"gs://{IN_BUCKET}/team/e1", "parameters": {"weight": 1.0}}]})
    pins = dict(build_plan(cfg, 64 * 1000**2).pinned_versions())
    expected = {f"gs://{IN_BUCKET}/{k}": str(server.objects[(IN_BUCKET, k)].generation)
                for k in server.keys(IN_BUCKET, "team/") if k.endswith(".safetensors")
                and k.startswith(("team/base/", "team/e1/"))}
    assert pins == expected and len(pins) >= 2
    # An object replaced after planning (same size, other bytes) fails its reads.
    remote_io.pin_versions([(info.file, pins[info.file])])
    key = info.file.split(f"{IN_BUCKET}/", 1)[1]
    original = server.get(IN_BUCKET, key)
    changed = bytearray(original)
    changed[-1] ^= 0x01
    server.put(IN_BUCKET, key, bytes(changed))
    try:
        with pytest.raises(CheckpointError, match="changed since the merge was planned"):
            read_rows(info, 0, 2)
    finally:
        generation = server.put(IN_BUCKET, key, original)
        remote_io.pin_versions([(info.file, str(generation))])
    assert torch.equal(read_rows(info, 0, 2), read_rows(local.tensors[info.name], 0, 2))


def test_remote_inputs_that_cannot_be_read_say_why(server, env, in_process, monkeypatch, family):
    cases = {f"gs://{IN_BUCKET}/team/nobody": "no objects under this prefix",
             "gs://no-such-bucket/team/base": "the bucket does not exist"}
    for location, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            Checkpoint.open(location)
    # A server that keeps cutting bodies: a clear error once the retries are spent.
    info = next(iter(Checkpoint.open(f"gs://{IN_BUCKET}/team/e2").tensors.values()))
    monkeypatch.setenv("DISTMERGE_REMOTE_ATTEMPTS", "2")
    server.drop_next(5)
    try:
        with pytest.raises(CheckpointError, match=r"e2/.*(ChunkedEncodingError|ProtocolError|IncompleteRead)"):
            read_rows(info, 0, info.shape[0])
    finally:
        server.drop_next(0)
    # AIM statistics at gs://: fetched once, identified by the generation.
    from distmerge.io.remote_files import _FETCHED, fetch_file

    server.put(IN_BUCKET, "aim/stats.safetensors", b"not really statistics")
    fetched = fetch_file(f"gs://{IN_BUCKET}/aim/stats.safetensors", "aim.stats", ConfigError, 1 << 20)
    assert fetched.path.read_bytes() == b"not really statistics"
    assert fetched.identity == ["stats.safetensors", 21, str(server.objects[(IN_BUCKET, "aim/stats.safetensors")].generation)]
    _FETCHED.clear()
    with pytest.raises(ConfigError, match="gs://team-models/aim/none: the aim.stats does not exist in the bucket"):
        fetch_file(f"gs://{IN_BUCKET}/aim/none", "the aim.stats", ConfigError, 1 << 20)


@pytest.mark.slow
def test_gs_to_gs_equals_the_local_merge_each_part_sent_once_and_verifies(server, env, local_merge, tmp_path):
    server.drop_next(1, "GET")  # one body cut midway: fetched again from where it broke
    run = merge(env, remote_config(tmp_path), f"gs://{OUT_BUCKET}/runs/first")
    assert run.returncode == 0, run.stderr[-3000:]
    assert server.dropped["GET"] == 1 and "retrying" in run.stderr
    assert server.token_requests >= 1  # google-auth exchanged the refresh token for the access token
    out = stored(server, "runs/first")
    assert out[MODEL] == (local_merge / MODEL).read_bytes()
    for name in SIDE_FILES:
        assert out[name] == (local_merge / name).read_bytes(), name
    assert ".distmerge.lock" not in out and not server.uploads
    journal = out["distmerge_journal.jsonl"]
    parts = records(journal, "part")
    assert len(parts) >= 2 and server.part_puts[f"{OUT_BUCKET}/runs/first/{MODEL}"] == len(parts)
    report = json.loads(out["merge_report.json"])
    assert report["out_dir"] == f"gs://{OUT_BUCKET}/runs/first" and report["verify"]["ok"]
    assert report["bytes_uploaded"] == len(out[MODEL])
    for worker in report["workers"]:  # each worker fetched its units' rows (one span twice, at most)
        assert worker["bytes_read"] <= worker["bytes_fetched"] <= 2 * worker["bytes_read"], worker
    assert TOKEN not in run.stderr + json.dumps(report) + journal.decode()
    again = merge(env, remote_config(tmp_path), f"gs://{OUT_BUCKET}/runs/first")
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-2000:]
    checked = cli(env, "verify", f"gs://{OUT_BUCKET}/runs/first")
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr[-2000:]
    damaged = bytearray(out[MODEL])
    damaged[-100] ^= 0x40
    server.put(OUT_BUCKET, f"runs/first/{MODEL}", bytes(damaged))
    checked = cli(env, "verify", f"gs://{OUT_BUCKET}/runs/first")
    assert checked.returncode == 1 and "fail their checksum" in checked.stdout, checked.stdout
    assert f"gs://{OUT_BUCKET}/runs/first/{MODEL}" in checked.stdout


@pytest.mark.slow
def test_a_killed_gs_run_resumes_keeping_the_parts_the_store_holds(server, env, local_merge, tmp_path):
    kill_then_resume(server, env, remote_config(tmp_path), f"gs://{OUT_BUCKET}/runs/killed",
                     lambda: stored(server, "runs/killed"), f"{OUT_BUCKET}/runs/killed/{MODEL}",
                     (local_merge / MODEL).read_bytes())


def test_gs_outputs_and_credentials_that_cannot_work_say_why_in_one_line(server, env, tmp_path, family):
    base, experts = family
    cfg = write_config(tmp_path / "cfg.yml", {"base": str(base), "e1": str(experts[0]), "e2": str(experts[1])})
    server.put(OUT_BUCKET, "foreign/notes.txt", b"someone else's")
    bad = server.credentials_file(tmp_path / "deleted-key.json", trusted=False)
    cases = [
        (env, "gs://no-such-bucket/out", "the bucket does not exist"),
        (env, f"gs://{OUT_BUCKET}/foreign", "holds objects and no distmerge journal"),
        ({**env, "GOOGLE_APPLICATION_CREDENTIALS": str(bad)}, f"gs://{OUT_BUCKET}/x",
         "credentials in use could not get an access token"),
        ({**env, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json")}, f"gs://{OUT_BUCKET}/x",
         "no Google Cloud credentials found"),
    ]
    for run_env, out, message in cases:
        run = cli(run_env, "merge", str(cfg), out, "--no-progress")
        assert run.returncode == 2 and message in run.stderr, (out, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and "PRIVATE KEY" not in run.stderr
        assert len(run.stderr.strip().splitlines()) <= 3, run.stderr
    remote = remote_config(tmp_path)
    for out, message in ((f"gs://{IN_BUCKET}/team", "contains base_model"),
                         (f"gs://{IN_BUCKET}/team/e1/merged", "is inside models[0]")):
        run = cli(env, "merge", str(remote), out, "--no-progress")
        assert run.returncode == 2 and message in run.stderr, (out, run.stderr[-2000:])
    assert server.get(OUT_BUCKET, "foreign/notes.txt") == b"someone else's"
    assert server.keys(OUT_BUCKET, "x/") == []


def test_an_emulator_without_credentials_is_reached_anonymously(tmp_path, monkeypatch):
    from distmerge.io.gcs import stat

    with GcsServer() as open_server:
        open_server.create_bucket("open-bucket")
        generation = open_server.put("open-bucket", "a/b.bin", b"12345")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", open_server.endpoint.removeprefix("http://"))
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        got = stat("gs://open-bucket/a/b.bin", "a test object")
        assert (got.size, got.version) == (5, str(generation)) and open_server.token_requests == 0


def test_calibrate_writes_statistics_to_gs_and_stats_reads_them_there(server, env, tmp_path, family):
    base, experts = family
    data = yaml.safe_load(write_config(tmp_path / "c.yml", {"base": str(base), "e1": str(experts[0]),
                                                            "e2": str(experts[1])}).read_text())
    texts = tmp_path / "calibration.jsonl"
    texts.write_text("".join(json.dumps({"text": f"line {i} of the data"}) + "\n" for i in range(8)))
    data["aim"] = {"omega": 0.4, "calibration": {"dataset": str(texts), "n_samples": 4, "block_size": 64}}
    cfg = tmp_path / "aim.yml"
    cfg.write_text(yaml.safe_dump(data))
    url = f"gs://{OUT_BUCKET}/aim/stats.safetensors"
    run = cli(env, "calibrate", str(cfg), "--out", url, "--no-progress")
    assert run.returncode == 0 and f"to {url}" in run.stdout, run.stderr[-3000:]
    written = server.get(OUT_BUCKET, "aim/stats.safetensors")
    shown = cli(env, "stats", url)
    assert shown.returncode == 0 and "layer" in shown.stdout.lower(), shown.stderr[-2000:]
    # The same statistics as a local --out (calibration is deterministic).
    local = cli(env, "calibrate", str(cfg), "--out", str(tmp_path / "stats.safetensors"), "--no-progress")
    assert local.returncode == 0, local.stderr[-2000:]
    from safetensors.torch import load
    assert load(written).keys() == load((tmp_path / "stats.safetensors").read_bytes()).keys()
    for name, tensor in load(written).items():
        assert torch.equal(tensor, load((tmp_path / "stats.safetensors").read_bytes())[name]), name
    # Replacing statistics is fine; anything else is not, nor writing inside an input.
    server.put(OUT_BUCKET, "aim/notes.safetensors", b"a note, not statistics")
    refused = cli(env, "calibrate", str(cfg), "--out", f"gs://{OUT_BUCKET}/aim/notes.safetensors", "--no-progress")
    assert refused.returncode == 2 and "exists and is not an AIM statistics file" in refused.stderr, refused.stderr
    assert server.get(OUT_BUCKET, "aim/notes.safetensors") == b"a note, not statistics"
    remote_cfg = tmp_path / "remote-aim.yml"
    remote_cfg.write_text(yaml.safe_dump({**yaml.safe_load(remote_config(tmp_path).read_text()), "aim": data["aim"]}))
    inside = cli(env, "calibrate", str(remote_cfg), "--out", f"gs://{IN_BUCKET}/team/base/stats.safetensors",
                 "--no-progress")
    assert inside.returncode == 2 and "is inside base_model" in inside.stderr, inside.stderr
    assert cli(env, "stats", f"gs://{OUT_BUCKET}/aim/none.safetensors").returncode == 2
