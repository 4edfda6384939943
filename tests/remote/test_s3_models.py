"""Models under ``s3://bucket/prefix``, read from an S3-compatible server on loopback (moto).

boto3 finds the server and the credentials where it always does (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``...): these tests set the environment, nothing in distmerge's config.
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
from distmerge.testing.s3_server import S3Server
from tests.helpers import file_bytes, header_fetch

BUCKET = "models-bucket"


def upload(client, folder: Path, prefix: str, bucket: str = BUCKET) -> None:
    for f in sorted(folder.iterdir()):
        if f.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())


@pytest.fixture(scope="module")
def s3_models(llama_family):
    base, experts = llama_family
    folders = {"base": base, "expert-a": experts[0], "expert-b": experts[1]}
    with S3Server() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        for prefix, folder in folders.items():
            upload(client, folder, f"team/{prefix}")
        yield server, folders


@pytest.fixture
def s3(s3_models, monkeypatch, tmp_path):
    server, folders = s3_models
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DISTMERGE_CACHE", str(tmp_path / "cache"))
    server.reset_counters()
    return server, folders


def test_an_s3_model_opens_like_its_folder_reading_only_headers(s3):
    server, folders = s3
    local, remote = Checkpoint.open(folders["base"]), Checkpoint.open(f"s3://{BUCKET}/team/base")
    assert remote.label == f"s3://{BUCKET}/team/base" and remote.config == local.config
    for name, info in remote.tensors.items():
        mine = local.tensors[name]
        assert (info.dtype, info.shape, info.offset) == (mine.dtype, mine.shape, mine.offset)
        assert info.file == f"s3://{BUCKET}/team/base/{Path(mine.file).name}"
    for f in sorted(folders["base"].glob("*.safetensors")):
        assert server.bytes_sent[f"{BUCKET}/team/base/{f.name}"] == header_fetch(f), f.name
    # A trailing slash names the same model; the small files are cached by their ETags.
    again = Checkpoint.open(f"s3://{BUCKET}/team/base/")
    assert again.path == remote.path and again.tensors.keys() == remote.tensors.keys()


def test_rows_equal_the_local_rows_and_a_body_cut_midway_is_fetched_again(s3):
    server, folders = s3
    local, remote = Checkpoint.open(folders["expert-a"]), Checkpoint.open(f"s3://{BUCKET}/team/expert-a")
    name = max(local.tensors, key=lambda n: local.tensors[n].nbytes)
    info, rows = remote.tensors[name], local.tensors[name].shape[0]
    server.reset_counters()
    before = fetched_bytes()
    assert torch.equal(read_rows(info, 2, rows), read_rows(local.tensors[name], 2, rows))
    assert fetched_bytes() - before == info.span(2, rows)[1] == server.bytes_sent[info.file[5:]]
    server.drop_next(2)
    assert torch.equal(read_rows(info, 0, rows), read_rows(local.tensors[name], 0, rows))
    assert server.dropped["GET"] == 2


def test_wrong_credentials_a_missing_bucket_or_prefix_say_so(s3, monkeypatch):
    cases = {
        "s3://no-such-bucket/team/base": "the bucket does not exist",
        f"s3://{BUCKET}/team/nothing-here": "no objects under this prefix",
        "s3://Bad_Bucket/x": "not a valid bucket name",
        "az://container/model": "az:// is not a place distmerge reads models from",
    }
    for ref, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            Checkpoint.open(ref)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-key")
    with pytest.raises(CheckpointError, match="access denied .*InvalidAccessKeyId") as e:
        Checkpoint.open(f"s3://{BUCKET}/team/base")
    assert "testing-secret" not in str(e.value) and "wrong-key" not in str(e.value)


@pytest.mark.slow
def test_a_merge_from_s3_is_byte_identical_and_each_worker_fetches_its_rows(s3, tmp_path):
    server, folders = s3
    def config(names: dict[str, str]) -> dict:
        return {"merge_method": "ties", "base_model": names["base"],
                "parameters": {"density": 0.5}, "dtype": "bfloat16",
                "models": [{"model": names[r], "parameters": {"weight": w}}
                           for r, w in (("expert-a", 0.7), ("expert-b", 0.4))]}

    env = {**os.environ, "RAY_ADDRESS": ""}
    results = {}
    for kind, names in (("remote", {r: f"s3://{BUCKET}/team/{r}" for r in folders}),
                        ("local", {r: str(p) for r, p in folders.items()})):
        cfg = tmp_path / f"{kind}.yml"
        cfg.write_text(yaml.safe_dump(config(names)))
        server.drop_next(1 if kind == "remote" else 0)  # one body cut midway during the merge
        results[kind] = subprocess.run([sys.executable, "-m", "distmerge", "merge", str(cfg), str(tmp_path / kind),
                                        "--no-progress", "--workers", "2"], capture_output=True, text=True, env=env,
                                       timeout=600)
        assert results[kind].returncode == 0, results[kind].stderr[-3000:]
    assert file_bytes(tmp_path / "remote") == file_bytes(tmp_path / "local")
    report = json.loads((tmp_path / "remote" / "merge_report.json").read_text())
    # TIES reads each tensor twice (its statistics round, then the merge); the batches the
    # report counts are the merge's, and each worker fetched its units' rows (plus, for the
    # one whose body was cut, at most that one span again).
    for worker in report["workers"]:
        assert worker["bytes_read"] <= worker["bytes_fetched"] <= 2 * worker["bytes_read"], worker
    assert sum(w["bytes_fetched"] for w in report["workers"]) <= report["bytes_read"] * 1.5
    assert "retrying" in results["remote"].stderr


def test_a_server_that_keeps_dropping_gives_a_clear_error_after_the_retries(s3, monkeypatch):
    server, folders = s3
    remote = Checkpoint.open(f"s3://{BUCKET}/team/expert-b")
    info = next(iter(remote.tensors.values()))
    monkeypatch.setenv("DISTMERGE_REMOTE_ATTEMPTS", "2")
    server.drop_next(10)
    with pytest.raises(CheckpointError, match="expert-b/.*ResponseStreamingError|IncompleteRead") as e:
        read_rows(info, 0, info.shape[0])
    assert "Traceback" not in str(e.value)
    server.drop_next(0)


def test_an_object_replaced_after_planning_fails_its_reads_instead_of_mixing_versions(s3, monkeypatch):
    from distmerge.io import remote as remote_io

    server, folders = s3
    monkeypatch.setattr(remote_io, "_PINNED", {})
    remote = Checkpoint.open(f"s3://{BUCKET}/team/expert-b")
    info = max(remote.tensors.values(), key=lambda t: t.nbytes)
    name = Path(info.file).name
    remote_io.pin_versions([(info.file, remote.source.versions[name][1])])
    local = Checkpoint.open(folders["expert-b"]).tensors[info.name]
    assert torch.equal(read_rows(info, 0, 2), read_rows(local, 0, 2))  # the planned version reads
    client, key = server.client(), f"team/expert-b/{name}"
    original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    changed = bytearray(original)
    changed[-1] ^= 0x01  # same size, other content: only its ETag tells
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(changed))
    try:
        with pytest.raises(CheckpointError, match="changed since the merge was planned") as e:
            read_rows(info, 0, 2)
        assert info.file in str(e.value)
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=original)
    assert torch.equal(read_rows(info, 0, 2), read_rows(local, 0, 2))  # the same bytes: the same ETag again


def test_a_plan_pins_every_s3_weight_file_to_the_etag_it_was_planned_with(s3):
    from distmerge.config import parse_config
    from distmerge.plan import build_plan

    server, folders = s3
    names = {r: f"s3://{BUCKET}/team/{r}" for r in folders}
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": names["base"],
                        "models": [{"model": names["expert-a"], "parameters": {"weight": 1.0}}]})
    pins = dict(build_plan(cfg, 64 * 1000**2).pinned_versions())
    client = server.client()
    expected = {}
    for role in ("base", "expert-a"):
        for f in sorted(folders[role].glob("*.safetensors")):
            head = client.head_object(Bucket=BUCKET, Key=f"team/{role}/{f.name}")
            expected[f"{names[role]}/{f.name}"] = head["ETag"]
    assert pins == expected and len(pins) >= 2
