"""Merges written to ``s3://bucket/prefix``: multipart uploads from the workers, resumable, verifiable.

The S3 server (moto behind a counting proxy) is on loopback; every merge is the real CLI in a
subprocess, compared byte for byte with the same merge written to a local directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distmerge.testing.s3_server import S3Server
from tests.remote.remote_merges import (
    SIDE_FILES,
    cli,
    kill_then_resume,
    merge,
    records,
    write_config,
)
from tests.remote.test_s3_models import upload

OUT_BUCKET = "merges-bucket"
IN_BUCKET = "inputs-bucket"


@pytest.fixture(scope="module")
def family(parts_family):
    return parts_family


@pytest.fixture(scope="module")
def server(family):
    base, experts = family
    with S3Server() as s3:
        client = s3.client()
        for bucket in (OUT_BUCKET, IN_BUCKET):
            client.create_bucket(Bucket=bucket)
        for name, folder in (("base", base), ("e1", experts[0]), ("e2", experts[1])):
            upload(client, folder, f"team/{name}", IN_BUCKET)
        yield s3


@pytest.fixture
def env(server, tmp_path):
    server.reset_counters()
    return {**os.environ, **server.env(), "RAY_ADDRESS": "", "DISTMERGE_CACHE": str(tmp_path / "cache")}


def stored(server: S3Server, prefix: str) -> dict[str, bytes]:
    client = server.client()
    listed = client.list_objects_v2(Bucket=OUT_BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: client.get_object(Bucket=OUT_BUCKET, Key=o["Key"])["Body"].read()
            for o in listed}


@pytest.fixture(scope="module")
def local_merge(parts_local_merge):
    return parts_local_merge


def remote_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "remote.yml", {m: f"s3://{IN_BUCKET}/team/{m}" for m in ("base", "e1", "e2")})


@pytest.mark.slow
def test_s3_to_s3_equals_the_local_merge_each_part_uploaded_once_and_verifies(server, env, local_merge, tmp_path):
    server.drop_next(2, "PUT")  # two uploads cut (a part, or the journal's copy): botocore sends them again
    run = merge(env, remote_config(tmp_path), f"s3://{OUT_BUCKET}/runs/first")
    assert run.returncode == 0, run.stderr[-3000:]
    assert server.dropped["PUT"] == 2
    out = stored(server, "runs/first")
    model = "model-00001-of-00001.safetensors"
    assert out[model] == (local_merge / model).read_bytes()
    for name in SIDE_FILES:
        assert out[name] == (local_merge / name).read_bytes(), name
    assert ".distmerge.lock" not in out  # released
    # Each part was sent once, and the parts tile the file: no byte was uploaded twice.
    journal = out["distmerge_journal.jsonl"]
    parts = records(journal, "part")
    puts = server.part_puts[f"{OUT_BUCKET}/runs/first/{model}"]
    assert len(parts) >= 2 and len(parts) <= puts <= len(parts) + 2  # a dropped part was sent again
    received = server.bytes_received[f"{OUT_BUCKET}/runs/first/{model}"]
    if puts == len(parts):  # the drops hit other objects: each byte of the file was sent once
        assert received == len(out[model])
    else:
        assert len(out[model]) < received < 2 * len(out[model])
    assert records(journal, "complete")
    report = json.loads(out["merge_report.json"])
    assert report["out_dir"] == f"s3://{OUT_BUCKET}/runs/first"
    assert report["bytes_uploaded"] == len(out[model]) and report["verify"]["ok"]
    assert sum(n["parts_uploaded"] for n in report["nodes"].values()) == len(parts)
    index = json.loads(out["model.safetensors.index.json"])
    assert index["weight_map"] == json.loads((local_merge / "model.safetensors.index.json").read_text())["weight_map"]
    # Rerunning is a no-op; `distmerge verify` reads the objects back by ranges.
    again = merge(env, remote_config(tmp_path), f"s3://{OUT_BUCKET}/runs/first")
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-2000:]
    checked = cli(env, "verify", f"s3://{OUT_BUCKET}/runs/first")
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout + checked.stderr[-2000:]
    # A model object replaced afterwards (same size, one byte changed) fails verification.
    damaged = bytearray(out[model])
    damaged[-100] ^= 0x40
    server.client().put_object(Bucket=OUT_BUCKET, Key=f"runs/first/{model}", Body=bytes(damaged))
    checked = cli(env, "verify", f"s3://{OUT_BUCKET}/runs/first")
    assert checked.returncode == 1 and "fail their checksum" in checked.stdout, checked.stdout
    assert f"s3://{OUT_BUCKET}/runs/first/{model}" in checked.stdout and "distmerge-verify" not in checked.stdout


@pytest.mark.slow
def test_a_killed_run_resumes_keeping_the_parts_the_store_holds(server, env, local_merge, tmp_path):
    model = "model-00001-of-00001.safetensors"
    kill_then_resume(server, env, remote_config(tmp_path), f"s3://{OUT_BUCKET}/runs/killed",
                     lambda: stored(server, "runs/killed"), f"{OUT_BUCKET}/runs/killed/{model}",
                     (local_merge / model).read_bytes())


def test_outputs_that_cannot_be_written_say_why_in_one_line(server, env, tmp_path, family):
    base, experts = family
    cfg = write_config(tmp_path / "cfg.yml", {"base": str(base), "e1": str(experts[0]), "e2": str(experts[1])})
    client = server.client()
    client.put_object(Bucket=OUT_BUCKET, Key="foreign/notes.txt", Body=b"someone else's")
    cases = {
        "s3://no-such-bucket-here/out": "the bucket does not exist",
        f"s3://{OUT_BUCKET}/foreign": "holds objects and no distmerge journal",
        "az://some-container/out": "an output on az:// is not supported",
        "hf://team/merged-model": "cannot be written to the Hugging Face Hub directly",
        "s3://Bad_Bucket/out": "'Bad_Bucket' is not a valid bucket name",
        "s3://AKIAKEY:secretvalue@merges-bucket/out": "credentials in the URL are refused",
    }
    for out, message in cases.items():
        run = cli(env, "merge", str(cfg), out, "--no-progress")
        assert run.returncode == 2 and message in run.stderr, (out, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and "secretvalue" not in run.stderr
    remote = remote_config(tmp_path)  # the output is, is inside or contains an input: refused
    for out, message in ((f"s3://{IN_BUCKET}/team", "contains base_model"),
                         (f"s3://{IN_BUCKET}/team/e1/merged", "is inside models[0]"),
                         (f"s3://{IN_BUCKET}/team/e2/", "the output is models[1]")):
        run = cli(env, "merge", str(remote), out, "--no-progress")
        assert run.returncode == 2 and message in run.stderr, (out, run.stderr[-2000:])
    run = cli({**env, "AWS_ACCESS_KEY_ID": "wrong-key"}, "merge", str(cfg), f"s3://{OUT_BUCKET}/x", "--no-progress")
    assert run.returncode == 2 and "access denied" in run.stderr and "wrong-key" not in run.stderr, run.stderr[-2000:]
    # --overwrite still refuses foreign objects; both flags delete them.
    run = cli(env, "merge", str(cfg), f"s3://{OUT_BUCKET}/foreign", "--no-progress", "--overwrite")
    assert run.returncode == 2 and "notes.txt" in run.stderr
    assert client.get_object(Bucket=OUT_BUCKET, Key="foreign/notes.txt")["Body"].read() == b"someone else's"


@pytest.mark.slow
def test_overwrite_deletes_only_what_distmerge_wrote_and_a_live_lock_stops_a_second_run(server, env, tmp_path,
                                                                                         family, local_merge):
    base, experts = family
    cfg = write_config(tmp_path / "cfg.yml", {"base": str(base), "e1": str(experts[0]), "e2": str(experts[1])})
    client, url = server.client(), f"s3://{OUT_BUCKET}/shared/out"
    # Another run holds the output (a fresh heartbeat from another machine): refused, nothing touched.
    holder = json.dumps({"host": "other-node", "pid": 7, "run": "theirs"}).encode()
    client.put_object(Bucket=OUT_BUCKET, Key="shared/out/.distmerge.lock", Body=holder)
    run = cli(env, "merge", str(cfg), url, "--no-progress")
    assert run.returncode == 2 and "another merge is writing this output (host other-node, pid 7" in run.stderr
    assert stored(server, "shared/out") == {".distmerge.lock": holder}
    client.delete_object(Bucket=OUT_BUCKET, Key="shared/out/.distmerge.lock")
    # A finished output, a foreign object beside it, and an unfinished upload of an older run.
    assert merge(env, cfg, url).returncode == 0
    client.put_object(Bucket=OUT_BUCKET, Key="shared/out/notes.txt", Body=b"mine")
    run = cli(env, "merge", str(cfg), url, "--no-progress", "--overwrite", "--seed", "3")
    assert run.returncode == 2 and "notes.txt" in run.stderr and "--overwrite-foreign" in run.stderr
    client.delete_object(Bucket=OUT_BUCKET, Key="shared/out/notes.txt")
    journal = stored(server, "shared/out")["distmerge_journal.jsonl"]
    (earlier,) = records(journal, "upload")
    stale = client.create_multipart_upload(Bucket=OUT_BUCKET, Key="shared/out/stale.safetensors")["UploadId"]
    run = merge(env, cfg, url, "--overwrite")  # same inputs: replaced by an identical merge
    assert run.returncode == 0, run.stderr[-2000:]
    out = stored(server, "shared/out")
    assert out["model-00001-of-00001.safetensors"] == (local_merge / "model-00001-of-00001.safetensors").read_bytes()
    assert records(out["distmerge_journal.jsonl"], "upload")[0]["id"] != earlier["id"]
    uploads = client.list_multipart_uploads(Bucket=OUT_BUCKET, Prefix="shared/out/").get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [stale]  # not distmerge's: left alone
