"""Two real Ray nodes (``ray start`` head + worker on loopback) merging models kept in S3.

No shared model volume: every node reads its batches' row ranges from the S3 server itself,
with the endpoint and credentials in each node's environment, as on a Kubernetes cluster
whose pods get them from a Secret.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from distmerge.testing.s3_server import S3Server
from tests.cluster.loopback import DISTMERGE, loopback_cluster
from tests.helpers import file_bytes
from tests.remote.test_s3_models import BUCKET, upload

pytestmark = pytest.mark.slow


def test_both_nodes_read_their_ranges_from_s3_and_the_merge_equals_the_local_one(llama_family, tmp_path):
    base, experts = llama_family
    folders = {"base": base, "expert-a": experts[0], "expert-b": experts[1]}

    def config(names: dict[str, str]) -> dict:
        return {"merge_method": "task_arithmetic", "base_model": names["base"],
                "models": [{"model": names[r], "parameters": {"weight": w}}
                           for r, w in (("expert-a", 0.6), ("expert-b", 0.5))]}

    with S3Server() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        for prefix, folder in folders.items():
            upload(client, folder, f"nodes/{prefix}")
        env = {**server.env(), "DISTMERGE_CACHE": str(tmp_path / "cache")}
        with loopback_cluster(nodes=2, num_cpus=1, env=env) as cluster:
            runs = {}
            for kind, names in (("remote", {r: f"s3://{BUCKET}/nodes/{r}" for r in folders}),
                                ("local", {r: str(p) for r, p in folders.items()})):
                cfg = tmp_path / f"{kind}.yml"
                cfg.write_text(yaml.safe_dump(config(names)))
                runs[kind] = subprocess.run(
                    [str(DISTMERGE), "merge", str(cfg), str(tmp_path / kind), "--no-progress", "--shard-size", "64KB",
                     "--ray-address", f"127.0.0.1:{cluster.gcs_port}"],
                    env=cluster.env, capture_output=True, text=True, timeout=300)
                assert runs[kind].returncode == 0, runs[kind].stdout[-2000:] + runs[kind].stderr[-3000:]
        served = sum(server.bytes_sent.values())
    assert file_bytes(tmp_path / "remote") == file_bytes(tmp_path / "local")
    report = json.loads((tmp_path / "remote" / "merge_report.json").read_text())
    nodes = report["nodes"]
    assert len(nodes) == 2, nodes
    for name, node in nodes.items():  # each node fetched exactly the rows of its own batches
        assert node["bytes_fetched"] == node["bytes_read"] > 0, (name, node)
    assert report["bytes_fetched"] == report["bytes_read"] <= served
