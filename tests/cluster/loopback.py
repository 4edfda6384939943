"""A real Ray cluster on loopback for tests: `ray start --head` plus joined nodes, each a raylet
of its own on this machine, as a user's cluster would be started.

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


def cluster_processes(marker: str) -> list[psutil.Process]:
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
        procs = cluster_processes(str(temp_dir))
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


@contextlib.contextmanager
def loopback_cluster(nodes: int = 2, num_cpus: int = 1, object_store: int = 100_000_000,
                     memory: int | None = None, env: dict[str, str] | None = None) -> Iterator[RayCluster]:
    """Head + ``nodes - 1`` joined nodes, each with ``num_cpus``, ``object_store`` bytes of object
    store and (if given) ``memory`` bytes of Ray's memory resource, loopback only; ``env`` is
    added to the environment of the nodes (and of what the tests start against them), as a
    user sets storage endpoints and credentials on every node."""
    for exe in (RAY, DISTMERGE):
        if not exe.exists():
            pytest.fail(f"{exe} missing: install the project into the venv that runs pytest (pip install -e .)")
    temp_dir = Path(tempfile.mkdtemp(prefix="dmc-", dir="/tmp"))  # short: Ray's socket paths are limited
    # Every address this test uses is 127.0.0.1. Ray itself registers a node started with
    # --node-ip-address 127.0.0.1 under the host's routable address and its GCS and raylets
    # listen on all interfaces; the token keeps everyone else out of those ports.
    cluster = RayCluster(temp_dir, _free_port(), _free_port(),
                         _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **(env or {})))
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--object-store-memory",
              str(object_store), "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if memory is not None:
        common += ["--memory", str(memory)]
    try:
        cluster.cli("start", "--head", "--port", str(cluster.gcs_port), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(cluster.dashboard_port), "--ray-client-server-port", str(_free_port()),
                    "--dashboard-agent-listen-port", str(_free_port()), *common, timeout=START_TIMEOUT)
        # Same host: a joined node needs its own agent port; node manager and object
        # manager ports are picked free by default; the temp dir is the head's session.
        for _ in range(nodes - 1):
            cluster.cli("start", "--address", f"127.0.0.1:{cluster.gcs_port}",
                        "--dashboard-agent-listen-port", str(_free_port()), *common, timeout=START_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        alive: list[Any] = []
        while time.monotonic() < deadline:
            try:
                found = cluster.api("/api/v0/nodes")["data"]["result"]["result"]
                alive = [n for n in found if n.get("state") == "ALIVE"]
            except OSError:
                alive = []
            if len(alive) == nodes:
                break
            time.sleep(1)
        assert len(alive) == nodes, f"expected {nodes} alive nodes, got {len(alive)}\n" + "\n".join(cluster.log)
        yield cluster
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
