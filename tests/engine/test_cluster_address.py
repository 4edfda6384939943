"""A named Ray cluster's address is checked before a run creates anything: a form Ray cannot
parse, a port nobody answers on, and a port where something other than a Ray head answers
(an HTTP server, a proxy that closes at once, a silent listener, another gRPC service) are
refused in one line, exit 2, and a complete earlier output stays as it was, ``--overwrite``
or not. Before, ``ray.init`` on such a port waited 25 s or hung for good, after OUT had been
locked and (with ``--overwrite``) cleared. A real head passes: the cluster tests join one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from distmerge.config import parse_config
from distmerge.engine import cluster
from distmerge.engine.cluster import check_reachable, cluster_address
from distmerge.engine.run import run_merge
from distmerge.errors import ConfigError


def _every_file(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


class _Listener:
    """A loopback TCP listener that accepts and then closes (``close``) or holds (``silent``)
    each connection without a byte."""

    def __init__(self, mode: str) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.mode = mode
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "close":
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def not_ray() -> Iterator[dict[str, int]]:
    """Ports on loopback where something answers that is not a Ray head."""
    import grpc
    import ray.core.generated.gcs_service_pb2_grpc  # noqa: F401 - the probe's imports, paid before any timing

    http = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    closing, silent = _Listener("close"), _Listener("silent")
    other_grpc = grpc.server(ThreadPoolExecutor(max_workers=1))  # no services: every call UNIMPLEMENTED
    grpc_port = other_grpc.add_insecure_port("127.0.0.1:0")
    other_grpc.start()

    class _RefuseAll(grpc.GenericRpcHandler):  # as a token-auth Ray head answers a call without its token
        def service(self, handler_call_details: object) -> object:
            def refuse(request: object, context: grpc.ServicerContext) -> None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken")
            return grpc.unary_unary_rpc_method_handler(refuse)

    token_head = grpc.server(ThreadPoolExecutor(max_workers=1), handlers=[_RefuseAll()])
    token_port = token_head.add_insecure_port("127.0.0.1:0")
    token_head.start()
    yield {"http": http.server_address[1], "close": closing.port, "silent": silent.port, "grpc": grpc_port,
           "token": token_port}
    http.shutdown()
    closing.close()
    silent.close()
    other_grpc.stop(None)
    token_head.stop(None)


@pytest.mark.parametrize(("kind", "why"), [
    ("http", "it does not speak gRPC: an HTTP server, a proxy or another service?"),
    ("close", "it does not speak gRPC: an HTTP server, a proxy or another service?"),
    ("silent", "no gRPC answer within 1 s"),
    ("grpc", "a gRPC server without Ray's GCS service"),
])
def test_a_port_where_something_else_answers_is_refused(not_ray, monkeypatch, kind, why):
    monkeypatch.setattr(cluster, "REACH_TIMEOUT_S", 1.0)
    address = f"127.0.0.1:{not_ray[kind]}"
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        check_reachable(address)
    assert str(refused.value) == (
        f"Ray cluster at {address} (--ray-address or RAY_ADDRESS): something answers there but it is not a Ray "
        f"head ({why}); give the head's GCS address, the host:port `ray start --head` prints (port 6379 unless "
        "--port was given)")
    assert time.monotonic() - started < (3.0 if kind == "silent" else 1.0)


@pytest.mark.parametrize("address", ["127.0.0.1", "http://127.0.0.1:8265", "ray://", "host:port", ":6379",
                                     "127.0.0.1:0", "127.0.0.1:99999", " 127.0.0.1:6379", "127.0.0.1:6379 "])
def test_addresses_ray_cannot_parse_are_refused_before_ray_sees_them(address):
    """Ray's own refusal of these is a bare ValueError (reported as a distmerge bug, exit 70)."""
    with pytest.raises(ConfigError, match=r"not a Ray address.*give the head's host:port \(e\.g\. 127\.0\.0\.1:6379\)"):
        check_reachable(address)
    check_reachable("auto")  # Ray's own forms pass to Ray
    check_reachable("local")


def test_the_flag_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address("127.0.0.1:6379") == "127.0.0.1:6379"
    assert cluster_address(None) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert cluster_address(None) is None


@pytest.mark.parametrize("via", ["flag", "environment"])
def test_overwrite_onto_an_earlier_output_keeps_it_when_the_address_is_not_ray(
        llama_family, tmp_path, not_ray, via):
    base, experts = llama_family
    data = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]}
    out = tmp_path / "out"
    run_merge(parse_config(data), out, executor="local", progress=False)
    before = _every_file(out)
    assert "merge_report.json" in before and any(name.endswith(".safetensors") for name in before)
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump(data))
    address = f"127.0.0.1:{not_ray['http']}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    flags = ["--ray-address", address] if via == "flag" else []
    if via == "environment":
        env["RAY_ADDRESS"] = address
    run = subprocess.run([sys.executable, "-m", "distmerge", "merge", str(path), str(out), "--overwrite",
                          "--no-progress", *flags], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        f"distmerge: error: Ray cluster at {address} (--ray-address or RAY_ADDRESS): something answers there but it "
        "is not a Ray head (it does not speak gRPC: an HTTP server, a proxy or another service?); give the head's "
        "GCS address, the host:port `ray start --head` prints (port 6379 unless --port was given)"]
    assert _every_file(out) == before



def test_auto_without_a_cluster_here_says_so_in_our_words(monkeypatch):
    """Ray's own words ask for its ``--address`` flag; distmerge's is ``--ray-address``."""
    import ray

    def no_cluster(**kwargs: object) -> None:
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ConfigError) as refused:
        cluster.connect("auto")
    assert str(refused.value) == (
        "Ray cluster at auto (--ray-address or RAY_ADDRESS): no Ray cluster runs on this machine (auto joins one "
        "that `ray start` started here); start it with `ray start --head` or give the head's address")


@pytest.mark.parametrize("kind", ["http", "close"])
def test_a_ray_client_address_where_no_grpc_answers_is_refused(not_ray, kind):
    """ray:// is the Ray Client server's (gRPC, not the GCS's service): only a port that speaks no
    gRPC is refused there (Ray's client waited 34 s on it, then failed over several lines)."""
    address = f"ray://127.0.0.1:{not_ray[kind]}"
    with pytest.raises(ConfigError, match=r"something answers there but it is not a Ray Client server \(it does not "
                                          r"speak gRPC.*give ray://host:port of the head's client server"):
        check_reachable(address)
    check_reachable(f"ray://127.0.0.1:{not_ray['grpc']}")  # a gRPC server: may be the client server


def test_a_head_asking_for_a_token_is_refused_only_where_ray_s_token_is_known(not_ray, monkeypatch):
    """The real head is tried in tests/cluster/test_cluster_ray_jobs.py; here which answer
    follows from which token: none, one the head turns down, and a Ray whose token loader is
    not there (then ``ray.init`` decides, nothing is refused early)."""
    address = f"127.0.0.1:{not_ray['token']}"
    for token, has in [((), "this process has none"),
                       ((("authorization", "Bearer " + "ab" * 32),), "the token this process has is not its")]:
        monkeypatch.setattr(cluster, "_ray_token_metadata", lambda token=token: token)
        with pytest.raises(ConfigError, match=rf"^Ray cluster at {address} \(--ray-address or RAY_ADDRESS\): the "
                                              rf"head asks for its auth token and {has}; set RAY_AUTH_MODE=token"):
            check_reachable(address)
    monkeypatch.setattr(cluster, "_ray_token_metadata", lambda: None)
    check_reachable(address)
