"""distmerge as a Ray job on a real two-node Ray cluster, the way cluster/README.md runs it.

The cluster is started by `ray start` (head + one joined node, one CPU each, loopback
addresses, token authentication with a token of its own) and jobs go through `ray job
submit`, so what is tested is the product path: the job's entrypoint joins the cluster
through RAY_ADDRESS, spreads batches over both nodes, logs its progress into the job log,
and leaves either a finished checkpoint or one that visibly is not.

Isolation: the cluster lives in its own temp dir and ports, and its token is passed only to
the subprocesses that talk to it, so it never meets the session's `ray_local` Ray. Teardown
kills exactly the processes of this cluster (those whose command line names its temp dir,
and their descendants): `ray stop` would kill every Ray on the machine, other tests' too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.helpers import file_bytes, make_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RAY = BIN / "ray"
DISTMERGE = BIN / "distmerge"
START_TIMEOUT = 120
JOB_TIMEOUT = 150
CLI_TIMEOUT = 60
RUNTIME_ENV = '{"env_vars": {"PYTHONUNBUFFERED": "1"}}'
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    """A `ray start` cluster on loopback: where it lives and how to reach it."""

    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    log: list[str] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this cluster (its token in the env, nowhere else)."""
        proc = subprocess.run([str(RAY), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        self.log.append(f"$ ray {' '.join(args)}\n[{proc.returncode}] {proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        if check and proc.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def api(self, path: str) -> Any:
        """GET a dashboard REST endpoint (what `ray job status` reads), without a CLI start-up."""
        request = urllib.request.Request(self.dashboard + path,
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def submit(self, submission_id: str, *entrypoint: str) -> None:
        """`ray job submit --no-wait` with the README's runtime_env (env_vars only, no working_dir)."""
        self.cli("job", "submit", "--address", self.dashboard, "--submission-id", submission_id, "--no-wait",
                 "--runtime-env-json", RUNTIME_ENV, "--", *entrypoint)

    def status(self, submission_id: str) -> dict[str, Any]:
        return self.api(f"/api/jobs/{submission_id}")

    def logs(self, submission_id: str) -> str:
        return str(self.api(f"/api/jobs/{submission_id}/logs").get("logs", ""))

    def wait(self, submission_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        """Poll until the job reaches a terminal state; fail with its logs on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.status(submission_id)
            if info["status"] in TERMINAL:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {submission_id} not finished after {timeout}s:\n{self.logs(submission_id)[-4000:]}")


def _cluster_processes(marker: str) -> list[psutil.Process]:
    """Processes whose command line names this cluster's temp dir, and all their descendants."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _kill_cluster(temp_dir: Path) -> None:
    """Stop this cluster's processes, and only them: SIGTERM, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        procs = _cluster_processes(str(temp_dir))
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        psutil.wait_procs(procs, timeout=wait)


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's env without anything pointing at another Ray."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """Head + one worker node, 1 CPU and a 100 MB object store each, loopback only."""
    for exe in (RAY, DISTMERGE):
        if not exe.exists():
            pytest.fail(f"{exe} missing: install the project into the venv that runs pytest (pip install -e .)")
    temp_dir = Path(tempfile.mkdtemp(prefix="dmc-", dir="/tmp"))  # short: Ray's socket paths are limited
    # Every address this test uses is 127.0.0.1. Ray itself registers a node started with
    # --node-ip-address 127.0.0.1 under the host's routable address and its GCS and raylets
    # listen on all interfaces; the token keeps everyone else out of those ports.
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    cluster = RayCluster(temp_dir, _free_port(), _free_port(), env)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", "100000000",
              "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    try:
        cluster.cli("start", "--head", "--port", str(cluster.gcs_port), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(cluster.dashboard_port), "--ray-client-server-port", str(_free_port()),
                    "--dashboard-agent-listen-port", str(_free_port()), *common, timeout=START_TIMEOUT)
        # Same host: the joined node needs its own agent port; node manager and object
        # manager ports are picked free by default; the temp dir is the head's session.
        cluster.cli("start", "--address", f"127.0.0.1:{cluster.gcs_port}",
                    "--dashboard-agent-listen-port", str(_free_port()), *common, timeout=START_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        alive: list[Any] = []
        while time.monotonic() < deadline:
            try:
                nodes = cluster.api("/api/v0/nodes")["data"]["result"]["result"]
                alive = [n for n in nodes if n.get("state") == "ALIVE"]
            except OSError:
                alive = []
            if len(alive) == 2:
                break
            time.sleep(1)
        assert len(alive) == 2, f"expected 2 alive nodes, got {len(alive)}\n" + "\n".join(cluster.log)
        yield cluster
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
    for line in ("plan:", "joining Ray cluster at ", "merge (task_arithmetic)", "merged task_arithmetic"):
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
