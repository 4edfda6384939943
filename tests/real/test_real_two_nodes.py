"""Staged calibration of SmolLM2 across two real Ray nodes, planned from the nodes' memory.

Two raylets on loopback (``ray start --head`` and ``ray start --address``), each offering Ray
1 GB of memory: less than SmolLM2's float32 weights plus a stage worker, so ``stages: auto``
must split the model, one stage per node. The calibration runs as users run it
(``distmerge calibrate --ray-address``), its statistics must equal a whole-model forward, the
statistics file must say which node ran which layers, and a stage actor killed mid-pass must
be replaced without leaving a wrong or partial statistic.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from distmerge.aim import load_calibration_sequences, load_statistics
from distmerge.config import CalibrationConfig
from tests.aim.test_aim_pipeline import RTOL, reference_statistics
from tests.cluster.loopback import DISTMERGE, RayCluster, cluster_processes, loopback_cluster
from tests.real.test_real_calibration import largest_error

pytestmark = [pytest.mark.real, pytest.mark.slow]

NODE_MEMORY = 1_000_000_000  # below SmolLM2's ~0.54 GB float32 weights + ~0.53 GB per stage worker


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with loopback_cluster(nodes=2, num_cpus=1, memory=NODE_MEMORY) as c:
        yield c


def config_file(tmp: Path, model: Path, n_samples: int) -> Path:
    path = tmp / "calibrate.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(model),
        "models": [{"model": str(model), "parameters": {"weight": 1.0}}],
        "aim": {"omega": 0.4, "stages": "auto", "micro_batch_size": 1,
                "calibration": {"dataset": "builtin", "n_samples": n_samples, "block_size": 128, "seed": 0}}}))
    return path


def calibrate(cluster: RayCluster, config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(DISTMERGE), "calibrate", str(config), "--out", str(out), "--no-progress",
                             "--ray-address", f"127.0.0.1:{cluster.gcs_port}"],
                            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check(model: Path, n_samples: int, out: Path, log: str) -> list[dict]:
    """Statistics equal the whole-model forward; the provenance names two nodes; returns it."""
    stats, meta = load_statistics(out)
    sequences = load_calibration_sequences(
        CalibrationConfig(dataset="builtin", n_samples=n_samples, block_size=128, seed=0), model)
    err, where = largest_error(stats, reference_statistics(model, sequences))
    assert err <= RTOL, f"relative error {err} at {where}\n{log[-3000:]}"
    stages = json.loads(meta["stages"])
    assert len(stages) == 2, stages
    assert [s["layers"] for s in stages] == [[0, stages[0]["layers"][1]], [stages[0]["layers"][1], 30]]
    assert len({s["node_id"] for s in stages}) == 2, stages  # one stage per node: both nodes ran one
    for i, s in enumerate(stages):
        assert f"stage {i}: layers {s['layers'][0]}-{s['layers'][1] - 1}" in log and s["node_id"][:12] in log
    return stages


def test_two_node_pipeline_replaces_a_killed_stage_actor_and_equals_the_whole_model(
        cluster: RayCluster, smollm2_bf16: Path, tmp_path: Path) -> None:
    """One calibration does it all (each costs a minute on two CPUs): a stage actor is killed in
    a forward pass, replaced, and the statistics still equal the whole-model forward."""
    n = 48
    out = tmp_path / "stats.safetensors"
    proc = calibrate(cluster, config_file(tmp_path, smollm2_bf16, n), out)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for p in cluster_processes(str(cluster.temp_dir)):  # this cluster's actor busy in a forward pass
            try:
                if "StageActor.forward" in " ".join(p.cmdline()):
                    p.send_signal(signal.SIGKILL)
                    killed = p.pid
                    break
            except psutil.Error:
                continue
        time.sleep(0.2)
    log, _ = proc.communicate(timeout=600)
    assert killed is not None, "no stage actor was seen in a forward pass to kill\n" + log[-3000:]
    assert proc.returncode == 0, log[-4000:]
    assert "a stage actor died" in log and "attempt 2 of 3" in log, log[-3000:]
    check(smollm2_bf16, n, out, log)
    assert "most peaked modules" in log  # the table a user sees after calibrating
