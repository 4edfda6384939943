"""boto3 itself against tests/remote/s3_server.py: objects, ranges, listings, multipart, errors, cuts."""

from __future__ import annotations

import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, ResponseStreamingError

from distmerge.testing.s3_server import S3Server

BUCKET = "models-bucket"
DATA = bytes(range(256)) * 41  # 10496 bytes
KEY = "org/tiny/model.safetensors"
NAME = f"{BUCKET}/{KEY}"
# botocore 1.44's default: standard mode, 3 attempts in all ("max_attempts" would count retries)
RETRIES = Config(retries={"mode": "standard", "total_max_attempts": 3})
NO_RETRIES = Config(retries={"mode": "standard", "total_max_attempts": 1})


@pytest.fixture
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=KEY, Body=DATA)
        server.reset_counters()
        yield server


@pytest.fixture
def client(s3: S3Server) -> Any:
    return s3.client(RETRIES)


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]


def test_put_get_ranges_and_counters(s3: S3Server, client: Any) -> None:
    client.put_object(Bucket=BUCKET, Key="org/tiny/config.json", Body=b'{"a": 1}')
    assert s3.bytes_received == {f"{BUCKET}/org/tiny/config.json": 8}
    assert client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == DATA
    part = client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=100-1099")
    assert part["ContentRange"] == f"bytes 100-1099/{len(DATA)}" and part["ContentLength"] == 1000
    assert part["Body"].read() == DATA[100:1100]
    assert client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=10400-")["Body"].read() == DATA[10400:]
    assert client.head_object(Bucket=BUCKET, Key=KEY)["ContentLength"] == len(DATA)  # not a GET
    assert s3.get_requests[NAME] == 3
    assert s3.bytes_sent[NAME] == len(DATA) + 1000 + len(DATA) - 10400
    assert s3.ranges[NAME] == [(100, 1099), (10400, len(DATA) - 1)]
    s3.reset_counters()
    assert not s3.get_requests and not s3.bytes_sent and not s3.ranges and not s3.bytes_received


def test_list_objects_with_prefix_and_delimiter(client: Any) -> None:
    for key in ["org/tiny/config.json", "org/tiny/sub/a.bin", "org/other/x.bin", "top.txt"]:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    page = client.list_objects_v2(Bucket=BUCKET, Prefix="org/tiny/", Delimiter="/")
    assert [o["Key"] for o in page["Contents"]] == ["org/tiny/config.json", KEY]
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["org/tiny/sub/"]
    top = client.list_objects_v2(Bucket=BUCKET, Delimiter="/")
    assert [o["Key"] for o in top["Contents"]] == ["top.txt"]
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["org/"]
    assert client.list_objects_v2(Bucket=BUCKET, Prefix="org/", MaxKeys=2)["IsTruncated"]
    sizes = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert sizes[KEY] == len(DATA) and len(sizes) == 5


def test_multipart_upload_parts_out_of_order(s3: S3Server, client: Any) -> None:
    first, last = b"a" * (5 << 20), b"tail" * 1000  # all parts but the last: 5 MiB at least
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="big.bin")["UploadId"]
    etags = {}
    for number, body in [(2, last), (1, first)]:
        etags[number] = client.upload_part(Bucket=BUCKET, Key="big.bin", UploadId=upload,
                                           PartNumber=number, Body=body)["ETag"]  # fmt: skip
    listed = client.list_parts(Bucket=BUCKET, Key="big.bin", UploadId=upload)["Parts"]
    assert [p["PartNumber"] for p in listed] == [1, 2]
    parts = [{"PartNumber": n, "ETag": etags[n]} for n in (1, 2)]
    done = client.complete_multipart_upload(Bucket=BUCKET, Key="big.bin", UploadId=upload,
                                            MultipartUpload={"Parts": parts})  # fmt: skip
    assert done["ETag"].endswith('-2"')
    assert client.get_object(Bucket=BUCKET, Key="big.bin")["Body"].read() == first + last
    assert s3.bytes_received[f"{BUCKET}/big.bin"] == len(first) + len(last)


def test_credentials_and_missing_things(s3: S3Server, client: Any) -> None:
    wrong = S3Server(access_key="other-key")
    wrong.endpoint = s3.endpoint
    with pytest.raises(ClientError) as exc:
        wrong.client(NO_RETRIES).get_object(Bucket=BUCKET, Key=KEY)
    assert _code(exc) == "InvalidAccessKeyId" and exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as exc:
        wrong.client(NO_RETRIES).list_buckets()
    assert _code(exc) == "InvalidAccessKeyId"
    with pytest.raises(ClientError) as exc:  # HEAD: no body, so botocore's code is the status
        wrong.client(NO_RETRIES).head_object(Bucket=BUCKET, Key=KEY)
    assert _code(exc) == "403"
    conn = http.client.HTTPConnection(*s3.endpoint[len("http://") :].split(":"), timeout=10)
    conn.request("GET", f"/{BUCKET}/{KEY}")  # anonymous
    resp = conn.getresponse()
    assert resp.status == 403 and b"<Code>AccessDenied</Code>" in resp.read()
    conn.close()
    with pytest.raises(ClientError) as exc:
        client.get_object(Bucket="missing-bucket", Key=KEY)
    assert _code(exc) == "NoSuchBucket"
    with pytest.raises(ClientError) as exc:
        client.get_object(Bucket=BUCKET, Key="org/tiny/nope.bin")
    assert _code(exc) == "NoSuchKey"
    with pytest.raises(ClientError) as exc:
        client.head_object(Bucket=BUCKET, Key="org/tiny/nope.bin")
    assert _code(exc) == "404"
    assert s3.get_requests[NAME] == 0 and not s3.bytes_sent  # errors carry no object data


def test_presigned_urls_carry_the_key_id_in_the_query(s3: S3Server, client: Any) -> None:
    v4 = s3.client(Config(signature_version="s3v4"))
    for signer in (client, v4):  # botocore presigns with SigV2 by default, AWSAccessKeyId=
        url = signer.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": KEY})
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == DATA
    assert "X-Amz-Credential=testing-key" in url and s3.bytes_sent[NAME] == 2 * len(DATA)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(url.replace("testing-key", "other-key"), timeout=10)
    assert exc.value.code == 403 and b"InvalidAccessKeyId" in exc.value.read()


def test_dropped_get_cuts_the_body(s3: S3Server, client: Any) -> None:
    s3.drop_next(1)
    client.head_object(Bucket=BUCKET, Key=KEY)  # not a data request: nothing dropped
    answer = client.get_object(Bucket=BUCKET, Key=KEY)  # status and headers arrive: no retry
    assert answer["ContentLength"] == len(DATA)
    with pytest.raises(ResponseStreamingError, match="IncompleteRead"):
        answer["Body"].read()
    assert s3.dropped["GET"] == 1 and s3.bytes_sent[NAME] == len(DATA) // 2
    assert client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == DATA
    s3.reset_counters()
    s3.drop_next(2)  # boto3's managed download (s3transfer) retries cut bodies; here 6 ranged GETs
    out, config = io.BytesIO(), TransferConfig(multipart_threshold=1024, multipart_chunksize=2048)
    client.download_fileobj(BUCKET, KEY, out, Config=config)
    parts = [(a, min(a + 2047, len(DATA) - 1)) for a in range(0, len(DATA), 2048)]
    assert out.getvalue() == DATA and s3.dropped["GET"] == 2 and s3.get_requests[NAME] == 8
    assert sorted(set(s3.ranges[NAME])) == parts and len(s3.ranges[NAME]) == 8
    cut = [(a, b) for (a, b), n in Counter(s3.ranges[NAME]).items() if n == 2]  # any 2: concurrent
    assert len(cut) == 2 and s3.bytes_sent[NAME] == len(DATA) + sum((b - a + 1) // 2 for a, b in cut)


def test_dropped_put_is_retried_by_botocore(s3: S3Server, client: Any) -> None:
    s3.drop_next(1, "PUT")
    client.put_object(Bucket=BUCKET, Key="a.bin", Body=b"x" * 100)
    assert s3.dropped["PUT"] == 1 and s3.bytes_received[f"{BUCKET}/a.bin"] == 200
    s3.drop_next(1, "PUT")
    with pytest.raises(ConnectionClosedError):
        s3.client(NO_RETRIES).put_object(Bucket=BUCKET, Key="b.bin", Body=b"y" * 100)
    with pytest.raises(ClientError):
        client.head_object(Bucket=BUCKET, Key="b.bin")  # never reached moto
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="c.bin")["UploadId"]
    s3.drop_next(3, "PUT")  # every attempt of botocore's 3
    with pytest.raises(ConnectionClosedError):
        client.upload_part(Bucket=BUCKET, Key="c.bin", UploadId=upload, PartNumber=1, Body=b"z")
    assert s3.dropped["PUT"] == 5


def test_env_points_another_process_here(s3: S3Server) -> None:
    code = ("import boto3; c = boto3.client('s3'); print(c.meta.endpoint_url); "
            f"print(c.get_object(Bucket={BUCKET!r}, Key={KEY!r})['Body'].read() == {DATA!r})")  # fmt: skip
    env = {**os.environ, **s3.env()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [s3.endpoint, "True"]
    assert s3.get_requests[NAME] == 1 and s3.bytes_sent[NAME] == len(DATA)


def test_close_frees_ports_and_threads() -> None:
    before = set(threading.enumerate())
    with S3Server() as s3:
        client = s3.client()  # its pool keeps a keep-alive connection open past close()
        client.create_bucket(Bucket=BUCKET)
        assert client.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0
        ports = [int(s3.endpoint.rsplit(":", 1)[1]), s3.upstream[1]]
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not set(threading.enumerate()) - before
    for port in ports:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with S3Server() as again:  # moto's store was reset
        assert again.client().list_buckets()["Buckets"] == []
