"""Two real Ray nodes (``ray start`` head + worker on loopback) merging models kept in S3 into S3.

No shared volume: every node reads its batches' row ranges from the S3 server itself and
uploads the parts it merged of the same output file, with the endpoint and credentials in each
node's environment, as on a Kubernetes cluster whose pods get them from a Secret.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from distmerge.testing.s3_server import S3Server
from distmerge.testing.tiny import build_family
from tests.cluster.loopback import DISTMERGE, loopback_cluster
from tests.helpers import file_bytes
from tests.remote.test_s3_models import BUCKET, upload
from tests.remote.test_s3_output import OUT_BUCKET, stored

OUT = f"s3://{OUT_BUCKET}/two-nodes"

pytestmark = pytest.mark.slow


def test_both_nodes_read_ranges_and_upload_parts_of_one_file_equal_to_the_local_merge(tmp_path):
    # Large enough for a merged file of several parts (8 MiB and up): 35 MB of bf16, one file.
    base, experts = build_family(tmp_path / "family", n_experts=2, hidden_size=512, intermediate_size=1536,
                                 num_hidden_layers=4, vocab_size=4096, max_shard_size="12MB")
    folders = {"base": base, "expert-a": experts[0], "expert-b": experts[1]}

    def config(names: dict[str, str]) -> dict:
        return {"merge_method": "task_arithmetic", "base_model": names["base"], "dtype": "bfloat16",
                "models": [{"model": names[r], "parameters": {"weight": w}}
                           for r, w in (("expert-a", 0.6), ("expert-b", 0.5))]}

    with S3Server() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        client.create_bucket(Bucket=OUT_BUCKET)
        for prefix, folder in folders.items():
            upload(client, folder, f"nodes/{prefix}")
        env = {**server.env(), "DISTMERGE_CACHE": str(tmp_path / "cache")}
        with loopback_cluster(nodes=2, num_cpus=1, env=env) as cluster:
            runs = {}
            for kind, names, out in (("remote", {r: f"s3://{BUCKET}/nodes/{r}" for r in folders}, OUT),
                                     ("local", {r: str(p) for r, p in folders.items()}, str(tmp_path / "local"))):
                cfg = tmp_path / f"{kind}.yml"
                cfg.write_text(yaml.safe_dump(config(names)))
                runs[kind] = subprocess.run(
                    [str(DISTMERGE), "merge", str(cfg), out, "--no-progress", "--shard-size", "16MB",
                     "--ray-address", f"127.0.0.1:{cluster.gcs_port}"],
                    env=cluster.env, capture_output=True, text=True, timeout=300)
                assert runs[kind].returncode == 0, runs[kind].stdout[-2000:] + runs[kind].stderr[-3000:]
        served = sum(server.bytes_sent.values())
        merged = stored(server, "two-nodes")
    model = "model-00001-of-00001.safetensors"
    assert {model: merged[model]} == file_bytes(tmp_path / "local")
    report = json.loads(merged["merge_report.json"])
    nodes = report["nodes"]
    assert len(nodes) == 2, nodes
    for name, node in nodes.items():  # each node fetched exactly the rows of its own batches ...
        assert node["bytes_fetched"] == node["bytes_read"] > 0, (name, node)
        assert node["parts_uploaded"] > 0, (name, node)  # ... and uploaded parts of the one output file
    assert report["bytes_fetched"] == report["bytes_read"] <= served
    assert report["files"] == [model] and report["bytes_uploaded"] == len(merged[model])
