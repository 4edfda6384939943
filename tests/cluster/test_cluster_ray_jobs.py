"""distmerge as a Ray job on a real two-node Ray cluster, the way cluster/README.md runs it.

The cluster is started by `ray start` (head + one joined node, one CPU each, loopback
addresses, token authentication with a token of its own) and jobs go through `ray job
submit`, so what is tested is the product path: the job's entrypoint joins the cluster
through RAY_ADDRESS, spreads batches over both nodes, logs its progress into the job log,
and leaves either a finished checkpoint or one that visibly is not.
The cluster and its isolation: :mod:`tests.cluster.loopback`.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.loopback import DISTMERGE, JOB_TIMEOUT, TERMINAL, RayCluster, loopback_cluster
from tests.helpers import file_bytes, make_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """Head + one worker node, 1 CPU and a 100 MB object store each, loopback only."""
    with loopback_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict[str, Path]:
    """A tiny base + 2 experts, the YAML config a user would write, and a local reference merge.

    The reference runs in this process on the session's local Ray: the cluster's processes
    get their token and addresses only through their own env, so the two never meet.
    """
    from distmerge.engine.run import run_merge
    from distmerge.testing.tiny import build_family

    root = tmp_path_factory.mktemp("cluster_job")
    base, experts = build_family(root / "models", n_experts=2)
    cfg = make_config("task_arithmetic", base, experts, [0.5, [0.1, 0.9]])
    config = root / "merge.yml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    local = root / "local"
    run_merge(cfg, local, progress=False)
    return {"root": root, "config": config, "local": local}


def _merge_cmd(inputs: dict[str, Path], out: Path, shard: str) -> list[str]:
    return [str(DISTMERGE), "merge", str(inputs["config"]), str(out), "--shard-size", shard]


@pytest.fixture(scope="module")
def first_job(ray_cluster: RayCluster, merge_inputs: dict[str, Path]) -> dict[str, Any]:
    """One merge submitted as a Ray job; its status, logs and output directory."""
    out = merge_inputs["root"] / "cluster"
    ray_cluster.submit("dm-merge-1", *_merge_cmd(merge_inputs, out, "8KB"), "--workers", "4")
    info = ray_cluster.wait("dm-merge-1")
    return {"info": info, "logs": ray_cluster.logs("dm-merge-1"), "out": out}


def test_job_merges_on_both_nodes_with_the_local_bytes(ray_cluster: RayCluster, merge_inputs: dict[str, Path],
                                                       first_job: dict[str, Any]) -> None:
    info, logs, out = first_job["info"], first_job["logs"], first_job["out"]
    assert info["status"] == "SUCCEEDED", logs[-4000:]
    assert info.get("driver_exit_code") in (0, None)
    # What the CLI shows a user, not only the REST API.
    status = ray_cluster.cli("job", "status", "--address", ray_cluster.dashboard, "dm-merge-1")
    assert "succeeded" in (status.stdout + status.stderr).lower()
    cli_logs = ray_cluster.cli("job", "logs", "--address", ray_cluster.dashboard, "dm-merge-1").stdout
    for line in ("plan:", "joined Ray cluster at ", "merge (task_arithmetic)", "merged task_arithmetic"):
        assert line in cli_logs, f"{line!r} missing from the job log:\n{cli_logs[-4000:]}"
    assert "100%" in cli_logs  # the progress bar reaches the job log although it is no TTY
    assert (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.partial"))
    assert file_bytes(out) == file_bytes(merge_inputs["local"])
    report = json.loads((out / "merge_report.json").read_text())
    assert len(report["nodes"]) == 2, report["nodes"]
    assert all(n["units"] > 0 and n["bytes_written"] > 0 for n in report["nodes"].values()), report["nodes"]


def test_second_submit_of_a_finished_merge_is_a_fast_noop(ray_cluster: RayCluster, merge_inputs: dict[str, Path],
                                                         first_job: dict[str, Any]) -> None:
    out = first_job["out"]
    assert first_job["info"]["status"] == "SUCCEEDED"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    ray_cluster.submit("dm-merge-2", *_merge_cmd(merge_inputs, out, "8KB"), "--workers", "4")
    info = ray_cluster.wait("dm-merge-2", timeout=90)
    logs = ray_cluster.logs("dm-merge-2")
    assert info["status"] == "SUCCEEDED", logs[-4000:]
    assert "already complete" in logs, logs[-4000:]
    assert "merge (task_arithmetic)" not in logs  # no work was redone
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert (info["end_time"] - info["start_time"]) / 1000 < 60


@pytest.fixture(scope="module")
def stopped_job(ray_cluster: RayCluster, merge_inputs: dict[str, Path]) -> dict[str, Any]:
    """A merge stopped with `ray job stop` once its merge phase is under way."""
    out = merge_inputs["root"] / "stopped"
    cmd = _merge_cmd(merge_inputs, out, "8KB")
    ray_cluster.submit("dm-stop-1", *cmd, "--workers", "2")
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        info = ray_cluster.status("dm-stop-1")
        if info["status"] in TERMINAL:
            pytest.fail(f"the merge ended ({info['status']}) before it could be stopped:\n"
                        f"{ray_cluster.logs('dm-stop-1')[-3000:]}")
        if "merge (task_arithmetic)" in ray_cluster.logs("dm-stop-1") and list(out.glob("*.partial")):
            break
        time.sleep(0.2)
    ray_cluster.cli("job", "stop", "--address", ray_cluster.dashboard, "dm-stop-1")
    info = ray_cluster.wait("dm-stop-1", timeout=60)
    time.sleep(1)  # tasks of the dead driver may finish their last rows; nothing finalizes them
    return {"info": info, "out": out, "cmd": cmd}


def test_stopped_job_leaves_nothing_that_looks_finished(stopped_job: dict[str, Any]) -> None:
    out = stopped_job["out"]
    assert stopped_job["info"]["status"] == "STOPPED"
    assert not (out / "model.safetensors.index.json").exists()
    assert list(out.glob("*.partial")), sorted(p.name for p in out.iterdir())


def test_rerun_after_stop_completes_the_output(ray_cluster: RayCluster, merge_inputs: dict[str, Path],
                                               stopped_job: dict[str, Any]) -> None:
    out = stopped_job["out"]
    ray_cluster.submit("dm-stop-2", *stopped_job["cmd"], "--workers", "2")
    info = ray_cluster.wait("dm-stop-2")
    logs = ray_cluster.logs("dm-stop-2")
    assert info["status"] == "SUCCEEDED", logs[-4000:]
    assert (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.partial"))
    assert file_bytes(out) == file_bytes(merge_inputs["local"])


def test_fingerprint_output_names_a_new_directory(ray_cluster: RayCluster, merge_inputs: dict[str, Path]) -> None:
    """The RayCronJob's OUT_DIR form: `{fingerprint}` becomes a content fingerprint."""
    nightly = merge_inputs["root"] / "nightly"
    ray_cluster.submit("dm-nightly-1", *_merge_cmd(merge_inputs, nightly / "merged-{fingerprint}", "64KB"))
    info = ray_cluster.wait("dm-nightly-1")
    assert info["status"] == "SUCCEEDED", ray_cluster.logs("dm-nightly-1")[-4000:]
    outs = list(nightly.iterdir())
    assert len(outs) == 1 and outs[0].name.startswith("merged-") and "{" not in outs[0].name, outs
    assert len(outs[0].name) > len("merged-") + 7
    assert (outs[0] / "model.safetensors.index.json").exists()
    assert file_bytes(outs[0]) == file_bytes(merge_inputs["local"])


@pytest.mark.parametrize("token", [None, "ab" * 32])
def test_a_head_refusing_this_process_token_is_refused_before_out_is_touched(
        ray_cluster: RayCluster, merge_inputs: dict[str, Path], tmp_path: Path, token: str | None) -> None:
    """No token, or not the head's: refused in one line in seconds, the earlier output kept
    (Ray itself retried for 20 s, then named neither the token nor the address given, after
    ``--overwrite`` had cleared OUT). With the head's token the same command joins and finds
    the merge done."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(merge_inputs["local"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {k: v for k, v in ray_cluster.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token of this machine's user
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    address = f"127.0.0.1:{ray_cluster.gcs_port}"
    command = [*_merge_cmd(merge_inputs, out, "8KB"), "--overwrite", "--no-progress", "--ray-address", address]
    started = time.monotonic()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    has = "the token this process has is not its" if token else "this process has none"
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"distmerge: error: Ray cluster at {address} (--ray-address or RAY_ADDRESS): the head asks for its auth "
        f"token and {has}; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the head's "
        "token, as `ray start --head` was given it (https://docs.ray.io/en/latest/ray-security/token-auth.html)"], \
        run.stderr[-3000:]
    assert time.monotonic() - started < 15
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    joined = subprocess.run([c for c in command if c != "--overwrite"], env={**ray_cluster.env, "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0 and "already complete" in joined.stdout, joined.stderr[-3000:]
