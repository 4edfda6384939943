"""The embedded Ray listens on loopback only; joining a named cluster is left as it was.

The end-to-end test starts distmerge's embedded Ray in a fresh interpreter (this session's
own Ray, from the ``ray_local`` fixture, must not be the one inspected), waits until every
endpoint Ray advertises for the node is listening, then reads the listening sockets of that
interpreter's whole process tree: GCS, raylet, agents, dashboard, monitor, driver, workers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from distmerge.engine import cluster

REPO = Path(__file__).resolve().parents[2]

# Runs in the subprocess: start the embedded Ray the way the CLI does, make sure a worker
# exists (workers listen too), report what Ray says it opened, then wait for stdin to close.
_CHILD = r"""
import json, logging, os, sys
import ray
from distmerge.engine.cluster import connect

MARK = sys.argv[1]

logging.basicConfig(level=logging.WARNING)
connect(num_cpus=1)

@ray.remote(num_cpus=0)
class Probe:  # an actor: its worker stays up while the test looks (idle task workers may not)
    def pid(self):
        return os.getpid()

    def env(self, key):
        return os.environ.get(key)

probe = Probe.remote()

node = ray.nodes()[0]
info = ray._private.worker._global_node.address_info
ports = {"gcs": int(info["gcs_address"].rsplit(":", 1)[1])}
for key in ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort",
            "DashboardAgentListenPort", "RuntimeEnvAgentPort"):
    if int(node.get(key) or 0) > 0:  # -1: not bound (e.g. fixed port 52365 taken by another Ray)
        ports[key] = int(node[key])
print(MARK + json.dumps({"node_ip": info["node_ip_address"], "session_dir": info["session_dir"],
                  "worker_pid": ray.get(probe.pid.remote()), "ports": ports,
                  "worker_tokenizers": ray.get(probe.env.remote("TOKENIZERS_PARALLELISM")),
                  "driver_tokenizers": os.environ.get("TOKENIZERS_PARALLELISM")}), flush=True)
sys.stdin.read()
ray.shutdown()
"""

_MARK = "distmerge-loopback-report "
STARTUP_S = 180  # a loaded 2-core CI box can take a minute to bring Ray up
SETTLE_S = 3  # seconds to keep watching once everything expected is listening


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # gRPC binds 127.0.0.1 on a dual-stack socket: ::ffff:127.0.0.1
    return addr.is_loopback


def _ray_processes(driver: int, session_dir: str) -> dict[int, psutil.Process]:
    """The driver, everything it started (recursively), and anything else whose command line
    names this Ray session (in case a process was re-parented)."""
    root = psutil.Process(driver)
    procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    for p in psutil.process_iter(["cmdline"]):
        if session_dir in " ".join(p.info["cmdline"] or []):
            procs.setdefault(p.pid, p)
    return procs


def _listening(procs: dict[int, psutil.Process]) -> list[tuple[str, int, int, str]]:
    """(ip, port, pid, process name) of every TCP listener and unconnected UDP socket."""
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid not in procs or not c.laddr:
            continue
        tcp_listen = c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN
        udp_open = c.type == socket.SOCK_DGRAM and not c.raddr
        if tcp_listen or udp_open:
            with contextlib.suppress(psutil.Error):
                found.append((c.laddr.ip, c.laddr.port, c.pid, procs[c.pid].name()))
    return sorted(found)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads every process's sockets via /proc")
def test_embedded_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TOKENIZERS_PARALLELISM")}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, _MARK], cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    started: dict[int, psutil.Process] = {}
    try:
        info = _read_report(proc)
        # Watch until every endpoint Ray advertises, the driver and the worker have been seen
        # listening, then a little longer; every listener seen at any point is checked.
        seen: set[tuple[str, int, int, str]] = set()
        deadline = time.monotonic() + STARTUP_S
        complete_at = None
        while complete_at is None or time.monotonic() - complete_at < SETTLE_S:
            started.update(_ray_processes(proc.pid, info["session_dir"]))
            seen.update(_listening(started))
            ports = {port for _, port, _, _ in seen}
            silent = {proc.pid, info["worker_pid"]} - {pid for _, _, pid, _ in seen}
            missing = {k: p for k, p in info["ports"].items() if p not in ports}
            if complete_at is None and not missing and not silent:
                complete_at = time.monotonic()
            assert time.monotonic() < deadline, (
                f"not listening after {STARTUP_S}s: ports {missing}, pids {silent}; seen {sorted(seen)}")
            time.sleep(0.5)

        assert len(seen) >= len(info["ports"]) + 2  # never vacuous
        exposed = sorted(s for s in seen if not _is_loopback(s[0]))
        assert not exposed, f"listening beyond loopback (node address {info['node_ip']}): {exposed}"
        assert _is_loopback(info["node_ip"]), info["node_ip"]
        # Its workers inherit the worker environment from the start (no runtime_env, so the idle
        # workers Ray starts in advance serve the first tasks); the driver's own is left as it was.
        assert info["worker_tokenizers"] == cluster.WORKER_ENV["TOKENIZERS_PARALLELISM"]
        assert info["driver_tokenizers"] is None
    finally:
        if proc.poll() is None:
            proc.stdin.close()  # the subprocess shuts its Ray down and exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for p in started.values():  # leftovers of this test's own Ray only; psutil refuses reused pids
            with contextlib.suppress(psutil.Error):
                p.kill()


def _read_report(proc: subprocess.Popen) -> dict:
    """The subprocess's report line. A thread drains its stdout to the end, so lines Ray prints
    there (before or after the report) neither hide the report nor fill the pipe."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + STARTUP_S
    with contextlib.suppress(queue.Empty):
        while (line := lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK):])
    raise AssertionError(f"embedded Ray did not come up within {STARTUP_S}s (exit code {proc.poll()})")


def _record_init(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace ray.init by a recorder of its kwargs and of Ray's cluster mode during the call."""
    import ray
    from ray._private import ray_constants

    calls: list[dict] = []

    def fake_init(**kwargs: object) -> None:
        calls.append({"kwargs": kwargs, "cluster_flag": ray_constants.ENABLE_RAY_CLUSTER,
                      "cluster_env": os.environ.get(cluster._RAY_CLUSTER_ENV),
                      "tokenizers": os.environ.get("TOKENIZERS_PARALLELISM")})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(cluster._RAY_CLUSTER_ENV, raising=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")  # restored by monkeypatch afterwards
    return calls


def test_joining_a_cluster_is_unchanged(monkeypatch):
    from ray._private import ray_constants

    calls = _record_init(monkeypatch)
    probed: list[str] = []  # the address check is tested in tests/engine/test_cluster_address.py
    monkeypatch.setattr(cluster, "check_reachable", probed.append)
    before = ray_constants.ENABLE_RAY_CLUSTER
    assert cluster.connect("10.0.0.5:6379") is True
    assert probed == ["10.0.0.5:6379"]
    assert calls == [{"kwargs": {"address": "10.0.0.5:6379", "log_to_driver": True,
                                 "configure_logging": False},
                      "cluster_flag": before, "cluster_env": None, "tokenizers": None}]


def test_embedded_start_turns_cluster_mode_off_only_while_starting(monkeypatch):
    from ray._private import ray_constants

    calls = _record_init(monkeypatch)
    before = ray_constants.ENABLE_RAY_CLUSTER
    assert cluster.connect(num_cpus=1) is True
    (call,) = calls
    assert call["kwargs"]["address"] == "local"
    assert call["kwargs"]["_node_ip_address"] == cluster.LOOPBACK
    assert call["kwargs"]["include_dashboard"] is False
    assert call["cluster_flag"] is False and call["cluster_env"] == "0"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert ray_constants.ENABLE_RAY_CLUSTER is before
    assert cluster._RAY_CLUSTER_ENV not in os.environ
    # The workers' environment is inherited from the start, not a runtime_env (which would keep
    # the first tasks and actors off the workers Ray starts in advance); only during the start.
    assert "runtime_env" not in call["kwargs"]
    assert call["tokenizers"] == "false" and "TOKENIZERS_PARALLELISM" not in os.environ


def test_embedded_start_keeps_the_users_worker_environment(monkeypatch):
    calls = _record_init(monkeypatch)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    cluster.connect(num_cpus=1)
    assert calls[0]["tokenizers"] == "true" and os.environ["TOKENIZERS_PARALLELISM"] == "true"
