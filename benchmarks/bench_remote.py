"""Remote inputs and outputs against local disk: the same merge from and to S3 and Cloud Storage, from a Hub endpoint.

    .venv/bin/python -m benchmarks.bench_remote --model-gb 0.5 --repeat 3
    .venv/bin/python -m benchmarks.bench_remote --model-gb 0.5 --repeat 3 --ways local,gs,local_to_gs,gs_to_gs

Three synthetic bf16 Llama-shaped models (base + 2 experts) are written locally, uploaded to an
S3-compatible server (moto, in memory) and served by a Hub-compatible HTTP server, both on
loopback (``distmerge.testing``), so the figures measure distmerge's remote path (range
requests, retries, one request per span, bytes copied into tensors) and the servers' own cost,
not a network. Each repeat runs the task_arithmetic merge three ways in one Ray session, the
local one first (inputs evicted from the page cache), and reports each remote run as a ratio to
the local one plus the bytes fetched per input byte the merge needed (``bytes_fetched`` /
``bytes_read`` of the merge report, and what the servers counted, planner headers included).
Two more ways write the output to S3 (multipart uploads from the workers, verified by reading it
back by ranges, small files and index uploaded last): from local inputs, and from S3 inputs;
the bytes uploaded per output byte and a plain client's sequential multipart upload of the same
bytes (the server's write bound) are reported beside them. The ``gs`` ways do the same against
:class:`~distmerge.testing.gcs_server.GcsServer` (Cloud Storage's XML and JSON APIs, in memory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.io_baseline import evict, safetensors_files
from benchmarks.synthetic import write_family

WORK = Path(__file__).parent / "_work"
BUCKET = "bench-models"
OUT_BUCKET = "bench-merges"


def merge_config(names: dict[str, str]) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": names["base"], "dtype": "bfloat16",
            "models": [{"model": names[m], "parameters": {"weight": w}} for m, w in (("expert1", 0.6), ("expert2", 0.5))]}


def timed_merge(names: dict[str, str], out: Path | str) -> tuple[float, dict]:
    from distmerge.config import parse_config
    from distmerge.engine.run import run_merge

    started = time.perf_counter()
    report = run_merge(parse_config(merge_config(names)), out, overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    if isinstance(out, Path):
        shutil.rmtree(out)
    return seconds, report


def plain_upload(client, data_size: int, part: int = 32 * 2**20) -> float:
    """Seconds one plain client takes to upload ``data_size`` bytes as one multipart upload of
    ``part``-byte parts sent one at a time: the server's write bound."""
    block = os.urandom(part)
    started = time.perf_counter()
    upload = client.create_multipart_upload(Bucket=OUT_BUCKET, Key="bound/file")["UploadId"]
    parts = []
    for n, offset in enumerate(range(0, data_size, part), start=1):
        etag = client.upload_part(Bucket=OUT_BUCKET, Key="bound/file", UploadId=upload, PartNumber=n,
                                  Body=block[:min(part, data_size - offset)])["ETag"]
        parts.append({"PartNumber": n, "ETag": etag})
    client.complete_multipart_upload(Bucket=OUT_BUCKET, Key="bound/file", UploadId=upload,
                                     MultipartUpload={"Parts": parts})
    seconds = time.perf_counter() - started
    client.delete_object(Bucket=OUT_BUCKET, Key="bound/file")
    return seconds


def plain_gcs_upload(endpoint: str, data_size: int, part: int = 32 * 2**20) -> float:
    """The same write bound against the Cloud Storage server (XML API multipart upload)."""
    import re

    import requests

    block = os.urandom(part)
    url = f"{endpoint}/{OUT_BUCKET}/bound/file"
    started = time.perf_counter()
    upload = re.search(r"<UploadId>(.*?)</UploadId>", requests.post(f"{url}?uploads", timeout=60).text)[1]
    parts = []
    for n, offset in enumerate(range(0, data_size, part), start=1):
        answer = requests.put(url, params={"partNumber": n, "uploadId": upload},
                              data=block[:min(part, data_size - offset)], timeout=600)
        parts.append(f"<Part><PartNumber>{n}</PartNumber><ETag>{answer.headers['ETag']}</ETag></Part>")
    body = f"<CompleteMultipartUpload>{''.join(parts)}</CompleteMultipartUpload>"
    requests.post(url, params={"uploadId": upload}, data=body, timeout=600).raise_for_status()
    return time.perf_counter() - started


def plain_reads(read_span, files: list[tuple[str, int]], span: int = 64 * 10**6) -> float:
    """Seconds one plain client takes to fetch every byte of ``files`` in ``span``-byte ranges,
    one request at a time: the server's own bound, which distmerge's remote runs are divided by."""
    started = time.perf_counter()
    for name, size in files:
        for offset in range(0, size, span):
            read_span(name, offset, min(span, size - offset))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-gb", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ways", default="local,s3,hub,local_to_s3,s3_to_s3",
                        help="comma-separated, local first: local, s3, hub, gs, local_to_s3, s3_to_s3, local_to_gs, gs_to_gs")
    args = parser.parse_args()
    chosen = args.ways.split(",")
    if chosen[0] != "local":
        parser.error("--ways: local must come first (every remote way is a ratio to it)")
    logging.basicConfig(level=logging.WARNING)
    from distmerge.engine.cluster import connect
    from distmerge.testing.gcs_server import GcsServer
    from distmerge.testing.hub_server import HubServer
    from distmerge.testing.s3_server import S3Server

    root = WORK / f"remote-{args.model_gb:g}GB"
    base, experts = write_family(root / "models", int(args.model_gb * 1e9), n_experts=2)
    folders = {"base": base, "expert1": experts[0], "expert2": experts[1]}
    inputs = safetensors_files(list(folders.values()))
    input_bytes = sum(p.stat().st_size for p in inputs)
    rows = []
    with S3Server() as s3, HubServer({f"bench/{m}": p for m, p in folders.items()}) as hub, GcsServer() as gcs:
        client = s3.client()
        for bucket in (BUCKET, OUT_BUCKET):
            gcs.create_bucket(bucket)
        for m, folder in folders.items():
            gcs.upload_folder(folder, BUCKET, m)
        client.create_bucket(Bucket=BUCKET)
        client.create_bucket(Bucket=OUT_BUCKET)
        for m, folder in folders.items():
            for f in sorted(folder.iterdir()):
                client.upload_file(str(f), BUCKET, f"{m}/{f.name}")
        # Every Ray worker started from here on inherits the endpoints and credentials.
        os.environ.update(s3.env(), **gcs.env(), HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(root / "hf-cache"),
                          DISTMERGE_CACHE=str(root / "cache"))
        connect(None)
        import requests

        sizes = [(f"{m}/{f.name}", f.stat().st_size) for m, p in folders.items() for f in sorted(p.glob("*.safetensors"))]
        bounds = {
            "s3": lambda: plain_reads(lambda k, o, n: client.get_object(
                Bucket=BUCKET, Key=k, Range=f"bytes={o}-{o + n - 1}")["Body"].read(), sizes),
            "hub": lambda: plain_reads(lambda k, o, n: requests.get(
                f"{hub.url}/bench/{k.split('/')[0]}/resolve/main/{k.split('/')[1]}",
                headers={"Range": f"bytes={o}-{o + n - 1}"}, timeout=600).content, sizes),
            "gs": lambda: plain_reads(lambda k, o, n: requests.get(
                f"{gcs.endpoint}/{BUCKET}/{k}", headers={"Range": f"bytes={o}-{o + n - 1}"}, timeout=600).content,
                sizes),
        }
        local, remote = {m: str(p) for m, p in folders.items()}, {m: f"s3://{BUCKET}/{m}" for m in folders}
        out_url = f"s3://{OUT_BUCKET}/merged"
        on_gs, gs_url = {m: f"gs://{BUCKET}/{m}" for m in folders}, f"gs://{OUT_BUCKET}/merged"
        every_way: dict[str, tuple[dict[str, str], Path | str]] = {
            "local": (local, root / "out-local"), "s3": (remote, root / "out-s3"),
            "hub": ({m: f"bench/{m}" for m in folders}, root / "out-hub"), "gs": (on_gs, root / "out-gs"),
            "local_to_s3": (local, out_url), "s3_to_s3": (remote, out_url),
            "local_to_gs": (local, gs_url), "gs_to_gs": (on_gs, gs_url)}
        ways = {w: every_way[w] for w in chosen}
        for _ in range(args.repeat):
            row: dict[str, float] = {}
            for way, (names, out) in ways.items():
                evict(inputs)
                for server in (s3, hub, gcs):
                    server.reset_counters()
                seconds, report = timed_merge(names, out)
                served = sum(s3.bytes_sent.values()) + sum(hub.bytes_served.values()) + sum(gcs.bytes_sent.values())
                row[f"{way}_s"] = round(seconds, 2)
                if way.endswith(("_to_s3", "_to_gs")):
                    row[f"{way}_ratio"] = round(seconds / row["local_s"], 2)
                    row[f"{way}_uploaded_per_output"] = round(report["bytes_uploaded"] / report["bytes_written"], 4)
                    if way.endswith("_to_s3"):
                        row["s3_write_bound_s"] = round(plain_upload(client, report["bytes_uploaded"]), 2)
                    else:
                        row["gs_write_bound_s"] = round(plain_gcs_upload(gcs.endpoint, report["bytes_uploaded"]), 2)
                elif way != "local":
                    row[f"{way}_ratio"] = round(seconds / row["local_s"], 2)
                    row[f"{way}_server_bound_s"] = round(bounds[way](), 2)
                    row[f"{way}_ratio_to_server_bound"] = round(seconds / row[f"{way}_server_bound_s"], 2)
                    row[f"{way}_fetched_per_needed"] = round(report["bytes_fetched"] / report["bytes_read"], 4)
                    row[f"{way}_served_per_needed"] = round(served / report["bytes_read"], 4)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    summary.update(input_gb=round(input_bytes / 1e9, 3), cpus=os.cpu_count(), repeat=args.repeat)
    print("median:", json.dumps(summary))


if __name__ == "__main__":
    main()
