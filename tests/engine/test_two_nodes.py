"""The same merge on a simulated two-node Ray cluster gives the same bytes, with work on both."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from distmerge.engine.run import run_merge
from tests.helpers import file_bytes, make_config


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_two_node_cluster_same_bytes_both_nodes_work(llama_family, tmp_path):
    base, experts = llama_family
    cfg = make_config("task_arithmetic", base, experts, [0.5, [0.1, 0.9]], execution={"shard_size": "8KB"})
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    run_merge(cfg, tmp_path / "local", progress=False)
    script = textwrap.dedent(f"""
        import json
        from ray.cluster_utils import Cluster
        from distmerge.config import parse_config
        from distmerge.engine.run import run_merge
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "object_store_memory": 80 * 2**20}})
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        cfg = parse_config(json.load(open({str(tmp_path / "config.json")!r})))
        report = run_merge(cfg, {str(tmp_path / "cluster")!r}, ray_address=cluster.address, workers=4, progress=False)
        import ray
        ray.shutdown()
        cluster.shutdown()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert file_bytes(tmp_path / "cluster") == file_bytes(tmp_path / "local")
    report = json.loads((tmp_path / "cluster" / "merge_report.json").read_text())
    assert len(report["nodes"]) == 2, report["nodes"]
    assert all(n["units"] > 0 and n["bytes_written"] > 0 for n in report["nodes"].values())
